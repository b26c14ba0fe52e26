"""Training throughput: GRPO vs PAPO (`official`: masked log-probs from the rollout-time no-grad pass) vs PAPO
(default: gradient through both branches, original and masked images in one 2B forward), in one run.

    python benchmarks/throughput.py                      # tiny default model on this machine
    python benchmarks/throughput.py --steps 8 --repeats 3 model.path=/data/Qwen2.5-VL-3B-Instruct ...

Same config, data and seed for every mode; only the algorithm switches differ. Modes are alternated
(grpo, official, papo, grpo, ...) so drifts of a shared machine hit all of them alike. Each run trains
--steps steps in this process; its first step is dropped (allocations, kernel JIT) and the median of the rest is
the run's step time; a mode's time is the median over its runs. Writes
benchmarks/results/throughput_<device>.{json,md}; the JSON's "summary" holds the two ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = {
    "grpo": ["algo.gamma=0", "algo.eta_orig=0", "algo.eta_mask=0"],
    "papo_official": ["algo.official=true"],
    "papo": [],
}
PHASES = ["rollout", "weight_sync", "advantages", "old_logprobs", "update"]
# measurement runs only: no warm-start, evaluation, checkpoints or logging services
COMMON = ["warmup.steps=0", "trainer.eval_samples=1", "trainer.save_every=0", "trainer.save_final=false",
          "logging.wandb=false", "logging.plot=false"]


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "_")
    return f"cpu_{os.cpu_count()}cores"


def run_mode(mode: str, steps: int, overrides: list[str]) -> dict:
    from papo_engine.config import load_config
    from papo_engine.trainer import PAPOTrainer
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [*COMMON, *overrides, *MODES[mode], f"trainer.steps={steps}",
                                 f"trainer.output_dir={out}"])
        trainer = PAPOTrainer(cfg)
        trainer.train()
        rows = trainer.history[1:]  # the first step pays one-off costs
    step = statistics.median(r["time/step"] for r in rows)
    return {
        "step_s": step,
        "phases_s": {p: statistics.median(r.get(f"time/{p}", 0.0) for r in rows) for p in PHASES},
        "response_tokens_per_step": statistics.median(r["response_length"] for r in rows)
        * cfg.trainer.prompts_per_step * cfg.rollout.n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is dropped)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternated")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every mode")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            result = run_mode(mode, args.steps, args.overrides)
            runs[mode].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {mode:14s} step {result['step_s']:.3f} s", flush=True)
    modes = {}
    for mode, results in runs.items():
        step = statistics.median(r["step_s"] for r in results)
        tokens = statistics.median(r["response_tokens_per_step"] for r in results)
        modes[mode] = {
            "step_s": step, "step_s_runs": [r["step_s"] for r in results],
            "response_tokens_per_s": tokens / step,
            "phases_s": {p: statistics.median(r["phases_s"][p] for r in results) for p in PHASES},
        }
    grpo = modes["grpo"]["step_s"]
    report = {
        "device": device_name(), "platform": platform.platform(), "steps_per_run": args.steps,
        "repeats": args.repeats, "overrides": args.overrides, "modes": modes,
        "summary": {"papo_official_over_grpo_step_time": modes["papo_official"]["step_s"] / grpo,
                    "papo_over_grpo_step_time": modes["papo"]["step_s"] / grpo},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"throughput_{report['device']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(table(report))
    print(table(report))


def table(report: dict) -> str:
    head = ["mode", "step (s)", "/ GRPO", "resp tok/s", *[f"{p} (s)" for p in PHASES]]
    lines = [f"# Throughput on {report['device']} ({report['steps_per_run']} steps x {report['repeats']} runs "
             f"per mode, alternated; overrides: {' '.join(report['overrides']) or 'none'})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    grpo = report["modes"]["grpo"]["step_s"]
    for mode, m in report["modes"].items():
        cells = [mode, f"{m['step_s']:.3f}", f"{m['step_s'] / grpo:.3f}", f"{m['response_tokens_per_s']:.0f}",
                 *[f"{m['phases_s'][p]:.3f}" for p in PHASES]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
