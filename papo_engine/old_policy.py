"""π_old for one step: the per-token statistics of the policy that sampled the rollouts (the policy ratio's old
log-probs and the step's entropy / perception-KL diagnostics), the reference's log-probs, and the rollout/trainer
mismatch with its importance-sampling weights.

Two ways to get π_old:
- a separate no-grad forward per micro-batch before the update (`old_policy_stats`), as PPO does in general;
- on-policy reuse (`on_policy_reuse`): when the update is exactly on-policy — one epoch, one optimizer step per
  rollout, so every micro-batch's update forward runs on the very weights that sampled the rollouts — π_old IS the
  update forward, and its output, detached, replaces the separate pass (verl does the same). `OldStats.record`
  stores each micro-batch's rows before its loss is formed (the policy ratio and the rollout IS weights read them).
  With gradient through the masked branch (the default) the update forward covers both branches: same values bit
  for bit, one forward over the batch (both branches) less. The reference model's pass (β > 0) still runs.
  Without gradient through the masked branch (the authors' computation, `official` / masked_grad=false) the update
  forward runs the original branch only, and the masked branch's log-probs and entropy are no-grad constants; the
  full-vocabulary KL diagnostic (logged as perception_kl) needs both branches in one head call. So in the update,
  no-grad forwards of the masked half (`actor.masked_branch_hidden`: hidden states [S, R, d], no logits; each
  over `trainer.no_grad_micro_batch_size` sequences in whole micro-batches, 2 by default — the weights do not
  change before the optimizer step) run as the micro-batches reach them, and each micro-batch's fused head takes
  both — the original branch with gradient, the masked one detached — giving π_old's five statistics in one call;
  the loss takes only the original branch's outputs with gradient (the masked ones are recorded detached), so the
  head's backward skips the masked branch.
  Half of the separate pass is gone, and the head runs once over both branches instead of twice. Not bit for bit
  the separate pass by construction (B instead of 2B sequences per forward, which a GEMM may block differently):
  equal within fp32 rounding, tested to 1e-6 relative over 3 steps (identical in those CPU tests).
"""
from __future__ import annotations

import torch

from .actor import SequenceBatch, response_token_stats
from .algorithms.rollout_correction import rollout_is_weights, rollout_mismatch_sums
from .lora import reference_model


def on_policy_reuse(cfg, updates_per_step: int) -> bool:
    """Whether the update forward can stand in for the no-grad old-log-prob pass (see the module docstring)."""
    t = cfg.trainer
    return t.on_policy_reuse and t.ppo_epochs == 1 and updates_per_step == 1


class OldStats(dict):
    """π_old's per-token [S, R] tensors by name: logprobs, entropy (+ masked_logprobs, masked_entropy, kl with the
    masked branch), ref_logprobs (β > 0), rollout_is_weights (algo.rollout_is, with a backend that reports
    log-probs). With `from_update` the policy's entries are filled by `record` during the update."""

    def __init__(self, stats: dict, rows: int, width: int, from_update: bool, rollout_logprobs=None, algo=None):
        super().__init__(stats)
        self.rows, self.width, self.from_update = rows, width, from_update
        self.rollout_logprobs, self.algo = rollout_logprobs, algo

    def record(self, index: list[int], stats: dict, mask: torch.Tensor) -> None:
        """On-policy reuse: the update forward's statistics of sequences `index` (at the micro-batch's response
        width, `mask`'s), detached, become π_old's rows (and their rollout IS weights). A no-op when π_old came from
        the separate pass."""
        if not self.from_update:
            return
        rows, width = torch.tensor(index), mask.shape[1]
        for name, values in stats.items():
            if name not in self:
                self[name] = values.new_zeros(self.rows, self.width)
            self[name][rows, :width] = values.detach()
        if self.rollout_logprobs is not None and self.algo.rollout_is != "off":
            weights = _is_weights(self["logprobs"][rows, :width], self.rollout_logprobs[rows, :width], mask, self.algo)
            if "rollout_is_weights" not in self:
                self["rollout_is_weights"] = weights.new_zeros(self.rows, self.width)
            self["rollout_is_weights"][rows, :width] = weights


def _is_weights(old_logprobs, rollout_logprobs, mask, algo) -> torch.Tensor:
    return rollout_is_weights(old_logprobs, rollout_logprobs, mask, algo.rollout_is, algo.rollout_is_level,
                              algo.rollout_is_threshold, algo.rollout_is_threshold_low)


@torch.no_grad()
def old_policy_stats(model, reference, seqs: SequenceBatch, micro_batches: list[tuple[list[int], SequenceBatch]], *,
                     reuse: bool, both_branches: bool, temperature: float, rollout_logprobs=None,
                     algo=None) -> OldStats:
    """One no-grad forward per micro-batch ((sequence indices, the batch the forward takes)) of both branches
    (unless `reuse`) and of the reference (when given); the rollout IS weights when the policy's log-probs are known
    here."""
    rows, width = len(seqs), seqs.response_ids.shape[1]
    stats: dict[str, torch.Tensor] = {}
    for index, mb in micro_batches if not reuse or reference is not None else ():
        part = {} if reuse else response_token_stats(model, mb, both_branches=both_branches, temperature=temperature)
        if reference is not None:
            reference_module, switch = reference_model(reference)  # a frozen copy, or LoRA's adapters off
            with switch:
                part["ref_logprobs"] = response_token_stats(reference_module, mb, both_branches=False,
                                                            temperature=temperature)["logprobs"]
        for name, values in part.items():  # at the micro-batch's width: placed in the step's [rows, width]
            if name not in stats:
                stats[name] = values.new_zeros(rows, width)
            stats[name][torch.tensor(index), :values.shape[1]] = values
    old = OldStats(stats, rows, width, reuse, rollout_logprobs, algo)
    if not reuse and rollout_logprobs is not None and algo.rollout_is != "off":
        old["rollout_is_weights"] = _is_weights(old["logprobs"], rollout_logprobs, seqs.response_mask, algo)
    return old


def rollout_mismatch(old: dict, rollout_logprobs, mask: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Rollout engine vs trainer on this step's sampled tokens, as (sum, count) per metric ({} when the backend
    reports no log-probs, i.e. HF: it samples from the trainer's module); with the IS weights' mean and dropped
    fraction when they were computed. Reads the complete π_old: call it after the update."""
    if rollout_logprobs is None:
        return {}
    sums = rollout_mismatch_sums(old["logprobs"], rollout_logprobs, mask)
    tokens = sums.pop("tokens")
    out = {"rollout/logprob_abs_diff": (sums["abs_diff"], tokens), "rollout/kl": (sums["kl"], tokens),
           "rollout/chi2": (sums["chi2"], tokens)}
    if "rollout_is_weights" in old:
        weights = old["rollout_is_weights"]
        out["rollout/is_weight_mean"] = (float((weights * mask).sum()), tokens)
        out["rollout/is_dropped_fraction"] = (float(((weights == 0) & (mask > 0)).sum()), tokens)
    return out
