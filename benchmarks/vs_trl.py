"""papo-engine vs TRL's PAPOTrainer (trl 1.7.1) on the same work, same torch build, one run.

    bash benchmarks/setup_trl_env.sh                       # once: .venv-trl (torch 2.13.0 CPU, trl 1.7.1, ours -e)
    .venv-trl/bin/python benchmarks/vs_trl.py              # 1x8x32, 4x8x32, 4x8x32 at two more model shapes
                                                           # (hidden 128 / 4 layers; Qwen's 151,936-token vocabulary)
    .venv-trl/bin/python benchmarks/vs_trl.py --smoke --output /tmp/vs_trl    # end-to-end check, tiny sizes

Every run is its own process, in .venv-trl's python for both systems (`trl_runner.py`: the shared checkpoint,
settings and equal-work rules are described there). Modes:
  ours_grpo, ours_papo_official, ours_papo (default)      — papo-engine (it tunes glibc malloc itself:
                                                            `distributed.keep_freed_memory`)
  trl_grpo, trl_papo                                      — TRL, gradient checkpointing off, glibc defaults
  trl_grpo_malloc, trl_papo_malloc                        — the same with our malloc tuning handed over as
                                                            MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
  trl_papo_gc                                             — TRL's default gradient checkpointing on (reported
                                                            apart; not part of "TRL's best")
  ours_papo_lora, trl_papo_lora                           — PAPO with the same LoRA on both sides (trl_runner.LORA;
                                                            ours model.lora.*, TRL's peft_config); only with --modes
Within a configuration, repeat r runs every mode once, in an order rotated by r (A B C .. then B C .. A ..), so a
shared machine's drifts hit all modes alike. The first --drop steps of each run are dropped (allocation, JIT);
a run's step time and completion tokens/s are medians over its remaining steps; a mode's figure is the median
over repeats, with min and max. Ratios are paired: (ours / TRL) within the same repeat, then min / median / max.
"TRL's best" PAPO (GRPO) is whichever of trl_papo, trl_papo_malloc (trl_grpo, trl_grpo_malloc) has the higher
median tokens/s. Headline (JSON "summary"): throughput_ratio_vs_trl = ours_papo ÷ TRL's best PAPO, completion
tokens/s, paired median, at the last tiny configuration; for the other shapes (`PxNxT@shape`, trl_runner.SHAPES,
run with --shape-modes) throughput_ratio_vs_trl_<shape> (_real_vocab for tiny-vocab152k) and
peak_rss_ratio_vs_trl_<shape> (peak RSS from the OS, ours PAPO / TRL's best PAPO). Each mode also gets a per-phase profile ("phases_s":
rollout, rewards_advantages, old_logprobs, update, other; "detail_s": generate alone, update's forward / backward /
optimizer; seams in trl_runner.py), tabled side by side with the difference ours PAPO − TRL's best PAPO.
Writes <output>/vs_trl_<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_device import device_name, write_results  # benchmarks/ is on sys.path: these run as scripts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from trl_runner import MODES, PHASES, SETTINGS, SHAPES  # noqa: E402

# distributed.keep_freed_memory's mallopt calls, as glibc environment variables
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
RUN_ENV = {"DS_ACCELERATOR": "cpu", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline", "TRL_EXPERIMENTAL_SILENCE": "1"}
PAIRS = {  # ratio name -> (numerator mode, denominator mode or "best" group)
    "ours_papo_vs_trl_papo_best": ("ours_papo", "trl_papo_best"),
    "ours_papo_vs_trl_papo": ("ours_papo", "trl_papo"),
    "ours_papo_vs_trl_papo_malloc": ("ours_papo", "trl_papo_malloc"),
    "ours_papo_vs_trl_papo_gc": ("ours_papo", "trl_papo_gc"),
    "ours_papo_official_vs_trl_papo_best": ("ours_papo_official", "trl_papo_best"),
    "ours_grpo_vs_trl_grpo_best": ("ours_grpo", "trl_grpo_best"),
    "ours_papo_lora_vs_trl_papo_lora": ("ours_papo_lora", "trl_papo_lora"),
    "ours_papo_lora_vs_ours_papo": ("ours_papo_lora", "ours_papo"),
    "trl_papo_lora_vs_trl_papo": ("trl_papo_lora", "trl_papo"),
}
# peak RSS ratios (paired): name -> (numerator, denominator)
RSS_PAIRS = {"peak_rss_ours_papo_lora_vs_trl_papo_lora": ("ours_papo_lora", "trl_papo_lora"),
             "peak_rss_ours_papo_lora_vs_ours_papo": ("ours_papo_lora", "ours_papo")}
DEFAULT_MODES = [m for m in MODES if not m.endswith("_lora")]  # LoRA modes: on request (--modes)
BEST = {"trl_papo_best": ("trl_papo", "trl_papo_malloc"), "trl_grpo_best": ("trl_grpo", "trl_grpo_malloc")}


class BenchError(RuntimeError):
    pass


def parse_config(text: str) -> tuple[int, int, int, str]:
    """PROMPTSxROLLOUTSxTOKENS[@SHAPE] -> (prompts, rollouts, tokens, shape); the shape defaults to tiny."""
    work, _, shape = text.partition("@")
    shape = shape or "tiny"
    try:
        prompts, n, tokens = (int(x) for x in work.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PROMPTSxROLLOUTSxTOKENS[@SHAPE], e.g. 4x8x32 or "
                                         f"4x8x32@tiny-vocab152k") from None
    if shape not in SHAPES:
        raise argparse.ArgumentTypeError(f"{text!r}: shape {shape!r} is not one of {', '.join(SHAPES)}")
    return prompts, n, tokens, shape


def config_name(prompts: int, n: int, tokens: int, shape: str) -> str:
    return f"{prompts}x{n}x{tokens}" + ("" if shape == "tiny" else f"@{shape}")


def extensions_dir(python: str) -> str:
    """One JIT-extension folder per environment: .venv-trl's torch and deepspeed build the same op names from
    other paths, and two environments sharing one folder rebuild each other's ops (and a killed build leaves a
    lock that hangs the next): .cache/torch_extensions_trl for .venv-trl, .cache/torch_extensions (scripts/env.sh's)
    for any other interpreter."""
    venv = Path(python).parent.parent.name  # …/<venv>/bin/python, not resolved: a venv's python is a symlink
    return str(ROOT / ".cache" / ("torch_extensions_trl" if venv == ".venv-trl" else "torch_extensions"))


def run_env(mode: str, python: str = sys.executable) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(RUN_ENV, TORCH_EXTENSIONS_DIR=extensions_dir(python))
    if mode.endswith("_malloc"):
        env.update(MALLOC_ENV)
    return env


def call(python: str, argv: list[str], mode: str, what: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([python, str(ROOT / "benchmarks" / "trl_runner.py"), *argv], env=run_env(mode, python),
                          capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BenchError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return time.perf_counter() - start


def measure(args, model_dirs: dict[str, str], work: Path) -> list[dict]:
    runs = []
    for prompts, n, tokens, shape in args.configs:
        name = config_name(prompts, n, tokens, shape)
        modes = args.modes if shape == "tiny" else [m for m in args.modes if m in args.shape_modes]
        for repeat in range(args.repeats):
            order = modes[repeat % len(modes):] + modes[:repeat % len(modes)]
            for mode in order:
                out = work / f"{name}_{repeat}_{mode}.json"
                argv = ["--mode", mode, "--model-dir", model_dirs[shape], "--prompts", str(prompts), "--n", str(n),
                        "--tokens", str(tokens), "--steps", str(args.steps), "--shape", shape, "--out", str(out)]
                wall = call(args.python, argv, mode, f"{mode} at {name}")
                run = json.loads(out.read_text())
                run.update(config=name, repeat=repeat, wall_s=wall)
                kept = run["steps"][args.drop:]
                run["step_s"] = statistics.median(s["seconds"] for s in kept)
                run["tokens_per_s"] = statistics.median(s["completion_tokens"] / s["seconds"] for s in kept)
                # every response at its length: --tokens, or the shape's imposed lengths (both sides the same)
                run["fixed_length"] = all(abs(s["completion_tokens"] - s["expected_completion_tokens"]) < 0.5
                                          for s in run["steps"])
                runs.append(run)
                print(f"[{run['config']} repeat {repeat + 1}/{args.repeats}] {mode:<19} step {run['step_s']:.3f} s  "
                      f"{run['tokens_per_s']:7.0f} tok/s  peak RSS {run['peak_rss_mb']:.0f} MB  "
                      f"(process {wall:.0f} s)", flush=True)
    return runs


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict], args) -> dict:
    configs = {}
    for prompts, n, tokens, shape in args.configs:
        name = config_name(prompts, n, tokens, shape)
        by_mode = {m: sorted((r for r in runs if r["config"] == name and r["mode"] == m), key=lambda r: r["repeat"])
                   for m in args.modes}
        by_mode = {m: rs for m, rs in by_mode.items() if rs}
        modes = {}
        for mode, rs in by_mode.items():
            modes[mode] = {"step_s": spread([r["step_s"] for r in rs]),
                           "completion_tokens_per_s": spread([r["tokens_per_s"] for r in rs]),
                           "peak_rss_mb": spread([r["peak_rss_mb"] for r in rs]),
                           "fixed_length": all(r["fixed_length"] for r in rs), "runs": len(rs),
                           **{k: rs[0][k] for k in ("trainable_parameters", "optimizer_state_bytes") if k in rs[0]}}
            kept = [s for r in rs for s in r["steps"][args.drop:]]
            for key in ("phases_s", "detail_s"):  # per phase: median over all kept steps of all runs
                if kept and all(key in s for s in kept):
                    names = PHASES if key == "phases_s" else sorted({p for s in kept for p in s[key]})
                    modes[mode][key] = {p: statistics.median(s[key].get(p, 0.0) for s in kept) for p in names}
        best = {}
        for group, members in BEST.items():
            present = [m for m in members if m in modes]
            if present:
                best[group] = max(present, key=lambda m: modes[m]["completion_tokens_per_s"]["median"])
        ratios = {}
        for ratio, (num, den) in PAIRS.items():
            den = best.get(den, den)
            if num in by_mode and den in by_mode:
                ratios[ratio] = {"denominator": den, **spread(
                    [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(by_mode[num], by_mode[den])])}
        for system, grpo, papo in (("ours", "ours_grpo", "ours_papo"), ("trl", "trl_grpo", "trl_papo")):
            if grpo in by_mode and papo in by_mode:
                ratios[f"{system}_papo_over_grpo_step_time"] = {"denominator": grpo, **spread(
                    [a["step_s"] / b["step_s"] for a, b in zip(by_mode[papo], by_mode[grpo])])}
        best_papo = best.get("trl_papo_best")
        if "ours_papo" in by_mode and best_papo in by_mode:  # memory: peak RSS, ours PAPO / TRL's best PAPO
            ratios["peak_rss_ours_papo_vs_trl_papo_best"] = {"denominator": best_papo, **spread(
                [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(by_mode["ours_papo"], by_mode[best_papo])])}
        for ratio, (num, den) in RSS_PAIRS.items():
            if num in by_mode and den in by_mode:
                ratios[ratio] = {"denominator": den, **spread(
                    [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(by_mode[num], by_mode[den])])}
        configs[name] = {"prompts": prompts, "rollouts": n, "tokens": tokens, "shape": shape,
                         "shape_overrides": SHAPES[shape].overrides, "imposed_lengths": SHAPES[shape].lengths or None,
                         "modes": modes, "trl_best": best, "ratios": ratios}
    tiny = [name for name, c in configs.items() if c["shape"] == "tiny"]
    headline_config = tiny[-1] if tiny else list(configs)[-1]
    headline = configs[headline_config]["ratios"].get("ours_papo_vs_trl_papo_best")
    summary = {"throughput_ratio_vs_trl": headline["median"] if headline else None,
               "throughput_ratio_vs_trl_min": headline["min"] if headline else None,
               "throughput_ratio_vs_trl_max": headline["max"] if headline else None,
               "trl_papo_best_mode": headline["denominator"] if headline else None,
               "configuration": headline_config,
               "measure": "completion tokens/s, ours_papo / TRL's best PAPO (gradient checkpointing off), paired "
                          "median over repeats, at the last tiny-shape configuration; per other shape: "
                          "throughput_ratio_vs_trl_<shape> (tiny-vocab152k: _real_vocab) and the peak RSS ratio"}
    for name, c in configs.items():
        if c["shape"] == "tiny":
            continue
        label = {"tiny-vocab152k": "real_vocab"}.get(c["shape"], c["shape"])
        label = label.replace("-", "_") if c["imposed_lengths"] else label  # paper_mini, paper_mini_vocab152k
        for key, ratio in (("throughput_ratio_vs_trl", "ours_papo_vs_trl_papo_best"),
                           ("peak_rss_ratio_vs_trl", "peak_rss_ours_papo_vs_trl_papo_best"),
                           ("lora_throughput_ratio_vs_trl", "ours_papo_lora_vs_trl_papo_lora"),
                           ("lora_peak_rss_ratio_vs_trl", "peak_rss_ours_papo_lora_vs_trl_papo_lora"),
                           ("lora_throughput_ratio_vs_full", "ours_papo_lora_vs_ours_papo")):
            if ratio in c["ratios"]:
                summary[f"{key}_{label}"] = c["ratios"][ratio]["median"]
                summary[f"{key}_{label}_configuration"] = name
    return {"summary": summary, "configurations": configs}


def versions(python: str) -> dict:
    code = ("import json, importlib.metadata as md\n"
            "def v(p):\n    try:\n        return md.version(p)\n    except md.PackageNotFoundError:\n"
            "        return 'not installed'\n"
            "print(json.dumps({p: v(p) for p in ['torch', 'transformers', 'trl', 'accelerate', 'deepspeed']}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=run_env("", python))
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip()[-300:]}


def fmt(s: dict, digits: int = 0, unit: str = "") -> str:
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def table(report: dict) -> str:
    sm, meta = report["summary"], report["meta"]
    head = f"{sm['throughput_ratio_vs_trl']:.2f}×" if sm["throughput_ratio_vs_trl"] else "n/a (TRL modes not run)"
    lines = [f"# papo-engine vs TRL {meta['versions'].get('trl', '?')} PAPOTrainer on {meta['device']}", "",
             f"Headline: ours PAPO ÷ TRL's best PAPO ({sm['trl_papo_best_mode']}), completion tokens/s, paired "
             f"median at {sm['configuration']}: **{head}**"
             + (f" (min {sm['throughput_ratio_vs_trl_min']:.2f}, max {sm['throughput_ratio_vs_trl_max']:.2f})"
                if sm["throughput_ratio_vs_trl"] else "") + ".", ""]
    prefixes = ("throughput_ratio_vs_trl_", "peak_rss_ratio_vs_trl_", "lora_")
    for key in sorted(k for k in sm if k.startswith(prefixes)
                      and not k.endswith(("_min", "_max", "_configuration"))):
        lines.append(f"- {key}: **{sm[key]:.2f}×** ({sm[key + '_configuration']})")
    lines += ["",
             f"{meta['repeats']} runs per mode (one process each, modes taking turns), {meta['steps']} steps per run, "
             f"first {meta['drop']} dropped; values are median [min–max] over runs. Same torch for both "
             f"({meta['versions'].get('torch', '?')}), fp32, β = 0, one optimizer step per rollout, responses forced "
             f"to the full length (min_new_tokens), or at a paper-mini shape each to its imposed length, the same on "
             f"both sides. Settings: {json.dumps(meta['settings'])}. "
             f"`_malloc`: TRL with our glibc malloc tuning ({' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}).",
             ""]
    for name, c in report["configurations"].items():
        lines += [f"## {c['prompts']} prompt(s) × {c['rollouts']} rollouts × {c['tokens']} tokens, model {c['shape']} "
                  f"{' '.join(c['shape_overrides'])}", "",
                  "| mode | step (s) | completion tok/s | peak RSS (MB) | trainable parameters | optimizer state (MB) "
                  "| lengths as set |", "|---|---|---|---|---|---|---|"]
        for mode, m in c["modes"].items():
            sizes = (f"{m['trainable_parameters']:,} | {m['optimizer_state_bytes'] / 2**20:.1f}"
                     if "trainable_parameters" in m else "– | –")
            lines.append(f"| {mode} | {fmt(m['step_s'], 3)} | {fmt(m['completion_tokens_per_s'])} | "
                         f"{fmt(m['peak_rss_mb'])} | {sizes} | {'yes' if m['fixed_length'] else 'NO'} |")
        lines += ["", "| paired ratio | denominator | median [min–max] |", "|---|---|---|"]
        for ratio, r in c["ratios"].items():
            lines.append(f"| {ratio} | {r['denominator']} | {fmt(r, 2, '×')} |")
        lines += profile_table(c)
        lines.append("")
    return "\n".join(lines)


def profile_table(c: dict) -> list[str]:
    """Ours and TRL's step side by side by phase (trl_runner.py's docstring defines the phases and seams)."""
    modes = {m: v for m, v in c["modes"].items() if "phases_s" in v}
    if not modes:
        return []

    def row(name: str, step: float, ph: dict, d: dict) -> str:
        parts = "/".join(f"{d.get(f'update.{k}', 0.0):.3f}" for k in ("forward", "backward", "optimizer"))
        return (f"| {name} | {step:.3f} | {ph['rollout']:.3f} | {d.get('generate', 0.0):.3f} | "
                f"{ph['rewards_advantages']:.3f} | {ph['old_logprobs']:.3f} | {ph['update']:.3f} | {parts} | "
                f"{ph['other']:.3f} |")

    lines = ["", "Step by phase (s, median over measured steps of all runs; a phase's median and the step's need not "
             "add up). rollout: prompt processing + generate + decode; generate: the model's `generate` alone; "
             "update: forward (+loss) / backward / optimizer (clip, step, zero_grad); other: the rest of the step "
             "(data, logging, metrics).", "",
             "| mode | step | rollout | of which generate | rewards + advantages | old log-probs | update | "
             "fwd/bwd/opt | other |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, m in modes.items():
        lines.append(row(mode, m["step_s"]["median"], m["phases_s"], m.get("detail_s", {})))
    best = c.get("trl_best", {}).get("trl_papo_best")
    if "ours_papo" in modes and best in modes:
        a, b = modes["ours_papo"], modes[best]
        delta = {p: a["phases_s"][p] - b["phases_s"][p] for p in PHASES}
        dd = {k: a.get("detail_s", {}).get(k, 0.0) - b.get("detail_s", {}).get(k, 0.0)
              for k in ("generate", "update.forward", "update.backward", "update.optimizer")}
        lines.append(row(f"ours_papo − {best}", a["step_s"]["median"] - b["step_s"]["median"], delta, dd))
    return lines


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = report["configurations"]
    fig, axes = plt.subplots(1, len(configs), figsize=(6.5 * len(configs), 4.2), squeeze=False)
    for ax, (name, c) in zip(axes[0], configs.items()):
        modes = list(c["modes"])
        med = [c["modes"][m]["completion_tokens_per_s"]["median"] for m in modes]
        lo = [v - c["modes"][m]["completion_tokens_per_s"]["min"] for m, v in zip(modes, med)]
        hi = [c["modes"][m]["completion_tokens_per_s"]["max"] - v for m, v in zip(modes, med)]
        colors = ["tab:blue" if m.startswith("ours") else "tab:orange" for m in modes]
        ax.bar(range(len(modes)), med, yerr=[lo, hi], color=colors, capsize=3)
        ax.set_xticks(range(len(modes)), modes, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("completion tokens / s (median, min–max)")
        ratio = c["ratios"].get("ours_papo_vs_trl_papo_best")
        ax.set_title(f"{name}" + (f": ours PAPO = {ratio['median']:.2f}× TRL's best PAPO" if ratio else ""),
                     fontsize=10)
    fig.suptitle(f"papo-engine (blue) vs TRL PAPOTrainer (orange), {report['meta']['device']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=parse_config, nargs="+",
                        default=[(1, 8, 32, "tiny"), (4, 8, 32, "tiny"), (4, 8, 32, "tiny-h128-l4"),
                                 (4, 8, 32, "tiny-vocab152k")],
                        help="PROMPTSxROLLOUTSxTOKENS[@SHAPE] ... (shapes: trl_runner.SHAPES; the last tiny one "
                             "gives the headline)")
    parser.add_argument("--shape-modes", nargs="+", choices=MODES,
                        default=["ours_grpo", "ours_papo", "trl_grpo", "trl_papo", "trl_papo_malloc"],
                        help="the modes run at shapes other than tiny")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=DEFAULT_MODES)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode and configuration")
    parser.add_argument("--steps", type=int, default=6, help="steps per run")
    parser.add_argument("--drop", type=int, default=2, help="first steps of each run not measured")
    parser.add_argument("--python", default=str(ROOT / ".venv-trl" / "bin" / "python"),
                        help="interpreter for every run (both systems: the same torch)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--suffix", default="", help="appended to the results' file names (vs_trl_<device><suffix>.*)")
    parser.add_argument("--smoke", action="store_true",
                        help="end-to-end check at tiny sizes: 1x2x4, 2 steps (1 measured), 1 repeat, no warm-up")
    args = parser.parse_args()
    if args.smoke:
        shapes = sorted({c[3] for c in args.configs}) if any(c[3] != "tiny" for c in args.configs) else ["tiny"]
        args.configs, args.steps, args.drop, args.repeats = [(1, 2, 4, shape) for shape in shapes], 2, 1, 1
    if args.steps <= args.drop or args.repeats < 1:
        parser.error("--steps must exceed --drop, and --repeats must be >= 1")
    if not Path(args.python).exists():
        print(f"vs_trl: {args.python} not found: build it with `bash benchmarks/setup_trl_env.sh`", file=sys.stderr)
        return 1
    started = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
            model_dirs = {}
            for shape in sorted({c[3] for c in args.configs}):
                model_dirs[shape] = str(Path(tmp) / f"checkpoint-{shape}")
                call(args.python, ["--build-checkpoint", model_dirs[shape], "--shape", shape], "",
                     f"building the shared {shape} checkpoint")
            model_dir = next(iter(model_dirs.values()))
            if not args.smoke:  # compile our C++ kernel / DeepSpeed op once, outside every measured run
                call(args.python, ["--mode", "ours_papo", "--model-dir", model_dir, "--prompts", "1", "--n", "2",
                                   "--tokens", "2", "--steps", "1", "--out", str(Path(tmp) / "warm.json")],
                     "ours_papo", "the warm-up run")
            runs = measure(args, model_dirs, Path(tmp))
    except BenchError as err:
        print(f"vs_trl: {err}", file=sys.stderr)
        return 1
    report = summarize(runs, args)
    report["meta"] = {"device": device_name(), "platform": platform.platform(), "versions": versions(args.python),
                      "settings": SETTINGS, "repeats": args.repeats, "steps": args.steps, "drop": args.drop,
                      "modes": args.modes, "shape_modes": args.shape_modes,
                      "shapes": {name: SHAPES[name].overrides for name in sorted({c[3] for c in args.configs})},
                      "malloc_env": MALLOC_ENV, "wall_s": time.time() - started,
                      "threads": runs[0]["threads"]}
    report["runs"] = [{k: r[k] for k in ("config", "repeat", "mode", "step_s", "tokens_per_s", "peak_rss_mb",
                                         "wall_s", "fixed_length", "malloc_env", "trainable_parameters",
                                         "optimizer_state_bytes")}
                      | {"step_seconds": [s["seconds"] for s in r["steps"]]} for r in runs]
    stem = Path(args.output) / f"vs_trl_{report['meta']['device']}{args.suffix}"
    write_results(stem, report, table(report))
    chart(report, stem.with_suffix(".png"))
    print(f"vs_trl: wrote {stem}.json, .md, .png ({report['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
