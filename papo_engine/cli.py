"""`papo train | eval | export` — parse, validate, hand a config to the trainer.

Exit codes: 0 done; 2 a configuration or input error (one line); 1 training stopped (non-finite steps, full
disk, a rank or node lost: trainer.collective_timeout_s; one line, a checkpoint saved where possible); 143 / 130 stopped by SIGTERM / SIGINT (one line: what was
saved, or that nothing was yet, and how to continue; after the first step a checkpoint, `--resume` continues).
A `papo train` on an output folder another live run holds exits 2 (`runlock.py`).
"""
from __future__ import annotations

import argparse
import errno
import json
import sys

from .config import ConfigError, TrainingStopped, config_help, load_config
from .preemption import Preempted


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="run PAPO training",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run PAPO training. Settings come from the embedded tiny CPU default, then "
                                   "--config FILE, then key.sub=value overrides.",
                       epilog="overrides (key=default  (allowed) — meaning):\n" + config_help())
    p.add_argument("--config", help="YAML file (see configs/)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in trainer.output_dir from its latest complete checkpoint, or from "
                        "CHECKPOINT (a checkpoints/step-NNNNNN folder)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=20 algo.gamma=0.02")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="avg@k accuracy of a model directory on local benchmark files",
                       description="avg@k accuracy at temperature T over local benchmark files (the training data "
                                   "schema: problem, answer, images), a table on screen and a JSON report.")
    p.add_argument("--model", required=True, help="Hugging Face model directory (e.g. checkpoint-final or a "
                                                  "`papo export` output)")
    p.add_argument("--data", nargs="+", required=True, help="benchmark files: JSONL, Parquet or save_to_disk folders")
    p.add_argument("--k", type=int, default=8, help="responses per question (avg@k); default 8")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="eval.json", help="JSON report path (default eval.json)")
    p.add_argument("--config", help="YAML file for data/rollout/reward settings (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.max_new_tokens=2048")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="training checkpoint (any ZeRO stage) -> Hugging Face model directory")
    p.add_argument("checkpoint", help="a <output_dir>/checkpoints/step-NNNNNN folder")
    p.add_argument("out_dir", help="where to write config.json, model.safetensors, tokenizer and processor files "
                                   "(a LoRA run's: a PEFT adapter folder)")
    p.add_argument("--merged", action="store_true", help="a LoRA run's checkpoint: the model with the adapters "
                                                         "folded in, instead of the adapter folder")


def _lost_rank(err: RuntimeError) -> bool:
    """A collective failed because another rank is gone (its connection closed, or no answer in time)."""
    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return False
    text = str(err)
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo", "Connection closed by peer", "Connection reset by peer", "NCCL", "Timed out"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="papo", description="PAPO engine: perception-aware RL for VLMs")
    # the `deepspeed` launcher appends --local_rank=N; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _export_parser(sub)
    args = parser.parse_args(argv)
    if getattr(args, "resume", None) and "=" in args.resume:  # `--resume key=value`: an override, not a path
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    try:
        if args.command == "export":
            from .export import export_checkpoint
            print(f"papo: exported to {export_checkpoint(args.checkpoint, args.out_dir, args.merged)}")
            return 0
        if args.command == "eval":
            args.overrides = [f"model.path={args.model}", *args.overrides]
        cfg = load_config(args.config, args.overrides)
        if args.command == "eval":
            from pathlib import Path

            from .evaluation import evaluate_files, format_table
            report = evaluate_files(cfg, args.data, args.k, args.temperature, args.seed, Path(args.output))
            print(format_table(report))
            print(f"papo: report written to {args.output}")
        elif args.command == "train":
            from .preemption import StopSignals
            from .trainer import PAPOTrainer
            with StopSignals():  # SIGTERM / SIGINT in any stage: stopped at the next safe point (preemption.py)
                summary = PAPOTrainer(cfg, resume=args.resume).train()
            from . import distributed as dist_utils
            if dist_utils.is_main():
                print(json.dumps(summary, indent=2))
            dist_utils.leave_together()
    except ConfigError as err:
        from . import distributed as dist_utils
        together = getattr(err, "main_only", False)  # raised on every rank at once (the run lock, a bad reward)
        if not together or dist_utils.is_main():  # then rank 0 names it, for the job
            print(f"papo: error: {err}", file=sys.stderr, flush=True)
        if together:
            dist_utils.leave_together()
        return 2
    except Preempted as err:  # SIGTERM / SIGINT: a checkpoint was saved; 128 + the signal number
        from . import distributed as dist_utils
        if dist_utils.is_main():  # every rank stops at the same step; one line for the job
            print(f"papo: stopped: {err}", file=sys.stderr, flush=True)
        dist_utils.leave_together()
        return err.exit_code
    except TrainingStopped as err:
        print(f"papo: stopped: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if not _lost_rank(err):
            raise
        from .checkpoint import newest_text
        newest = newest_text(cfg.trainer.output_dir)
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]
        print(f"papo: stopped: lost contact with another rank (a node lost or a rank killed; a collective waits "
              f"trainer.collective_timeout_s={cfg.trainer.collective_timeout_s:g} s): {first}; {newest}: continue "
              f"with --resume once every node is back", file=sys.stderr, flush=True)
        return 1
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"papo: error: no space left on device: {err.filename or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
