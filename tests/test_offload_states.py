"""deepspeed.offload_states_during_rollout under ZeRO-3, for real: DeepSpeed's FusedAdam (the only optimizer its
ZeRO-3 offload_states() accepts) and a lossless offload / reload around each rollout, on 2 gloo ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from papo_engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a 2-rank ZeRO-3 launch


def test_zero3_offload_states_uses_fused_adam_and_changes_nothing(tmp_path):
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "tests" / "multiproc" / "zero3_offload_states.py"), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    verdict = json.loads(out.read_text())
    assert verdict["without_flag"] == "AdamW" and verdict["optimizers"] == {"false": "FusedAdam", "true": "FusedAdam"}
    assert verdict["trained"] and verdict["identical"]
