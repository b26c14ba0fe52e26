"""Training throughput: GRPO vs PAPO (`official`: the masked branch as no-grad constants, the authors' way) vs PAPO
(default: gradient through both branches, original and masked images in one 2B forward), in one run.

    python benchmarks/throughput.py                      # tiny default model on this machine
    python benchmarks/throughput.py --steps 8 --repeats 3 model.path=/data/Qwen2.5-VL-3B-Instruct ...
    python benchmarks/throughput.py --shape tiny-vocab152k   # the tiny body with Qwen's 151,936-token vocabulary

Same config, data and seed for every mode; only the algorithm switches differ. The three trainers live in one
process and take their steps in turn (step k of each mode back to back, the order rotating every step), so a
shared machine's drifts hit all modes alike. The first step of each run is dropped (allocations, kernel JIT).
A mode's step time is the median over its steps; a ratio is the median over steps of (mode / GRPO) at the
same step, measured seconds apart. --repeats builds fresh trainers again. Writes
benchmarks/results/throughput_<device>.{json,md}; the JSON's "summary" holds the two ratios.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from papo_engine.config import official_overrides

from bench_device import device_name  # benchmarks/ is on sys.path: these run as scripts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = {
    "grpo": ["algo.gamma=0", "algo.eta_orig=0", "algo.eta_mask=0"],
    "papo_official": official_overrides(),  # the authors' computation, raw-image masking included
    "papo": [],
}
PHASES = ["rollout", "weight_sync", "advantages", "old_logprobs", "update"]
# measurement runs only: no warm-start, evaluation, checkpoints or logging services
COMMON = ["warmup.steps=0", "trainer.eval_samples=1", "trainer.save_every=0", "trainer.save_final=false",
          "logging.wandb=false", "logging.plot=false"]


def build_trainers(out_root: str, steps: int, overrides: list[str]) -> dict:
    from papo_engine.config import load_config
    from papo_engine.trainer import PAPOTrainer
    trainers = {}
    for mode, switches in MODES.items():
        cfg = load_config(None, [*COMMON, *overrides, *switches, f"trainer.steps={steps}",
                                 f"trainer.output_dir={out_root}/{mode}"])
        trainers[mode] = PAPOTrainer(cfg)
    return trainers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per mode and repeat (the first is dropped)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh sets of trainers")
    parser.add_argument("--shape", choices=["tiny", "tiny-vocab152k"], default="tiny",
                        help="model.architecture; not tiny: throughput_<device>_<shape>.*")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every mode")
    args = parser.parse_args()
    if args.shape != "tiny":
        args.overrides = [f"model.architecture={args.shape}", *args.overrides]
    sys.path.insert(0, str(ROOT))
    names = list(MODES)
    rows: dict[str, list[dict]] = {m: [] for m in names}  # per measured step
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            trainers = build_trainers(out, args.steps, args.overrides)
            for step in range(args.steps):
                for mode in names[step % 3:] + names[:step % 3]:
                    metrics = trainers[mode].train_step(step)
                    if step > 0:
                        rows[mode].append(metrics)
                print(f"[{repeat + 1}/{args.repeats}] step {step}: " + ", ".join(
                    f"{m} {trainers[m].history[-1]['time/step']:.3f} s" for m in names), flush=True)
            for trainer in trainers.values():
                trainer.tracker.close()
    modes = {}
    for mode, steps in rows.items():
        sequences = trainers[mode].cfg.trainer.prompts_per_step * trainers[mode].cfg.rollout.n
        step_s = statistics.median(r["time/step"] for r in steps)
        modes[mode] = {
            "step_s": step_s, "steps_measured": len(steps),
            "response_tokens_per_s": statistics.median(r["response_length"] * sequences / r["time/step"]
                                                       for r in steps),
            "phases_s": {p: statistics.median(r.get(f"time/{p}", 0.0) for r in steps) for p in PHASES},
        }

    def per_step(mode: str, training_side: bool = False) -> list[float]:
        """The mode's step time over the GRPO step taken seconds before or after it (or step − rollout alone)."""
        def t(r):
            return r["time/step"] - (r.get("time/rollout", 0.0) if training_side else 0.0)
        return [t(a) / t(b) for a, b in zip(rows[mode], rows["grpo"])]

    report = {
        "device": device_name(), "platform": platform.platform(), "steps_per_run": args.steps,
        "repeats": args.repeats, "shape": args.shape, "overrides": args.overrides, "modes": modes,
        "per_step_ratios": {m: per_step(m) for m in ("papo_official", "papo")},
        "summary": {"papo_official_over_grpo_step_time": statistics.median(per_step("papo_official")),
                    "papo_over_grpo_step_time": statistics.median(per_step("papo")),
                    "papo_official_over_grpo_training_side": statistics.median(per_step("papo_official", True)),
                    "papo_over_grpo_training_side": statistics.median(per_step("papo", True))},
    }
    suffix = "" if args.shape == "tiny" else f"_{args.shape}"
    write_results(Path(args.output) / f"throughput_{report['device']}{suffix}", report, table(report))


def write_results(stem: Path, report: dict, table_text: str) -> None:
    """`stem`.json (the report) and `stem`.md (its table), and the table on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(table_text)
    print(table_text)


def table(report: dict) -> str:
    head = ["mode", "step (s)", "/ GRPO (paired)", "training side / GRPO's", "resp tok/s",
            *[f"{p} (s)" for p in PHASES]]
    lines = [f"# Throughput on {report['device']} ({report['steps_per_run']} steps x {report['repeats']} runs, "
             f"modes taking turns step by step; overrides: {' '.join(report['overrides']) or 'none'})", "",
             "Ratios: medians of the per-step ratios to the GRPO step taken seconds before or after; training side "
             "= step − rollout.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    s = report["summary"]
    ratio = {"grpo": (1.0, 1.0), "papo_official": (s["papo_official_over_grpo_step_time"],
                                                    s["papo_official_over_grpo_training_side"]),
             "papo": (s["papo_over_grpo_step_time"], s["papo_over_grpo_training_side"])}
    for mode, m in report["modes"].items():
        cells = [mode, f"{m['step_s']:.3f}", f"{ratio[mode][0]:.3f}", f"{ratio[mode][1]:.3f}",
                 f"{m['response_tokens_per_s']:.0f}", *[f"{m['phases_s'][p]:.3f}" for p in PHASES]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
