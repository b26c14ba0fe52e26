"""Run `papo train` and send this very process a real SIGTERM or SIGINT in one stage: `build` (while the model
is built), `warmup` (during the second warm-up step), `rollout` (during the first rollout), `save` (while
checkpoint step-000002 is written) or `final_eval` (during the final evaluation).
Usage: signal_in_stage.py STAGE SIGTERM|SIGINT cli-args..."""
import os
import signal
import sys

from papo_engine import checkpoint, cli, trainer, warmup

stage, name, *argv = sys.argv[1:]
signum = getattr(signal, name)
calls = {"n": 0}


def signalling(real, when=lambda *a, **k: True):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if when(*args, **kwargs):
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    return wrapper


if stage == "build":
    trainer.load_policy = signalling(trainer.load_policy)
elif stage == "warmup":
    warmup.response_hidden = signalling(warmup.response_hidden, lambda *a, **k: calls["n"] == 2)
elif stage == "rollout":
    trainer.PAPOTrainer.generate = signalling(trainer.PAPOTrainer.generate, lambda *a, **k: calls["n"] == 1)
elif stage == "save":
    checkpoint._fsync_dir_files = signalling(checkpoint._fsync_dir_files,
                                             lambda folder: folder.name == "step-000002.tmp")
elif stage == "final_eval":
    trainer.held_out_accuracy = signalling(trainer.held_out_accuracy)
else:
    raise SystemExit(f"unknown stage {stage}")
sys.exit(cli.main(argv))
