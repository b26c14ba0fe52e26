"""deepspeed.offload_states_during_rollout under ZeRO-3, for real: DeepSpeed's FusedAdam (the only optimizer its
ZeRO-3 offload_states() accepts) and a lossless offload / reload around each rollout, on 2 gloo ranks."""
import pytest
from two_ranks import run_two_ranks

pytestmark = pytest.mark.slow  # a 2-rank ZeRO-3 launch


def test_zero3_offload_states_uses_fused_adam_and_changes_nothing(tmp_path):
    verdict = run_two_ranks("zero3_offload_states.py", tmp_path, timeout=900)
    assert verdict["without_flag"] == "AdamW" and verdict["optimizers"] == {"false": "FusedAdam", "true": "FusedAdam"}
    assert verdict["trained"] and verdict["identical"]
