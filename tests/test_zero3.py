"""Two processes (gloo) under DeepSpeed ZeRO-3: the fused head runs where lm_head.weight is gathered, and the
fused and eager heads give the loss and full gradients of one process without DeepSpeed."""
import pytest
from two_ranks import run_two_ranks

pytestmark = pytest.mark.slow  # a 2-rank ZeRO-3 launch


def test_zero3_two_ranks_fused_equals_eager_equals_one_process(tmp_path):
    verdict = run_two_ranks("zero3_fused_head.py", tmp_path)
    ref = verdict["loss_reference"]
    assert verdict["loss_fused"] == pytest.approx(ref, rel=1e-5)
    assert verdict["loss_eager"] == pytest.approx(ref, rel=1e-5)
    worst = max(verdict["max_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-5, worst
    assert "lm_head.weight" in verdict["max_rel_err"] and verdict["lm_head_grad_norm"] > 0
