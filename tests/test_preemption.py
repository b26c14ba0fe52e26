"""Pre-emption under two ranks (torchrun, gloo): a real SIGTERM to one rank only, or to every process of the
job (launcher included, as a scheduler does), stops both ranks after the same step with a checkpoint holding
both ranks' states, exit code 143 and no hang; --resume then continues bit-identically."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from papo_engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # 2-rank trainings, signalled and resumed
RUN = ["trainer.steps=5", "warmup.steps=2", "trainer.prompts_per_step=4", "rollout.n=2",
       "trainer.micro_batch_size=4", "rollout.max_new_tokens=8", "trainer.eval_samples=2", "logging.wandb=false",
       "logging.plot=false", "trainer.save_every=0", "deepspeed.zero_stage=2"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1")


def _cmd(out, resume=False):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "papo_engine.cli", "train", f"trainer.output_dir={out}", *RUN,
            *(["--resume"] if resume else [])]


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _interrupt(out, signal_all: bool):
    """Start a 2-rank run, and after its first step send SIGTERM to rank 1's worker only, or to the whole
    process group (launcher and both workers). Returns (launcher result code, stderr)."""
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not (
            metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    if signal_all:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "papo_engine.cli" in p.cmdline()]
        rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1, [p.cmdline() for p in workers]
        rank1[0].send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=300)  # no hang: both ranks agree on the step and leave
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr


def _checkpoint_of_both_ranks(out):
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert len(steps) == 1 and (steps[0] / "COMPLETE").is_file(), steps
    assert sorted(p.name for p in (steps[0] / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    done = int(steps[0].name.split("-")[1])
    assert 1 <= done < 5 and len(_metrics(out)) == done
    return done


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path):
    code, stderr = _interrupt(tmp_path, signal_all=False)
    assert code != 0 and "exitcode  : 143" in stderr, stderr[-3000:]
    done = _checkpoint_of_both_ranks(tmp_path)
    stopped = [line for line in stderr.splitlines() if line.startswith("papo: stopped:")]
    assert stopped == [f"papo: stopped: SIGTERM received: saved {tmp_path / 'checkpoints'}/step-{done:06d} "
                       f"after step {done} of 5; continue with --resume"], stderr[-3000:]


def test_sigterm_to_the_whole_job_then_resume_is_bitwise_identical(tmp_path):
    straight = tmp_path / "straight"
    _run(_cmd(straight))
    interrupted = tmp_path / "interrupted"
    code, stderr = _interrupt(interrupted, signal_all=True)
    assert code != 0, stderr[-3000:]
    _checkpoint_of_both_ranks(interrupted)
    _run(_cmd(interrupted, resume=True))
    assert _metrics(interrupted) == _metrics(straight)
    a = load_file(straight / "checkpoint-final" / "model.safetensors")
    b = load_file(interrupted / "checkpoint-final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
