"""Full and read-only filesystems, for real: a small tmpfs mounted for the test (needs root, as here and in CI;
skipped otherwise). A full disk stops the run with one line naming the path and leaves the earlier checkpoints
complete; a read-only output_dir is refused before anything is loaded."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from papo_engine.checkpoint import COMPLETE, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trainings in subprocesses
SMALL = ["warmup.steps=2", "trainer.prompts_per_step=4", "rollout.n=2", "trainer.micro_batch_size=4",
         "trainer.eval_samples=4", "rollout.max_new_tokens=8", "logging.plot=false", "logging.wandb=false"]


def _mount_tmpfs(where: Path, *options: str):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path):
    mounted = []

    def mount(*options):
        where = tmp_path / f"fs{len(mounted)}"
        _mount_tmpfs(where, *options)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def _train(out, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "papo_engine.cli", "train", f"trainer.output_dir={out}", *SMALL,
                           *overrides], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


def test_full_disk_stops_with_one_line_and_keeps_the_earlier_checkpoint(small_fs, tiny):
    # one checkpoint holds the fp32 weights and both AdamW moments (plus small files): room for 1.5 of them
    checkpoint_kib = 3 * 4 * sum(p.numel() for p in tiny[3].parameters()) // 1024
    fs = small_fs(f"size={checkpoint_kib * 3 // 2}k")
    result = _train(fs / "run", "trainer.steps=3", "trainer.save_every=1", "trainer.keep_last=3",
                    "trainer.save_final=false")
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("papo:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"papo: stopped: no space left on device: {fs / 'run' / 'checkpoints'}")
    assert "step-000002 was not written" in lines[0] and "step-000001" in lines[0]
    checkpoints = fs / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001"]  # the half-written one is removed
    assert (checkpoints / "step-000001" / COMPLETE).is_file()
    verify_checkpoint(checkpoints / "step-000001")  # every file of it readable


def test_read_only_output_dir_is_one_line(small_fs):
    fs = small_fs("size=1m", "ro")
    result = _train(fs / "run", "trainer.steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"papo: error: trainer.output_dir={str(fs / 'run')!r}: cannot write there "
        f"(Read-only file system: {fs / 'run'})")
