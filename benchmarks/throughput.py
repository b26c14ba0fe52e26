"""Training throughput: GRPO vs PAPO (`official`: the masked branch as no-grad constants, the authors' way) vs PAPO
(default: gradient through both branches, original and masked images in one 2B forward), in one run.

    python benchmarks/throughput.py                      # tiny default model on this machine
    python benchmarks/throughput.py --steps 8 --repeats 3 model.path=/data/Qwen2.5-VL-3B-Instruct ...
    python benchmarks/throughput.py --shape tiny-vocab152k   # the tiny body with Qwen's 151,936-token vocabulary
    python benchmarks/throughput.py --shape paper-mini       # a real run's proportions and long-tailed lengths,
                                                            # with the code before the length-aware round beside it

Same config, data and seed for every mode; only the algorithm switches differ. The three trainers live in one
process and take their steps in turn (step k of each mode back to back, the order rotating every step), so a
shared machine's drifts hit all modes alike. The first step of each run is dropped (allocations, kernel JIT).
A mode's step time is the median over its steps; a ratio is the median over steps of (mode / GRPO) at the
same step, measured seconds apart. --repeats builds fresh trainers again. Writes
benchmarks/results/throughput_<device>[_<shape>].{json,md}; the JSON's "summary" holds the ratios.

A paper-mini shape (benchmarks/shapes.py) imposes each response's length (by key, the same in every mode), builds
the model once into a checkpoint every mode loads (model.path), and adds `papo_before`: PAPO run by the code before
the length-aware round (benchmarks/before.py, a worker process taking its steps in turn with the others);
"speedup_over_before" is its step time over PAPO's, paired by step. Each mode's update/padding_fraction and
rollout/row_utilization (medians) are in the JSON where the code logs them.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from papo_engine.config import official_overrides

from bench_device import device_name, write_results  # benchmarks/ is on sys.path: these run as scripts
from shapes import SHAPES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = {
    "grpo": ["algo.gamma=0", "algo.eta_orig=0", "algo.eta_mask=0"],
    "papo_official": official_overrides(),  # the authors' computation, raw-image masking included
    "papo": [],
    # PAPO with the training side's micro-batches of before the length-aware round (padded to the step's longest)
    "papo_fixed_micro_batches": ["trainer.micro_batch_tokens=0"],
}
ALGORITHMS = ["grpo", "papo_official", "papo"]  # the modes the ratios to GRPO compare (the default --modes)
PHASES = ["rollout", "weight_sync", "advantages", "old_logprobs", "update"]
LAYOUT = ["update/padding_fraction", "rollout/row_utilization"]  # how much of the work was real tokens
# measurement runs only: no warm-start, evaluation, checkpoints or logging services
COMMON = ["warmup.steps=0", "trainer.eval_samples=1", "trainer.save_every=0", "trainer.save_final=false",
          "logging.wandb=false", "logging.plot=false"]


def build_trainers(out_root: str, steps: int, spec, overrides: list[str], modes: list[str], before: bool) -> dict:
    """{mode: trainer} for the shape `spec`; with `before`, "papo_before" is a worker (before.Before) that takes
    steps when asked."""
    from papo_engine.config import load_config
    from papo_engine.trainer import PAPOTrainer
    shape_overrides = spec.run_overrides()
    if spec.lengths or before:  # one checkpoint for every mode (the old code cannot build every shape itself)
        checkpoint = save_checkpoint(out_root, [*shape_overrides, *overrides])
        shape_overrides = [*(o for o in shape_overrides if not o.startswith("model.")), f"model.path={checkpoint}"]
        overrides = [o for o in overrides if not o.startswith("model.")]
    trainers = {}
    for mode in modes:
        cfg = load_config(None, [*COMMON, *shape_overrides, *overrides, *MODES[mode], f"trainer.steps={steps}",
                                 f"trainer.output_dir={out_root}/{mode}"])
        trainers[mode] = PAPOTrainer(cfg)
        trainers[mode].sampling.length_profile = spec.length_profile()
    if before:
        from before import Before
        worker = Before()
        worker.ask({"trainer": [*COMMON, *shape_overrides, *overrides, f"trainer.steps={steps}",
                                f"trainer.output_dir={out_root}/papo_before"], "lengths": spec.lengths})
        trainers["papo_before"] = worker
    return trainers


def save_checkpoint(out_root: str, overrides: list[str]) -> str:
    """The shape's model (random weights, seed 0, as every mode would build it) saved as a checkpoint folder."""
    from papo_engine.config import load_config
    from papo_engine.models import load_image_processor, load_policy, load_tokenizer
    cfg = load_config(None, overrides)
    tokenizer = load_tokenizer(cfg.model)
    path = f"{out_root}/checkpoint"
    load_policy(cfg.model, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    load_image_processor(cfg).save_pretrained(path)
    return path


def sigma_suffix(sigma: float) -> str:
    """A tail sweep's file-name part: _sigma0p8 (no dot: the file's suffix would eat it)."""
    return f"_sigma{sigma:g}".replace(".", "p")


def take_step(trainer, step: int) -> dict:
    return trainer.ask({"step": step}) if hasattr(trainer, "ask") else trainer.train_step(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per mode and repeat (the first is dropped)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh sets of trainers")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny",
                        help="benchmarks/shapes.py; not tiny: throughput_<device>_<shape>.*")
    parser.add_argument("--before", action=argparse.BooleanOptionalAction, default=None,
                        help="add papo_before (the code before the length-aware round); default: with a paper-mini "
                             "shape")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=ALGORITHMS,
                        help="the ratios to GRPO need grpo, papo_official and papo")
    parser.add_argument("--sigma", type=float, help="a paper-mini shape with this length tail (LengthProfile sigma)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every mode")
    args = parser.parse_args()
    spec = SHAPES[args.shape]
    if args.sigma is not None:
        spec = dataclasses.replace(spec, lengths={**spec.lengths, "sigma": args.sigma})
    before = bool(spec.lengths) if args.before is None else args.before
    sys.path.insert(0, str(ROOT))
    names = [*args.modes, *(["papo_before"] if before else [])]
    rows: dict[str, list[dict]] = {m: [] for m in names}  # per measured step
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            trainers = build_trainers(out, args.steps, spec, args.overrides, args.modes, before)
            for step in range(args.steps):
                last = {}
                for mode in names[step % len(names):] + names[:step % len(names)]:
                    last[mode] = take_step(trainers[mode], step)
                    if step > 0:
                        rows[mode].append(last[mode])
                print(f"[{repeat + 1}/{args.repeats}] step {step}: " + ", ".join(
                    f"{m} {last[m]['time/step']:.3f} s" for m in names), flush=True)
            for mode, trainer in trainers.items():
                trainer.close() if mode == "papo_before" else trainer.tracker.close()
    modes = {}
    for mode, steps in rows.items():
        cfg = trainers[names[0]].cfg  # every mode does the same work
        sequences = cfg.trainer.prompts_per_step * cfg.rollout.n
        step_s = statistics.median(r["time/step"] for r in steps)
        modes[mode] = {
            "step_s": step_s, "steps_measured": len(steps),
            "response_tokens_per_s": statistics.median(r["response_length"] * sequences / r["time/step"]
                                                       for r in steps),
            "phases_s": {p: statistics.median(r.get(f"time/{p}", 0.0) for r in steps) for p in PHASES},
            **{key: statistics.median(r[key] for r in steps) for key in LAYOUT if key in steps[0]},
        }

    def per_step(mode: str, over: str = "grpo", training_side: bool = False) -> list[float]:
        """The mode's step time over `over`'s, taken seconds before or after it (or step − rollout alone)."""
        def t(r):
            return r["time/step"] - (r.get("time/rollout", 0.0) if training_side else 0.0)
        return [t(a) / t(b) for a, b in zip(rows[mode], rows[over])]

    summary = {}
    if set(ALGORITHMS) <= set(names):
        summary = {"papo_official_over_grpo_step_time": statistics.median(per_step("papo_official")),
                   "papo_over_grpo_step_time": statistics.median(per_step("papo")),
                   "papo_official_over_grpo_training_side": statistics.median(
                       per_step("papo_official", training_side=True)),
                   "papo_over_grpo_training_side": statistics.median(per_step("papo", training_side=True))}
    for key in LAYOUT:
        if key in modes.get("papo", {}):
            summary[f"{key.split('/')[1]}"] = modes["papo"][key]
    if before and "papo" in names:
        summary["speedup_over_before"] = statistics.median(per_step("papo_before", over="papo"))
        summary["speedup_over_before_rollout"] = statistics.median(
            a["time/rollout"] / b["time/rollout"] for a, b in zip(rows["papo_before"], rows["papo"]))
        summary["speedup_over_before_training_side"] = statistics.median(
            per_step("papo_before", over="papo", training_side=True))
    report = {
        "device": device_name(), "platform": platform.platform(), "steps_per_run": args.steps,
        "repeats": args.repeats, "shape": args.shape, "shape_overrides": spec.run_overrides(),
        "imposed_lengths": spec.lengths or None, "overrides": args.overrides, "modes": modes,
        "micro_batch_tokens": trainers[names[0]].cfg.trainer.micro_batch_tokens,
        "per_step_ratios": ({m: per_step(m) for m in ("papo_official", "papo")} if set(ALGORITHMS) <= set(names)
                            else {}),
        "per_step_seconds": {m: [r["time/step"] for r in rows[m]] for m in names},
        "summary": summary,
    }
    suffix = ("" if args.shape == "tiny" else f"_{args.shape}") + ("" if args.sigma is None else sigma_suffix(args.sigma))
    write_results(Path(args.output) / f"throughput_{report['device']}{suffix}", report, table(report))


def table(report: dict) -> str:
    head = ["mode", "step (s)", "/ GRPO (paired)", "training side / GRPO's", "resp tok/s", "padding", "row util.",
            *[f"{p} (s)" for p in PHASES]]
    imposed = report.get("imposed_lengths")
    work = (f"; lengths imposed per response: median {imposed['median']}, cap {imposed['cap']}, sigma "
            f"{imposed['sigma']}" if imposed else "")
    lines = [f"# Throughput on {report['device']}, shape {report.get('shape', 'tiny')} ({report['steps_per_run']} steps "
             f"x {report['repeats']} runs, modes taking turns step by step; overrides: "
             f"{' '.join(report['overrides']) or 'none'}{work})", "",
             "Ratios: medians of the per-step ratios to the GRPO step taken seconds before or after; training side "
             "= step − rollout; padding = update/padding_fraction, row util. = rollout/row_utilization (medians).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    s = report["summary"]
    ratio = {"grpo": (1.0, 1.0), "papo_official": (s["papo_official_over_grpo_step_time"],
                                                    s["papo_official_over_grpo_training_side"]),
             "papo": (s["papo_over_grpo_step_time"], s["papo_over_grpo_training_side"])} if s.get(
        "papo_over_grpo_step_time") else {}
    for mode, m in report["modes"].items():
        over = ratio.get(mode)
        cells = [mode, f"{m['step_s']:.3f}", f"{over[0]:.3f}" if over else "", f"{over[1]:.3f}" if over else "",
                 f"{m['response_tokens_per_s']:.0f}",
                 *(f"{m[k]:.3f}" if k in m else "" for k in LAYOUT), *[f"{m['phases_s'][p]:.3f}" for p in PHASES]]
        lines.append("| " + " | ".join(cells) + " |")
    if "speedup_over_before" in s:
        lines += ["", f"PAPO step, the code before the length-aware round (1d94ad1) / now, paired by step: "
                      f"**{s['speedup_over_before']:.2f}x** (rollout {s['speedup_over_before_rollout']:.2f}x, training "
                      f"side {s['speedup_over_before_training_side']:.2f}x)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
