"""Run `papo train`, parked after every step while HOLD_FILE exists (a stand-in for a long step: the run holds its
folder and can be signalled between steps). A SIGTERM/SIGINT ends the parking at once. With PARK_FROM_STEP=k in
the environment, only after steps that complete step k or later. Usage: park_after_steps.py HOLD_FILE cli-args..."""
import os
import sys
import time
from pathlib import Path

from papo_engine import cli, preemption, trainer

hold, *argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
real_step = trainer.PAPOTrainer.train_step


def step_then_park(self, step):
    metrics = real_step(self, step)
    while step + 1 >= int(os.environ.get("PARK_FROM_STEP", "0")) and Path(hold).exists() and not (preemption._ACTIVE and preemption._ACTIVE[-1].received):
        time.sleep(0.05)
    return metrics


trainer.PAPOTrainer.train_step = step_then_park
sys.exit(cli.main(argv))
