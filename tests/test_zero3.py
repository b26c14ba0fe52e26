"""Two processes (gloo) under DeepSpeed ZeRO-3: the fused head runs where lm_head.weight is gathered, and the
fused and eager heads give the loss and full gradients of one process without DeepSpeed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from papo_engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a 2-rank ZeRO-3 launch



def test_zero3_two_ranks_fused_equals_eager_equals_one_process(tmp_path):
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "tests" / "multiproc" / "zero3_fused_head.py"), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    verdict = json.loads(out.read_text())
    ref = verdict["loss_reference"]
    assert verdict["loss_fused"] == pytest.approx(ref, rel=1e-5)
    assert verdict["loss_eager"] == pytest.approx(ref, rel=1e-5)
    worst = max(verdict["max_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-5, worst
    assert "lm_head.weight" in verdict["max_rel_err"] and verdict["lm_head_grad_norm"] > 0
