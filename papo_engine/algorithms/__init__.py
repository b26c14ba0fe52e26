"""Pure tensor algorithms: advantages, KL estimators, policy and PAPO losses (no model in sight)."""
from papo_engine.algorithms.advantages import group_advantages, informative_groups, overlong_penalty
from papo_engine.algorithms.losses import (
    LossInputs,
    LossSettings,
    aggregate,
    entropy_term,
    gamma_at,
    kl_estimate,
    loss_settings,
    masked_mean,
    papo_loss,
    perception_kl,
    policy_gradient_loss,
    seq_mean,
)

__all__ = [
    "LossInputs", "LossSettings", "aggregate", "entropy_term", "gamma_at", "group_advantages",
    "informative_groups", "kl_estimate", "loss_settings", "masked_mean", "overlong_penalty", "papo_loss",
    "perception_kl", "policy_gradient_loss", "seq_mean",
]
