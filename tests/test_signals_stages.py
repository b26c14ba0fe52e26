"""SIGTERM / SIGINT in every stage of `papo train` (a real signal, sent by the process to itself at a chosen
moment, tests/multiproc/signal_in_stage.py): model building, the warm-up, the first rollout, a checkpoint write,
the final evaluation. Each ends with one line saying what was saved (or that nothing was yet) and how to go on,
exit 143 / 130; a warm-up stopped before its end is redone on the next start, which says so."""
import subprocess
import sys

import pytest

from tests.test_resume import ROOT, _cmd, _env, _metrics, _papo_lines, ckpt_steps

FAST = ["logging.wandb=false", "data.train_size=16", "data.eval_size=4", "trainer.eval_samples=2",
        "rollout.max_new_tokens=4"]


def _signalled(stage, signame, out, *overrides, code):
    cmd = [sys.executable, str(ROOT / "tests" / "multiproc" / "signal_in_stage.py"), stage, signame,
           *_cmd(out, *FAST, *overrides)[3:]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert result.returncode == code, result.stderr[-3000:]
    lines = _papo_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"papo: stopped: {signame} received"), lines
    return lines[0], result.stdout


@pytest.mark.slow
def test_sigterm_during_model_building_says_nothing_was_saved(tmp_path):
    line, _ = _signalled("build", "SIGTERM", tmp_path, "trainer.steps=2", code=143)
    assert "during model building: nothing was saved yet; run the same command again" in line
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_sigint_during_the_warmup_is_redone_on_the_next_start(tmp_path):
    """Stopped in the warm-up: nothing saved, the line says the warm-up is redone; the same command again says it
    redoes it — and a SIGTERM during that start's first rollout stops after step 1 with its checkpoint."""
    run = ["trainer.steps=3", "warmup.steps=3", "trainer.save_every=0"]
    line, _ = _signalled("warmup", "SIGINT", tmp_path, *run, code=130)
    assert "during the warm-up (step 2 of 3): the warm-up is redone from its start on the next run" in line
    assert "nothing was saved yet" in line and not (tmp_path / "metrics.jsonl").exists()
    line, stdout = _signalled("rollout", "SIGTERM", tmp_path, *run, code=143)
    assert "the previous start was stopped during the warm-up" in stdout and "redoing it" in stdout, stdout
    assert f"saved {tmp_path / 'checkpoints' / 'step-000001'} after step 1 of 3; continue with --resume" in line
    assert ckpt_steps(tmp_path) == [1] and [r["step"] for r in _metrics(tmp_path)] == [0]
    assert not (tmp_path / "warmup_stopped.json").exists()


@pytest.mark.slow
def test_sigterm_while_a_checkpoint_is_written_stops_after_it(tmp_path):
    line, _ = _signalled("save", "SIGTERM", tmp_path, "trainer.steps=3", "trainer.save_every=2", "warmup.steps=0",
                         code=143)
    assert f"saved {tmp_path / 'checkpoints' / 'step-000002'} after step 2 of 3" in line
    assert ckpt_steps(tmp_path) == [2] and len(_metrics(tmp_path)) == 2


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_says_the_run_is_complete(tmp_path):
    line, _ = _signalled("final_eval", "SIGTERM", tmp_path, "trainer.steps=1", "trainer.save_every=0",
                         "warmup.steps=0", code=143)
    assert "during the final evaluation: training finished (all 1 steps) and evaluated" in line
    assert str(tmp_path / "checkpoint-final") in line and "nothing to continue" in line
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "checkpoint-final" / "model.safetensors").is_file()
