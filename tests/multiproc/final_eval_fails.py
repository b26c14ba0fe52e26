"""Run `papo train` with a final held-out evaluation that raises, to show the final model is saved before it.
Usage: final_eval_fails.py cli-args..."""
import sys

from papo_engine import cli, trainer


def failing_eval(*args, **kwargs):
    raise RuntimeError("evaluation failed on purpose")


trainer.held_out_accuracy = failing_eval
sys.exit(cli.main(sys.argv[1:]))
