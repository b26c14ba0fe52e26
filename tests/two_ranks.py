"""Multi-process test runs: a tests/multiproc/ script under torchrun with 2 gloo ranks (one thread each) and its JSON
verdict; waiting for several launcher processes (simulated nodes)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from papo_engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def run_two_ranks(script: str, tmp_path: Path, timeout: int = 600) -> dict:
    """`tests/multiproc/<script> <verdict.json>` on 2 ranks; the verdict rank 0 wrote."""
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "tests" / "multiproc" / script), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def wait_for_nodes(nodes: list, check: bool = True, timeout: int = 600) -> list[tuple[str, str]]:
    """(stdout, stderr) of every launcher process (started with start_new_session=True); a hung one is killed with
    its process group, so it never outlives the test. With `check`, each must have exited 0."""
    try:
        results = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0 or not check, stderr[-3000:] + stdout[-3000:]
    return results
