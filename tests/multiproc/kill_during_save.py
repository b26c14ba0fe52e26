"""Run `papo train` and SIGKILL this very process in the middle of writing checkpoint step-KILL_STEP (model and
optimizer files written, COMPLETE not yet). Usage: kill_during_save.py KILL_STEP cli-args..."""
import os
import signal
import sys

from papo_engine import checkpoint, cli

kill_step, *argv = sys.argv[1:]
real_fsync = checkpoint._fsync_dir_files


def fsync_then_die(folder):
    real_fsync(folder)
    if folder.name == f"step-{int(kill_step):06d}.tmp":
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint._fsync_dir_files = fsync_then_die
sys.exit(cli.main(argv))
