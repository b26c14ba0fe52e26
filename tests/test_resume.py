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
pytestmark = pytest.mark.slow  # trainings in subprocesses, killed and resumed
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


@pytest.mark.parametrize("zero_stage, offload", [(0, False), (2, False), (3, False), (2, True), (3, True)])
def test_nonfinite_loss_skips_the_step_and_training_goes_on(tmp_path, zero_stage, offload):
    """Also with the optimizer offloaded to the CPU, where ZeRO-3 never fills `averaged_gradients`."""
    verdict, rows = _nonfinite(tmp_path, "1", "trainer.steps=3", f"deepspeed.zero_stage={zero_stage}",
                               f"deepspeed.offload_optimizer={str(offload).lower()}",
                               "trainer.save_every=0", "trainer.save_final=false")
    assert verdict["changed"] == {"0": True, "1": False, "2": True}
    if zero_stage == 3:  # the engine's guard itself saw the NaN gradients, also with the optimizer offloaded
        assert verdict["zero3_guard"] == {"0": False, "1": True, "2": False}
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
    # one step more: a finished run (all trainer.steps done) is not resumed at all
    result = subprocess.run(_cmd(straight_run, "trainer.steps=7", "algo.gamma=0.5", resume=True),
                            capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert result.returncode == 2
    assert "algo.gamma: 0.02 -> 0.5" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# pre-emption, damaged checkpoints, runs that stopped before their first checkpoint, moved runs


def _wait_for_metrics_lines(out, count, proc, timeout=600):
    deadline = time.time() + timeout
    path = out / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)


def _papo_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("papo:")]


def test_sigint_saves_a_checkpoint_and_resume_is_bitwise_identical(straight_run, tmp_path):
    """A real SIGINT after the first step: the step in progress finishes, a checkpoint is written, one line is
    printed and the exit code is 130; --resume then gives the uninterrupted run's metrics and weights exactly."""
    proc = subprocess.Popen(_cmd(tmp_path, "trainer.steps=6", "trainer.save_every=3"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_metrics_lines(tmp_path, 1, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-3000:]
    saved = ckpt_steps(tmp_path)
    assert saved and saved[-1] < 6, saved  # stopped early, with a checkpoint of the steps done
    lines = _papo_lines(stderr)
    assert len(lines) == 1 and "SIGINT" in lines[0] and f"step-{saved[-1]:06d}" in lines[0], stderr[-2000:]
    assert len(_metrics(tmp_path)) == saved[-1]  # every finished step was logged (flushed) before the exit
    assert not (tmp_path / "checkpoint-final").exists()
    result = _run(_cmd(tmp_path, "trainer.steps=6", "trainer.save_every=3", resume=True))
    assert f"step {saved[-1]}" in result.stdout
    _assert_same_run(straight_run, tmp_path)


def ckpt_steps(out):
    return [int(p.name.split("-")[1]) for p in sorted((out / "checkpoints").glob("step-*"))
            if (p / "COMPLETE").is_file()]


def _copy_run(run, dest):
    import shutil
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("wandb"))
    return dest


def _fails(cmd, code=2):
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert result.returncode == code, result.stderr[-3000:]
    lines = _papo_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def test_damaged_newest_checkpoint_is_named_and_metrics_are_kept(straight_run, tmp_path):
    run = _copy_run(straight_run, tmp_path / "run")
    shard = next((run / "checkpoints" / "step-000006" / "deepspeed").rglob("*.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated, as by a disk failure
    before = (run / "metrics.jsonl").read_text()
    line = _fails(_cmd(run, "trainer.steps=7", "trainer.save_every=3", resume=True))  # a finished run is not resumed
    assert str(shard) in line and f"--resume {run / 'checkpoints' / 'step-000003'}" in line
    assert (run / "metrics.jsonl").read_text() == before  # nothing logged was deleted


def test_truncated_trainer_state_is_named(straight_run, tmp_path):
    run = _copy_run(straight_run, tmp_path / "run")
    state = run / "checkpoints" / "step-000006" / "trainer_state.json"
    state.write_text(state.read_text()[:50])
    line = _fails(_cmd(run, "trainer.steps=7", "trainer.save_every=3", resume=True))
    assert str(state) in line and "step-000003" in line


def test_resume_accepts_a_moved_run_spelled_differently(straight_run, tmp_path):
    """The run folder moved, given relative with a trailing slash, and another trainer.eval_samples: the same
    run (none of these changes training), so --resume continues it."""
    moved = _copy_run(straight_run, tmp_path / "moved")
    relative = os.path.relpath(moved, ROOT) + "/"
    result = _run(_cmd(relative, "trainer.steps=7", "trainer.save_every=3", "trainer.eval_samples=2",
                       "trainer.save_final=false", resume=True))
    assert "resumed from" in result.stdout and "step 6" in result.stdout
    rows = _metrics(moved)
    assert [r["step"] for r in rows] == list(range(7)) and rows[:6] == _metrics(straight_run)
    # the warm-up ran in the first start only: its loss is carried into the continued run's summary
    before = json.loads((straight_run / "summary.json").read_text())["warmup_final_loss"]
    assert json.loads((moved / "summary.json").read_text())["warmup_final_loss"] == before


def test_run_that_stopped_before_its_first_checkpoint_restarts_with_resume(tmp_path):
    """A crash before the first checkpoint left metrics and a half-written checkpoint: a new run names the way
    out, --resume starts again from step 0 (old lines replaced); the final model is saved before the final
    evaluation, so an error there keeps it."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward": 9.0}\n{"step": 1, "rew')
    (tmp_path / "checkpoints" / "step-000002.tmp" / "deepspeed").mkdir(parents=True)
    line = _fails(_cmd(tmp_path, "trainer.steps=2"))
    assert "no complete checkpoint" in line and "--resume" in line
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "multiproc" / "final_eval_fails.py"),
                             *_cmd(tmp_path, "trainer.steps=2", "trainer.save_every=0", resume=True)[3:]],
                            capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)
    assert result.returncode != 0 and "evaluation failed on purpose" in result.stderr
    assert "starting the run from step 0" in result.stdout
    assert [r["step"] for r in _metrics(tmp_path)] == [0, 1] and _metrics(tmp_path)[0]["reward"] != 9.0
    assert not (tmp_path / "checkpoints" / "step-000002.tmp").exists()
    assert (tmp_path / "checkpoint-final" / "model.safetensors").is_file()


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert "is a file" in _fails(_cmd(target, "trainer.steps=1"))


def test_nan_reward_names_the_reward_function(tmp_path):
    line = _fails(_cmd(tmp_path, "trainer.steps=2", "warmup.steps=0",
                       "reward.function=tests.multiproc.nan_reward.nan_reward"))
    assert "tests.multiproc.nan_reward.nan_reward" in line and "reward=nan" in line and "optim.lr" not in line


# ---------------------------------------------------------------------------------------------------------
# issue 43: an update that makes the weights non-finite, weights that already are, a finished run resumed


def _main(capsys, *args):
    """`papo` in this process: (exit code, its `papo:` lines on stderr)."""
    from papo_engine.cli import main
    code = main(list(args))
    return code, _papo_lines(capsys.readouterr().err)


def test_an_update_that_makes_the_weights_nonfinite_stops_unsaved(tmp_path, capsys):
    """optim.lr=1e39 is a finite number, but Adam's first step moves every weight by ~lr: past float32's range
    (DeepSpeed's CPU Adam, used with the optimizer offloaded, computes it without complaint). Loss and gradients of
    step 0 are finite, so only the check after the step sees it: the run stops there with exit 1, and neither a
    checkpoint nor checkpoint-final holds the NaN weights (before: exit 0 and a NaN checkpoint-final)."""
    code, lines = _main(capsys, "train", f"trainer.output_dir={tmp_path}", *SMALL, "logging.wandb=false",
                        "warmup.steps=0", "optim.lr=1e39", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true",
                        "trainer.steps=2", "trainer.save_every=1")
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("papo: stopped: step 0: the optimizer step made ")
    assert ("parameter values NaN or inf (lr 1e+39; loss and gradients finite); they were not saved, no checkpoint "
            "was completed yet; lower optim.lr" in lines[0])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "checkpoint-final").exists()


def test_weights_that_are_already_nonfinite_are_refused_at_the_start(tmp_path, capsys):
    """A warm-up at lr 1e30 leaves NaN weights (its second step's loss overflows); so would an earlier run's NaN
    checkpoint given as model.path or --resume: refused before the first step, nothing trained or saved."""
    code, lines = _main(capsys, "train", f"trainer.output_dir={tmp_path}", *SMALL, "logging.wandb=false",
                        "warmup.steps=3", "warmup.lr=1e30")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("papo: error: after the warm-up (warmup.lr=1e+30): ")
    assert lines[0].endswith("parameter values are NaN or inf; training cannot start from them")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_of_a_finished_run_is_refused(straight_run, capsys):
    before = {p: p.read_bytes() for p in (straight_run / "summary.json", straight_run / "metrics.jsonl")}
    code, lines = _main(capsys, *_cmd(straight_run, "trainer.steps=6", "trainer.save_every=3", resume=True)[3:])
    assert code == 2 and lines == [f"papo: error: --resume: trainer.output_dir={str(straight_run)!r} holds a finished "
                                   f"run (all 6 steps, summary.json): nothing to resume; raise trainer.steps to "
                                   f"train on, or start another trainer.output_dir"]
    assert all(p.read_bytes() == content for p, content in before.items())
