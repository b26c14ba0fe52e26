"""Crash safety: resume after a SIGKILL continues bit for bit, a kill while a checkpoint is written leaves the
previous one usable, non-finite steps are skipped without touching the parameters, and a new run never
overwrites an old one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["warmup.steps=2", "trainer.prompts_per_step=4", "rollout.n=2", "trainer.micro_batch_size=4",
         "trainer.eval_samples=4", "rollout.max_new_tokens=8", "logging.plot=false"]


def _env():
    return dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")


def _cmd(out, *overrides, resume=False):
    return [sys.executable, "-m", "papo_engine.cli", "train", f"trainer.output_dir={out}", *SMALL, *overrides,
            *(["--resume"] if resume else [])]


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _weights(out):
    return load_file(out / "checkpoint-final" / "model.safetensors")


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900, **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _assert_same_run(a, b):
    assert _metrics(a) == _metrics(b)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    _run(_cmd(out, "trainer.steps=6", "trainer.save_every=3"))
    return out


def test_sigkill_then_resume_is_bitwise_identical(straight_run, tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path, "trainer.steps=6", "trainer.save_every=3"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = tmp_path / "checkpoints" / "step-000003" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "checkpoint-final").exists()
    result = _run(_cmd(tmp_path, "trainer.steps=6", "trainer.save_every=3", resume=True))
    assert "resumed from" in result.stdout and "step 3" in result.stdout
    _assert_same_run(straight_run, tmp_path)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(straight_run, tmp_path):
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "multiproc" / "kill_during_save.py"), "6",
                             *_cmd(tmp_path, "trainer.steps=6", "trainer.save_every=3")[3:]],
                            capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "step-000006.tmp" / "deepspeed").is_dir()  # the interrupted write is there, partial
    assert not (checkpoints / "step-000006").exists()
    result = _run(_cmd(tmp_path, "trainer.steps=6", "trainer.save_every=3", resume=True))
    assert "resumed from" in result.stdout and "step-000003" in result.stdout
    assert not (checkpoints / "step-000006.tmp").exists()
    _assert_same_run(straight_run, tmp_path)  # steps 3..5 re-done exactly as in the straight run


def test_keep_last_checkpoints(straight_run):
    names = sorted(p.name for p in (straight_run / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000006"]  # keep_last=2, nothing partial left


def _nonfinite(tmp_path, nan_steps, *overrides):
    verdict_file = tmp_path / "verdict.json"
    _run([sys.executable, str(ROOT / "tests" / "multiproc" / "nonfinite_run.py"), str(verdict_file),
          str(tmp_path / "run"), nan_steps, *SMALL, *overrides])
    return json.loads(verdict_file.read_text()), _metrics(tmp_path / "run")


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_nonfinite_loss_skips_the_step_and_training_goes_on(tmp_path, zero_stage):
    verdict, rows = _nonfinite(tmp_path, "1", "trainer.steps=3", f"deepspeed.zero_stage={zero_stage}",
                               "trainer.save_every=0", "trainer.save_final=false")
    assert verdict["changed"] == {"0": True, "1": False, "2": True}
    assert verdict["stopped"] is None and verdict["finite_params"]
    assert [r["nonfinite/skipped_step"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["nonfinite/skipped_total"] for r in rows] == [0, 1, 1]


def test_consecutive_nonfinite_steps_stop_the_run_after_a_checkpoint(tmp_path):
    verdict, rows = _nonfinite(tmp_path, "1,2", "trainer.steps=5", "trainer.max_nonfinite_steps=2",
                               "trainer.save_every=0")
    assert "2 consecutive steps" in verdict["stopped"] and "step-000003" in verdict["stopped"]
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    assert len(rows) == 3 and verdict["finite_params"]


def test_new_run_refuses_an_output_dir_holding_a_run(straight_run):
    result = subprocess.run(_cmd(straight_run, "trainer.steps=6"), capture_output=True, text=True, cwd=ROOT,
                            env=_env(), timeout=300)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_resume_with_other_settings_is_refused(straight_run):
    result = subprocess.run(_cmd(straight_run, "trainer.steps=6", "algo.gamma=0.5", resume=True),
                            capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert result.returncode == 2
    assert "algo.gamma: 0.02 -> 0.5" in result.stderr
