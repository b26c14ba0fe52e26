"""How far one optimizer step moves the weights in the hint task's first steps (the early-collapse question).

    python benchmarks/update_size.py --seeds 4 --steps 6 --arm lr_1e-3=optim.lr=0.001 --arm lr_5e-4=

Each run is mini_repro.py's (same task, warm-start and method overrides; --method picks one of its METHODS), cut
after --steps training steps. Per step it records the batch's answer-format fraction and gradient norm, and from
the weights before and after the optimizer step: the whole model's relative change ||Δθ|| / ||θ||, each tensor's
relative change (the largest five named), and how many coordinates Adam moved by more than lr/2 although their
gradient scale (the root of Adam's bias-corrected second moment) is below 1e-6. Adam's step is about lr per
coordinate whatever the gradient's size, so at a fixed lr the relative change is set by the weights' scale.
Writes benchmarks/results/mini_repro_update_size_<device>.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench_device import device_name  # benchmarks/ is on sys.path: these run as scripts
from mini_repro import METHODS, run_overrides

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TINY_GRADIENT = 1e-6


def adam_state(optimizer, param) -> dict | None:
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):  # DeepSpeed may wrap the torch optimizer
        if candidate is not None and param in getattr(candidate, "state", {}):
            return candidate.state[param]
    return None


def measure_run(seed: int, method: str, steps: int, overrides: list[str]) -> list[dict]:
    from papo_engine.config import load_config
    from papo_engine.trainer import PAPOTrainer

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_config(None, run_overrides(method, seed, out_dir, extra=overrides))
        trainer = PAPOTrainer(cfg)
        beta2 = cfg.optim.betas[1]
        named = [(n, p) for n, p in trainer.engine.module.named_parameters() if p.requires_grad]
        rows = []
        for step in range(steps):
            before = [p.detach().clone() for _, p in named]
            metrics = trainer.train_step(step)
            lr, moved_sq, total_sq, tiny_moved, coords, per_tensor = metrics["lr"], 0.0, 0.0, 0, 0, []
            for (name, param), old in zip(named, before):
                delta = param.detach() - old
                moved_sq += float(delta.pow(2).sum())
                total_sq += float(old.pow(2).sum())
                coords += delta.numel()
                per_tensor.append((float(delta.norm() / old.norm().clamp_min(1e-12)), name))
                state = adam_state(trainer.engine.optimizer, param)
                if state:
                    gradient_scale = (state["exp_avg_sq"] / (1 - beta2 ** int(state["step"]))).sqrt()
                    tiny_moved += int(((gradient_scale < TINY_GRADIENT) & (delta.abs() > lr / 2)).sum())
            per_tensor.sort(reverse=True)
            rows.append({"step": step, "format": metrics["format"], "grad_norm": metrics["grad_norm"], "lr": lr,
                         "relative_change": (moved_sq / total_sq) ** 0.5,
                         "tiny_gradient_coords_moved_over_half_lr": tiny_moved / coords,
                         "largest_tensor_changes": [{"tensor": n, "relative_change": c} for c, n in per_tensor[:5]]})
            print(f"seed {seed} step {step}: format {metrics['format']:.2f}, grad norm {metrics['grad_norm']:.3f}, "
                  f"||dθ||/||θ|| {rows[-1]['relative_change']:.4f}, largest {per_tensor[0][1]} "
                  f"{per_tensor[0][0]:.3f}", flush=True)
        trainer.tracker.close()
    return rows


def table(report: dict) -> str:
    lines = [f"# One optimizer step's size in the hint task's first steps ({report['device']}, {report['date']})", "",
             f"Method {report['method']}. ||Δθ||/||θ||: the whole model's relative change in that step; tiny-gradient "
             f"moved: the share of coordinates with gradient scale < {TINY_GRADIENT:g} that moved by > lr/2.", "",
             "| arm | seed | step | format | grad norm | ‖Δθ‖/‖θ‖ | largest tensor change | tiny-gradient moved |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, runs in report["arms"].items():
        for seed, rows in runs.items():
            for row in rows:
                top = row["largest_tensor_changes"][0]
                lines.append(f"| {arm} | {seed} | {row['step']} | {row['format']:.2f} | {row['grad_norm']:.3f} | "
                             f"{row['relative_change']:.4f} | {top['relative_change']:.3f} ({top['tensor']}) | "
                             f"{row['tiny_gradient_coords_moved_over_half_lr']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[4])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--method", default="papo_g", choices=list(METHODS))
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=OVERRIDES",
                        help="a name and space-separated key=value overrides (may be empty); repeat per arm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)  # numbers depend on the thread count; one thread, as mini_repro's runs
    report = {"device": device_name(), "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "method": args.method, "steps": args.steps, "torch_threads": 1, "arms": {}}
    for spec in args.arm:
        name, _, overrides = spec.partition("=")
        report["arms"][name] = {str(seed): measure_run(seed, args.method, args.steps, overrides.split())
                                for seed in args.seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mini_repro_update_size_{device_name()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
