"""The early phase of the hint task side by side: which arms (config overrides) break the answer format, how often.

    python benchmarks/mini_repro.py --seeds 0 1 2 3 4 5 6 --steps 600 --stop-after 100 --eval-every 25 \\
        --eval-samples 50 --out /tmp/arm_a [key=value ...]                       # one such run per arm
    python benchmarks/early_phase.py --question "..." a=/tmp/arm_a/mini_repro_cpu_2cores.json b=...

Each NAME=FILE is one arm: a mini_repro JSON (its "runs") or an earlier early-phase JSON (all its arms, carried
forward under their own names; NAME is then ignored). A break is a training step whose batch has an answer-format
fraction below BREAK_FORMAT: the think/box structure lost by most responses. Per arm and method: runs with a break,
broken steps per seed, the lowest format fraction, and held-out hint-wrong accuracy at the last evaluation.
Writes benchmarks/results/mini_repro_early_phase_<device>.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

from bench_device import device_name  # benchmarks/ is on sys.path: these run as scripts
from mini_repro import BREAK_FORMAT, broken_steps

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def summarize_arm(runs: list[dict]) -> dict:
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        final_accuracy = [r["curve"][-1]["hint_wrong"]["accuracy"] for r in mine]
        summary[method] = {
            "seeds": [r["seed"] for r in mine],
            "runs_with_a_break": sum(bool(broken_steps(r)) for r in mine),
            "broken_steps": [len(broken_steps(r)) for r in mine],
            "first_break_step": [(broken_steps(r) or [None])[0] for r in mine],
            "lowest_format": min(row["format"] for r in mine for row in r["train"]),
            "last_eval_step": mine[0]["curve"][-1]["step"],
            "hint_wrong_acc_at_last_eval": {
                "mean": statistics.fmean(final_accuracy),
                "std": statistics.stdev(final_accuracy) if len(final_accuracy) > 1 else 0.0,
                "values": final_accuracy}}
    return summary


def load_arms(specs: list[str]) -> tuple[dict, dict]:
    """{arm: [run, ...]} and {arm: command} from NAME=FILE specs."""
    arms, commands = {}, {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise SystemExit(f"early_phase: {spec!r}: expected NAME=FILE")
        try:
            data = json.loads(Path(file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"early_phase: {file}: cannot read a JSON ({err})")
        if "arms" in data:
            arms.update(data["arms"])
            commands.update(data.get("commands", {}))
        elif "runs" in data:
            arms[name] = [{k: run[k] for k in ("method", "seed", "train", "curve")} for run in data["runs"]]
            commands[name] = data.get("command", "")
        else:
            raise SystemExit(f"early_phase: {file}: neither a mini_repro JSON (runs) nor an early-phase one (arms)")
    return arms, commands


def table(report: dict) -> str:
    lines = [f"# Early phase of the hint task: {report['question']} ({report['device']}, {report['date']})", "",
             f"Break = a step whose training batch has format < {BREAK_FORMAT}. Held-out hint-wrong accuracy at the "
             "last evaluation (greedy).", "",
             "| arm | method | runs with a break | broken steps (sum; per seed) | first break | lowest format "
             "| hint-wrong acc at last eval, mean ± std | per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, summary in report["summary"].items():
        for method, s in summary.items():
            acc = s["hint_wrong_acc_at_last_eval"]
            first = ", ".join("–" if step is None else str(step) for step in s["first_break_step"])
            lines.append(f"| {arm} | {method} | {s['runs_with_a_break']} / {len(s['seeds'])} | "
                         f"{sum(s['broken_steps'])} ({', '.join(map(str, s['broken_steps']))}) | {first} | "
                         f"{s['lowest_format']:.2f} | {acc['mean']:.2f} ± {acc['std']:.2f} (step {s['last_eval_step']}) | "
                         f"{', '.join(f'{v:.2f}' for v in acc['values'])} |")
    lines += ["", "Commands:", ""] + [f"- {arm}: `{cmd}`" for arm, cmd in report["commands"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arms", nargs="+", metavar="NAME=FILE")
    parser.add_argument("--question", required=True, help="what the arms compare, one line")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    arms, commands = load_arms(args.arms)
    report = {"device": device_name(), "date": datetime.date.today().isoformat(), "question": args.question,
              "break_threshold": f"training-batch format fraction < {BREAK_FORMAT} at a step",
              "commands": commands, "summary": {arm: summarize_arm(runs) for arm, runs in arms.items()},
              "arms": arms}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mini_repro_early_phase_{device_name()}"
    stem.with_suffix(".json").write_text(json.dumps(report))  # ~50 runs of per-step rows: no indent
    stem.with_suffix(".md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
