"""The update role of a PAPO step: π_old (its no-grad pass, or its reuse from the update forward), the
micro-batches (fixed, or length-aware: `micro_batching.py`), the PAPO loss of each micro-batch, and the optimizer
steps of a step's mini-batches.

`PolicyUpdate` is mixed into `trainer.PAPOTrainer`: it reads the trainer's engine, reference, configuration and
the algorithm switches `derive_algorithm` sets (settings, masked_branch, reuse_update_forward,
masked_forward_without_grad), and the trainer's loop calls `old_stats` and `update` once a step.
"""
from __future__ import annotations

import warnings

import torch

from . import distributed as dist_utils
from .actor import SequenceBatch, masked_branch_hidden, response_token_stats, shares_prompts
from .algorithms import LossInputs, papo_loss
from .micro_batching import forward_slots, plan_micro_batches, split_to_count
from .old_policy import OldStats, old_policy_stats

ROLLOUT_TIME_MASKED = ("masked_logprobs", "masked_entropy", "kl")


class PolicyUpdate:
    def micro_batches(self, seqs: SequenceBatch, start: int, stop: int) -> list[list[int]]:
        """Sequences start..stop-1 of this rank in micro-batches, as many on every rank: consecutive ones of
        micro_batch_size, or length-aware ones with micro_batch_tokens > 0 (`micro_batching.py`; not for the
        authors' computation, whose loss is normalized per micro-batch)."""
        t = self.cfg.trainer
        if not t.micro_batch_tokens or self.settings.official:
            return [list(range(s, min(s + t.micro_batch_size, stop))) for s in range(start, stop, t.micro_batch_size)]
        lengths = seqs.response_mask[start:stop].sum(1).long().tolist()
        groups = (seqs.prompt_group[start:stop] if seqs.prompt_group is not None else torch.arange(stop - start))
        plan = plan_micro_batches(seqs.prompts.attention_mask[start:stop].sum(1).tolist(), lengths, groups.tolist(),
                                  t.micro_batch_tokens, t.micro_batch_size)
        plan = split_to_count(plan, int(dist_utils.all_reduce_maxes([len(plan)])[0]), lengths)
        return [[start + i for i in mb] for mb in plan]

    def micro_batch(self, seqs: SequenceBatch, index: list[int]) -> SequenceBatch:
        """The sequences `index` as one training forward takes them: cut to their own longest prompt and response,
        responses in buckets of similar length (micro_batch_tokens > 0); else at the step's widths, as before."""
        if not self.cfg.trainer.micro_batch_tokens:
            return seqs.select(index)
        return seqs.select(index, trim=True).with_response_buckets()

    def old_stats(self, seqs: SequenceBatch, rollout_logprobs: torch.Tensor | None = None) -> OldStats:
        """Rollout-time log-probs of both branches in one no-grad forward per micro-batch (+ the reference's);
        on-policy reuse leaves the policy's to the update forward (`old_policy.py`)."""
        plan = self.micro_batches(seqs, 0, len(seqs))
        return old_policy_stats(self.engine.module, self.reference, seqs,
                                [(index, self.micro_batch(seqs, index)) for index in plan],
                                reuse=self.reuse_update_forward, both_branches=self.masked_branch,
                                temperature=self.sampling.temperature, rollout_logprobs=rollout_logprobs,
                                algo=self.cfg.algo)

    def update(self, seqs: SequenceBatch, advantages: torch.Tensor, old: OldStats, gamma: float) -> dict:
        """ppo_epochs passes; each pass takes `updates_per_step` optimizer steps over consecutive mini-batches
        (the paper: 384 prompts per rollout, 128 per update)."""
        per_update = len(seqs) // self.updates_per_step
        sums: dict[str, float] = {}
        per_seq_kl: list[torch.Tensor] = []
        applied_all, grad_norm = True, 0.0
        for epoch in range(self.cfg.trainer.ppo_epochs):
            for lo in range(0, len(seqs), per_update):
                grad_norm, applied = self._optimizer_step(seqs, lo, lo + per_update, advantages, old, gamma, sums,
                                                          per_seq_kl if epoch == 0 else None)
                applied_all = applied_all and applied
        # token-weighted means over ALL ranks' tokens; the loss is a sum of per-rank parts of one global mean
        total = float(seqs.response_mask.sum()) * self.cfg.trainer.ppo_epochs
        slots, real = sums.pop("_slots"), sums.pop("_real")
        out = {f"update/{k}": v for k, v in dist_utils.global_means(
            {k: (v, total) for k, v in sums.items() if k != "loss"}).items()}
        # padded token slots / all slots of the update's forwards; how uneven the ranks' real tokens are
        all_slots, all_real = dist_utils.all_reduce_sums([slots, real])
        out["update/padding_fraction"] = 1 - all_real / max(all_slots, 1)
        out["update/rank_token_imbalance"] = dist_utils.all_reduce_maxes([real])[0] / max(all_real / self.world, 1)
        optimizer_steps = self.cfg.trainer.ppo_epochs * self.updates_per_step
        out["update/loss"] = dist_utils.all_reduce_sum(sums.get("loss", 0.0)) / optimizer_steps
        if self.settings.official:  # the authors' loss is a per-rank mean, averaged over ranks
            out["update/loss"] /= self.world
        out["grad_norm"] = grad_norm
        out["_applied"] = applied_all
        out["_per_seq_kl"] = torch.cat(per_seq_kl) if per_seq_kl else torch.zeros(0)
        return out

    def micro_batches_per_no_grad_pass(self) -> int:
        """Micro-batches covered by one no-grad forward of the masked branch (official, on-policy: the weights do
        not change before the optimizer step): no_grad_micro_batch_size in whole micro-batches, at least one."""
        t = self.cfg.trainer
        return max(1, (t.no_grad_micro_batch_size or 2 * t.micro_batch_size) // t.micro_batch_size)

    def _optimizer_step(self, seqs: SequenceBatch, lo: int, hi: int, advantages: torch.Tensor, old: OldStats,
                        gamma: float, sums: dict, per_seq_kl: list | None) -> tuple[float, bool]:
        """Sequences lo..hi-1: accumulate over micro-batches, then one optimizer step. Adds token-weighted metric
        sums to `sums` (and per-sequence perception KL to `per_seq_kl` when given)."""
        model = self.engine.module
        both = self.settings.masked_grad and self.masked_branch  # official: no masked forward with gradient
        valid = seqs.response_mask[lo:hi]
        global_tokens = dist_utils.all_reduce_sum(valid.sum())
        global_seqs = dist_utils.all_reduce_sum((valid.sum(1) > 0).sum())  # DAPO padding excluded
        plan = self.micro_batches(seqs, lo, hi)
        per_pass = self.micro_batches_per_no_grad_pass()
        held = None  # official: the masked branch's no-grad hidden states of the current pass, per micro-batch
        loss_finite = True
        for i, index in enumerate(plan):
            mb = self.micro_batch(seqs, index)
            self.engine.start_micro_batch()
            if self.masked_forward_without_grad and i % per_pass == 0:
                held = None  # only one pass's hidden states alive at a time
                members = plan[i:i + per_pass]
                hidden = masked_branch_hidden(model, self.micro_batch(seqs, [j for m in members for j in m]))
                held = hidden.split([int(seqs.response_mask[m].sum()) for m in members])  # row-major: in order
            stats = response_token_stats(model, mb, both_branches=both, temperature=self.sampling.temperature,
                                         masked_hidden=None if held is None else held[i % per_pass])
            mask = mb.response_mask
            old.record(index, stats, mask)  # on-policy reuse: this forward, detached, is π_old (before the loss)
            slots, real = forward_slots(mb, shares_prompts(model, mb))
            sums["_slots"], sums["_real"] = sums.get("_slots", 0) + slots, sums.get("_real", 0) + real
            rows, width = torch.tensor(index), mask.shape[1]
            # official: the masked branch's log-probs, entropy and KL are the rollout-time constants
            masked = stats if both else {k: old[k][rows, :width] for k in ROLLOUT_TIME_MASKED if k in old}
            if self.settings.official:  # the authors: token-mean per micro-batch / accumulation count
                token_norm = mask.sum().clamp(min=1) * len(plan)
            else:
                token_norm = global_tokens
            inputs = LossInputs(
                logprobs=stats["logprobs"], old_logprobs=old["logprobs"][rows, :width], response_mask=mask,
                advantages=advantages[rows], entropy=stats["entropy"], masked_logprobs=masked.get("masked_logprobs"),
                masked_entropy=masked.get("masked_entropy"), full_kl=masked.get("kl"),
                ref_logprobs=old["ref_logprobs"][rows, :width] if "ref_logprobs" in old else None,
                rollout_is_weights=old["rollout_is_weights"][rows, :width] if "rollout_is_weights" in old else None)
            loss, metrics = papo_loss(inputs, self.cfg.algo, gamma, token_normalizer=token_norm,
                                      seq_normalizer=global_seqs)
            loss_finite = loss_finite and bool(torch.isfinite(loss))
            # DeepSpeed averages gradients over ranks. Our loss is already a global mean, so undo that; the
            # authors' (official) loss is a per-rank mean that they average the same way.
            rank_scale = 1 if self.settings.official else self.world
            self.engine.backward(loss * rank_scale, last_micro_batch=i == len(plan) - 1)
            kl_per_seq = metrics.pop("perception_kl_per_seq", None)
            if per_seq_kl is not None and kl_per_seq is not None:
                per_seq_kl.append(kl_per_seq.detach().float())
            weight = float(mask.sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        grad_norm, applied = self.engine.step()
        # a non-finite loss makes non-finite gradients, which every rank's step() detects and discards; a
        # non-finite loss with finite gradients is not expected, and is reported rather than trusted
        loss_nonfinite = dist_utils.all_reduce_sum(float(not loss_finite)) > 0  # a collective: every rank calls it
        if applied and loss_nonfinite:
            warnings.warn("non-finite loss but finite gradients: the step was applied")
        return grad_norm, applied
