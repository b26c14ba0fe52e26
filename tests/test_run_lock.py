"""One run per output folder (papo_engine/runlock.py): a live run's folder refuses a second `papo train` (new or
--resume, one rank or two) with one line naming the holder, exit 2, touching nothing; `--resume` started while the
old job still runs (a requeue) waits for it and continues from its pre-emption checkpoint, every step logged once;
`papo export` of the running run's checkpoint is allowed; a holder that is gone (SIGKILL on this host, a stale
heartbeat from another host) never blocks."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from papo_engine import runlock
from tests.test_resume import ROOT, _cmd, _env, _metrics, _papo_lines, ckpt_steps

FAST = ["logging.wandb=false", "data.train_size=16", "data.eval_size=4", "trainer.eval_samples=2",
        "rollout.max_new_tokens=4", "warmup.steps=0", "trainer.steps=4", "trainer.save_every=0"]
HOLDER = ("import sys, time; from pathlib import Path; from papo_engine.runlock import RunLock; "
          "lock = RunLock(Path(sys.argv[1])); assert lock.try_acquire()[0]; print('held', flush=True); time.sleep(600)")


def _hold(folder):
    """A live process on this host holding `folder`'s lock (as a run's rank 0 does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _record(folder, **fields):
    (folder / runlock.LOCK_NAME).write_text(json.dumps({"host": "vm", "pid": 1, "started": time.time(),
                                                         "heartbeat": time.time(), "step": 3, **fields}))


def test_lock_of_a_sigkilled_holder_is_taken_over(tmp_path, capsys):
    holder = _hold(tmp_path)
    blocked = runlock.RunLock(tmp_path)
    assert blocked.try_acquire()[:2] == (False, blocked.read_holder()) and blocked.read_holder()["pid"] == holder.pid
    blocked.release()
    holder.kill()
    holder.wait()  # the kernel dropped the flock; the record (pid now dead) stays behind
    lock = runlock.acquire_run_lock(tmp_path, resume=True, wait_s=0)
    try:
        assert f"taking over the stale lock of host {os.uname().nodename}, pid {holder.pid}" in capsys.readouterr().out
        assert lock.read_holder()["pid"] == os.getpid()
    finally:
        lock.release()
    assert lock.read_holder() is None  # released: an empty record, the file stays


def test_heartbeat_decides_for_a_holder_on_another_host(tmp_path, capsys):
    """Across hosts (a shared filesystem, flock not to be trusted) only the heartbeat counts: fresh refuses at
    once for a new run, older than STALE_AFTER_S is taken over."""
    _record(tmp_path, host="node-b", pid=4242)
    with pytest.raises(runlock.RunLocked) as err:
        runlock.acquire_run_lock(tmp_path, resume=False, wait_s=300)  # a new run does not wait
    assert "host node-b, pid 4242, since " in str(err.value) and "heartbeat older than 120 s" in str(err.value)
    assert "\n" not in str(err.value)
    _record(tmp_path, host="node-b", pid=4242, heartbeat=time.time() - runlock.STALE_AFTER_S - 1)
    lock = runlock.acquire_run_lock(tmp_path, resume=True, wait_s=0)
    lock.release()
    assert "taking over the stale lock of host node-b, pid 4242" in capsys.readouterr().out


def test_same_host_record_of_a_dead_pid_is_stale(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _record(tmp_path, host=os.uname().nodename, pid=int(dead.stdout))
    runlock.acquire_run_lock(tmp_path, resume=False, wait_s=0).release()


def _park(out, hold, *extra, resume=False):
    cmd = [sys.executable, str(ROOT / "tests" / "multiproc" / "park_after_steps.py"), str(hold),
           *_cmd(out, *FAST, *extra, resume=resume)[3:]]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:] if proc.poll() else ""
        time.sleep(0.05)


def _torchrun_new_run(out):
    from papo_engine.distributed import free_port
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), *_cmd(out, *FAST)[1:]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_second_run_refused_and_requeued_resume_waits_then_continues(tmp_path):
    """Run A is parked after step 1 (it holds the folder). While it runs: a new run, a 2-rank new run and a
    --resume with trainer.lock_wait_s=0 are refused with one line naming A, touching nothing (A's metrics and a
    partial checkpoint stay as they are). A --resume started then (a requeue) waits; A gets a real SIGTERM and
    saves its pre-emption checkpoint; the waiting run resumes from it, parks after its first step, `papo export`
    of A's checkpoint works beside it, and the run ends with every step in metrics.jsonl exactly once."""
    out, hold_a, hold_b = tmp_path / "run", tmp_path / "hold-a", tmp_path / "hold-b"
    hold_a.touch()
    hold_b.touch()
    a = _park(out, hold_a)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_metrics(out)) == 1, a)
        (out / "checkpoints" / "step-000009.tmp").mkdir(parents=True)  # what a resume would clean up
        metrics_before = (out / "metrics.jsonl").read_bytes()
        two_ranks = _torchrun_new_run(out)
        refused = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                    env=_env())
                   for cmd in (_cmd(out, *FAST), _cmd(out, *FAST, "trainer.lock_wait_s=0", resume=True))]
        b = _park(out, hold_b, resume=True)
        for proc in refused:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 2, stderr[-3000:]
            lines = _papo_lines(stderr)
            assert len(lines) == 1 and "is in use by another run: host " in lines[0], stderr[-3000:]
            assert f"pid {a.pid}, since " in lines[0] and "detected by its pid" in lines[0]
        _, stderr = two_ranks.communicate(timeout=300)
        assert two_ranks.returncode != 0 and "exitcode  : 2" in stderr, stderr[-3000:]
        assert [x for x in _papo_lines(stderr) if "in use by another run" in x and f"pid {a.pid}" in x], stderr[-3000:]
        assert (out / "metrics.jsonl").read_bytes() == metrics_before
        assert (out / "checkpoints" / "step-000009.tmp").is_dir()
        waiting = next(line for line in b.stdout if line.startswith("papo:"))
        assert "is in use by host " in waiting and f"pid {a.pid}" in waiting and "waiting up to 300 s" in waiting
        a.send_signal(signal.SIGTERM)
        _, stderr_a = a.communicate(timeout=300)
        assert a.returncode == 143, stderr_a[-3000:]
        assert ckpt_steps(out) == [1] and "saved" in _papo_lines(stderr_a)[0]
        _wait_for(lambda: len(_metrics(out)) == 2, b)  # B resumed from A's checkpoint and did step 1
        exported = subprocess.run([sys.executable, "-m", "papo_engine.cli", "export",
                                   str(out / "checkpoints" / "step-000001"), str(tmp_path / "exported")],
                                  capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
        assert exported.returncode == 0, exported.stderr[-3000:]
        hold_b.unlink()
        stdout_b, stderr_b = b.communicate(timeout=300)
        assert b.returncode == 0, stderr_b[-3000:]
        assert f"resumed from {out / 'checkpoints' / 'step-000001'} at step 1" in stdout_b
        assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3]
        assert not (out / "checkpoints" / "step-000009.tmp").exists()
        assert runlock.RunLock(out).read_holder() is None  # released at the end
    finally:
        for proc in (a, locals().get("b"), locals().get("two_ranks")):
            if proc is not None and proc.poll() is None:
                proc.kill()
