"""Does the embedded default run learn on every seed? PAPO (the default) and GRPO (algo.gamma=0), seeds 0-4.

    python benchmarks/default_seeds.py --jobs 2           # 2 methods x 5 seeds x 200 steps, 2 runs at a time
    python benchmarks/default_seeds.py --seeds 0 --methods papo trainer.steps=2 warmup.steps=2 trainer.eval_samples=8

Each run is `papo train --config configs/tiny_cpu.yaml trainer.seed=<seed>` (plus the method's switch and any extra
overrides) in its own process, exactly as command 1 runs it, minus W&B, plots and checkpoints. The record is the
run's summary.json. --jobs N runs N trainings at once with (cores / N) torch threads each: two 2-thread torch
processes on 2 cores slow each other down many times over, two 1-thread ones do not. A run's numbers depend on
its thread count (float reductions change order), so the JSON records it; the method is what is compared, and
every seed of every method runs with the same count. The record is the
run's summary.json: held-out greedy accuracy on the 200 unseen eval images (chance 0.25) and the training reward
over the first and last 20% of steps. Writes benchmarks/results/default_seeds_<device>.{json,md}; the JSON's
"summary" holds mean, sample std, min and max per method, and whether every seed reached --threshold.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
import sys
import tempfile
import time
from pathlib import Path

from bench_device import device_name  # benchmarks/ is on sys.path: these run as scripts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = {"papo": [], "grpo": ["algo.gamma=0"]}
COMMON = ["logging.wandb=false", "logging.plot=false", "trainer.save_every=0", "trainer.save_final=false"]
KEYS = ("eval_accuracy", "reward_first_20pct", "reward_last_20pct")


def run_one(method: str, seed: int, overrides: list[str], out_root: str, threads: int) -> dict:
    out_dir = f"{out_root}/{method}_seed{seed}"
    argv = [sys.executable, "-m", "papo_engine.cli", "train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
            *COMMON, f"trainer.seed={seed}", f"trainer.output_dir={out_dir}", *METHODS[method], *overrides]
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(Path(out_dir, "summary.json").read_text())
    rewards = [json.loads(line)["reward"] for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    return {"method": method, "seed": seed, "argv": argv[3:], "torch_threads": threads, "minutes": (time.perf_counter() - started) / 60,
            **{k: summary[k] for k in KEYS}, "reward_per_step": [round(r, 4) for r in rewards]}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict], threshold: float) -> dict:
    summary = {"threshold": threshold}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {"seeds": [r["seed"] for r in mine],
                           **{k: _spread([r[k] for r in mine]) for k in KEYS},
                           "every_seed_reaches_threshold": all(r["eval_accuracy"] >= threshold for r in mine)}
    return summary


def table(report: dict) -> str:
    s = report["summary"]
    extra = "".join(f" {o}" for o in report.get("overrides", []))
    lines = [f"# Default run over seeds on {report['device']}: `papo train --config configs/tiny_cpu.yaml "
             f"trainer.seed=S{extra}`, {report['steps']} steps", "",
             "| method | seed | held-out accuracy | reward, first 20% | reward, last 20% | minutes |", "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['method']} | {r['seed']} | {r['eval_accuracy']:.3f} | {r['reward_first_20pct']:.3f} | "
                     f"{r['reward_last_20pct']:.3f} | {r['minutes']:.1f} |")
    lines += ["", f"Mean ± sample std (min–max) over seeds; chance accuracy 0.25, threshold {s['threshold']}:", "",
              "| method | held-out accuracy | reward, last 20% | every seed ≥ threshold |", "|---|---|---|---|"]
    for method in report["methods"]:
        if method not in s:
            continue
        acc, last = s[method]["eval_accuracy"], s[method]["reward_last_20pct"]
        lines.append(f"| {method} | {acc['mean']:.3f} ± {acc['std']:.3f} ({acc['min']:.3f}–{acc['max']:.3f}) | "
                     f"{last['mean']:.3f} ± {last['std']:.3f} | {s[method]['every_seed_reaches_threshold']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (each gets cores / jobs threads)")
    parser.add_argument("--threshold", type=float, default=0.45, help="held-out accuracy every seed must reach")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for default_seeds_<device>.{json,md}")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"default_seeds_{device_name()}"
    steps = next((o.split("=", 1)[1] for o in reversed(args.overrides) if o.startswith("trainer.steps=")), "200")
    report = {"device": device_name(), "platform": platform.platform(), "command": " ".join(sys.argv),
              "steps": int(steps), "jobs": args.jobs, "torch_threads": threads, "seeds": args.seeds, "methods": args.methods, "overrides": args.overrides, "runs": []}
    order = [(seed, method) for seed in args.seeds for method in args.methods]  # seed-major: partial = paired
    with tempfile.TemporaryDirectory() as out_root, ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, method, seed, args.overrides, out_root, threads) for seed, method in order]
        for future in futures:
            run = future.result()
            print(f"{run['method']} seed {run['seed']}: held-out {run['eval_accuracy']:.3f}, reward "
                  f"{run['reward_first_20pct']:.3f} -> {run['reward_last_20pct']:.3f} ({run['minutes']:.1f} min)",
                  flush=True)
            report["runs"].append(run)
            report["summary"] = summarize(report["runs"], args.threshold)
            stem.with_suffix(".json").write_text(json.dumps(report, indent=1))  # partial results survive a crash
    stem.with_suffix(".md").write_text(table(report))
    print(table(report))
    print(f"wrote {stem}.json, .md")


if __name__ == "__main__":
    main()
