"""`papo train | eval | export` — parse, validate, hand a config to the trainer. Config errors are one line, exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, TrainingStopped, config_help, load_config


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="papo", description="PAPO engine: perception-aware RL for VLMs")
    # the `deepspeed` launcher appends --local_rank=N; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            from .trainer import PAPOTrainer
            summary = PAPOTrainer(cfg, resume=args.resume).train()
            from . import distributed as dist_utils
            if dist_utils.is_main():
                print(json.dumps(summary, indent=2))
    except ConfigError as err:
        print(f"papo: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"papo: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
