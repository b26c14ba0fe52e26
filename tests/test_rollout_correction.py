"""Rollout/trainer mismatch diagnostics and the rollout IS correction, on hand-computed values."""
import math

import pytest
import torch

from papo_engine.algorithms import LossInputs, papo_loss
from papo_engine.algorithms.rollout_correction import rollout_is_weights, rollout_mismatch_sums
from papo_engine.config import AlgoConfig, ConfigError, load_config

# w = π_old / π_rollout: row 0 [2, 0.5, (pad)], row 1 [0.5, 4, 1]
OLD = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.4, 0.4, 0.4]], dtype=torch.float64))
ROLLOUT = torch.log(torch.tensor([[0.25, 0.5, 0.3], [0.8, 0.1, 0.4]], dtype=torch.float64))
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)


def weights(mode, level, cap, low=None):
    return rollout_is_weights(OLD, ROLLOUT, MASK, mode, level, cap, low).double()


@pytest.mark.parametrize("mode, level, cap, low, expected", [
    ("truncate", "token", 2.5, None, [[2.0, 0.5, 0.0], [0.5, 2.5, 1.0]]),
    ("truncate", "token", 1.5, None, [[1.5, 0.5, 0.0], [0.5, 1.5, 1.0]]),
    ("mask", "token", 2.0, None, [[2.0, 0.5, 0.0], [0.5, 0.0, 1.0]]),      # low = 1/2, bounds inclusive
    ("mask", "token", 3.0, 0.6, [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    ("truncate", "sequence", 1.5, None, [[1.0, 1.0, 0.0], [1.5, 1.5, 1.5]]),  # products 1 and 2
    ("mask", "sequence", 1.5, None, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),      # 2 > 1.5: the sequence drops
    ("mask", "sequence", 2.0, None, [[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]),
])
def test_is_weights_each_mode_and_level(mode, level, cap, low, expected):
    assert torch.allclose(weights(mode, level, cap, low), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_is_weights_are_constants_and_bad_settings_raise():
    old = OLD.clone().requires_grad_(True)
    assert not rollout_is_weights(old, ROLLOUT, MASK, "truncate", "token", 2.0).requires_grad
    with pytest.raises(ValueError, match="mode"):
        rollout_is_weights(OLD, ROLLOUT, MASK, "off", "token", 2.0)
    with pytest.raises(ValueError, match="level"):
        rollout_is_weights(OLD, ROLLOUT, MASK, "mask", "prompt", 2.0)
    with pytest.raises(ValueError, match="thresholds"):
        rollout_is_weights(OLD, ROLLOUT, MASK, "mask", "token", 2.0, low=3.0)


def test_mismatch_sums_hand_computed():
    s = rollout_mismatch_sums(OLD, ROLLOUT, MASK)
    ln2 = math.log(2)
    assert s["tokens"] == 5
    assert s["abs_diff"] == pytest.approx(5 * ln2)               # |ln 2| + |ln ½| + |ln ½| + |ln 4| + 0
    assert s["kl"] == pytest.approx(3 - ln2)                     # Σ (w − ln w − 1)
    assert s["chi2"] == pytest.approx(1 + 0.25 + 0.25 + 9 + 0)   # Σ (w − 1)²
    same = rollout_mismatch_sums(OLD, OLD, MASK)
    assert same["abs_diff"] == same["kl"] == same["chi2"] == 0.0


def test_papo_loss_weights_each_tokens_policy_gradient():
    cfg = AlgoConfig(gamma=0.0, dual_clip=None)
    logp = OLD.float().clone().requires_grad_(True)  # ratio 1: pg per token = −A
    adv = torch.tensor([1.0, -1.0])
    w = weights("truncate", "token", 2.5).float()
    base = LossInputs(logprobs=logp, old_logprobs=OLD.float(), response_mask=MASK.float(), advantages=adv)
    plain, _ = papo_loss(base, cfg, 0.0)
    assert plain.item() == pytest.approx((-1 - 1 + 1 + 1 + 1) / 5)
    corrected, metrics = papo_loss(LossInputs(**{**base.__dict__, "rollout_is_weights": w}), cfg, 0.0)
    # row 0: −1·(2 + 0.5); row 1: +1·(0.5 + 2.5 + 1); token-mean over 5 tokens
    assert corrected.item() == pytest.approx((-(2.0 + 0.5) + (0.5 + 2.5 + 1.0)) / 5)
    assert metrics["pg_loss"].item() == pytest.approx(corrected.item())
    corrected.backward()
    # d/dlogp of −A·w·r at r = 1 is −A·w per token, / 5
    assert torch.allclose(logp.grad, (-adv[:, None] * w * MASK.float()) / 5, atol=1e-6)


def test_config_keys_and_their_one_line_errors():
    cfg = load_config(None, ["rollout.temperature=2.0"])
    assert cfg.algo.rollout_is == "off"  # off by default
    with pytest.raises(ConfigError, match=r"rollout.temperature=2.5: must be a float > 0.0 and <= 2.0"):
        load_config(None, ["rollout.temperature=2.5"])
    with pytest.raises(ConfigError, match="algo.rollout_is='truncate' needs rollout.backend=vllm"):
        load_config(None, ["algo.rollout_is=truncate"])
    with pytest.raises(ConfigError, match="algo.rollout_is_level='seq'"):
        load_config(None, ["algo.rollout_is_level=seq"])


def test_eval_temperature_is_bounded_like_vllm():
    from papo_engine.config import Config
    from papo_engine.evaluation import evaluate_files
    cfg = Config()
    cfg.model.path = "not-read-before-the-check"
    with pytest.raises(ConfigError, match=r"--temperature=2.5: must be in \[0, 2\]"):
        evaluate_files(cfg, [], 1, 2.5)
