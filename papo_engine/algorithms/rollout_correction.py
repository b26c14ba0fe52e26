"""Rollout/trainer mismatch: diagnostics and the importance-sampling correction of the policy loss.

The rollout engine (vLLM) samples with its own kernels, so π_rollout(o_t) differs slightly from the trainer's
π_old(o_t) for the same weights (bf16 kernels, batch-dependent reductions). Pure tensor functions over [B, T]
per-token log-probs of the sampled tokens; `mask` is 1 on response tokens.

Diagnostics (token means over the response tokens), with log w = log π_old − log π_rollout:
    abs_diff = |log w|;  kl = E_rollout[w − log w − 1]  (k3 estimate of KL(π_rollout ‖ π_old), >= 0);
    chi2 = E_rollout[(w − 1)²]  (χ²(π_old ‖ π_rollout) estimate; the variance an IS correction pays).

Correction (verl's `rollout_is`, ms-swift's rollout correction): weight each token's policy-gradient loss by
w = π_old / π_rollout, a constant. Level "token": w_t per token; "sequence": w = Π_t w_t = exp(Σ_t log w_t),
the same for every token of the sequence. Mode "truncate": min(w, cap); "mask": w where low <= w <= cap, else
0 (the token, or the whole sequence, drops out of the policy gradient but still counts in the normalizer).
"""
from __future__ import annotations

import torch
from torch import Tensor

IS_MODES = ("off", "truncate", "mask")
IS_LEVELS = ("token", "sequence")
# exp() overflow guard for sequence-level log-weights (a sum over many tokens); e^40 is far above any cap
LOG_WEIGHT_CLAMP = 40.0


def _masked_log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    return (old_logprobs - rollout_logprobs).masked_fill(mask <= 0, 0.0)


def rollout_mismatch_sums(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """Sums over response tokens of |log w|, the k3 KL and the χ² terms, plus the token count, so callers can
    reduce over ranks before dividing (`distributed.global_means`)."""
    log_w = _masked_log_ratio(old_logprobs.double(), rollout_logprobs.double(), mask)
    valid = (mask > 0).double()
    w = torch.exp(log_w.clamp(max=LOG_WEIGHT_CLAMP))
    return {"abs_diff": float((log_w.abs() * valid).sum()), "kl": float(((w - log_w - 1) * valid).sum()),
            "chi2": float(((w - 1).square() * valid).sum()), "tokens": float(valid.sum())}


def rollout_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, mode: str, level: str,
                       cap: float, low: float | None = None) -> Tensor:
    """Per-token weights [B, T] (constants, 0 on padding) for the policy-gradient loss; see the module docstring.
    `low` (mask mode only) defaults to 1 / cap."""
    if mode not in IS_MODES or mode == "off":
        raise ValueError(f"rollout IS mode={mode!r}: must be truncate or mask")
    if level not in IS_LEVELS:
        raise ValueError(f"rollout IS level={level!r}: must be one of {', '.join(IS_LEVELS)}")
    if cap <= 0 or (low is not None and not 0 <= low <= cap):
        raise ValueError(f"rollout IS thresholds cap={cap}, low={low}: need 0 <= low <= cap, cap > 0")
    with torch.no_grad():
        valid = mask > 0
        log_w = _masked_log_ratio(old_logprobs.detach().float(), rollout_logprobs.detach().float(), mask)
        if level == "sequence":
            log_w = log_w.sum(dim=-1, keepdim=True).expand_as(log_w)
        w = torch.exp(log_w.clamp(-LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP))
        if mode == "truncate":
            w = w.clamp(max=cap)
        else:
            lower = 1.0 / cap if low is None else low
            w = torch.where((w >= lower) & (w <= cap), w, torch.zeros_like(w))
        return w.masked_fill(~valid, 0.0)
