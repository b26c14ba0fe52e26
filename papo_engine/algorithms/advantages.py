"""Outcome advantages and DAPO reward shaping: pure functions of reward tensors.

Layout convention (as produced by the rollout): the G*n responses of a step are group-contiguous, so rows
[g*n, (g+1)*n) are the n responses to prompt g.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _groups(rewards: Tensor, n: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [G*n], got shape {tuple(rewards.shape)}")
    if n < 1 or rewards.numel() % n:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of n={n}")
    return rewards.view(-1, n)


def group_advantages(rewards: Tensor, n: int, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages, one per response.

        A_i = (r_i − mean_g(r)) / (std_g(r) + eps)      (norm_by_std=True)
        A_i =  r_i − mean_g(r)                            (norm_by_std=False, "Dr. GRPO")

    mean_g / std_g are over the n responses of the prompt that response i answers. std is the UNBIASED
    sample standard deviation (divide by n − 1), the `torch.std` default that verl's GRPO estimator uses, so
    numbers match verl/EasyR1 (the authors' code). A group whose rewards are all equal gets A = 0.
    n must be >= 2 (the unbiased std of one sample is undefined).
    """
    if n < 2:
        raise ValueError(f"group_advantages needs n >= 2 responses per prompt, got n={n}")
    r = _groups(rewards, n)
    centered = r - r.mean(dim=1, keepdim=True)
    if norm_by_std:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def informative_groups(rewards: Tensor, n: int) -> Tensor:
    """DAPO dynamic-sampling keep-mask, BoolTensor[G]: True where the group's n rewards are NOT all equal.

    A group whose rewards are all equal has zero advantage for every response and so no policy gradient;
    DAPO drops it and regenerates. Equality is exact (rewards are computed, not estimated). Expand to rows
    with `keep.repeat_interleave(n)`.
    """
    r = _groups(rewards, n)
    return (r != r[:, :1]).any(dim=1)


# the authors' online filter (algorithm.filter_low / filter_high with filter_key=accuracy): keep a group when
# its mean accuracy lies strictly inside this range
ACCURACY_KEEP_RANGE = (0.01, 0.99)
KEEP_METRICS = ("reward", "accuracy")


def groups_to_keep(scores: dict[str, Tensor], n: int, metric: str = "reward") -> Tensor:
    """DAPO dynamic-sampling keep-mask over groups, BoolTensor[G], by the configured criterion.

        reward:   the group's n rewards are not all equal (`informative_groups`)
        accuracy: low < mean_g(accuracy) < high with (low, high) = ACCURACY_KEEP_RANGE — the authors' filter.
                  It drops a group whose answers are all wrong even when their format rewards differ.
    `scores` holds per-response tensors [G*n] ("reward", and "accuracy" for the accuracy criterion).
    """
    if metric == "reward":
        return informative_groups(scores["reward"], n)
    if metric == "accuracy":
        if "accuracy" not in scores:
            raise ValueError("algo.dynamic_sampling_metric=accuracy: the reward function returns no 'accuracy' "
                             f"(it returns {', '.join(sorted(scores))})")
        low, high = ACCURACY_KEEP_RANGE
        mean = _groups(scores["accuracy"].double(), n).mean(dim=1)
        return (mean > low) & (mean < high)
    raise ValueError(f"dynamic_sampling_metric={metric!r}: must be one of {', '.join(KEEP_METRICS)}")


def overlong_penalty(response_lengths: Tensor, max_new_tokens: int, buffer: int, factor: float) -> Tensor:
    """DAPO soft overlong punishment, added to the reward of each response.

        L_exp = max_new_tokens − buffer
        p(len) = 0                                   if len <= L_exp
               = −factor · (len − L_exp) / buffer    if L_exp < len <= max_new_tokens  (reaches −factor at max)

    Lengths beyond max_new_tokens cannot occur (generation stops there); they are clamped to −factor.
    buffer = 0 disables the penalty (returns zeros). Returns float32 (or the lengths' float dtype).
    """
    lengths = response_lengths.to(torch.get_default_dtype() if not response_lengths.is_floating_point()
                                  else response_lengths.dtype)
    if buffer <= 0:
        return torch.zeros_like(lengths)
    if buffer > max_new_tokens:
        raise ValueError(f"overlong buffer={buffer} exceeds max_new_tokens={max_new_tokens}")
    exceed = (lengths - (max_new_tokens - buffer)).clamp(min=0.0, max=float(buffer))
    return -factor * exceed / buffer
