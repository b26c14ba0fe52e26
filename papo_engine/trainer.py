"""The PAPO loop, and nothing else: rollout → reward → advantages → mask → old log-probs → update → log.

Each phase is a role (rollout backend, reward function, pure algorithms, actor forward, training engine)
and is timed under its own name in the metrics.
"""
from __future__ import annotations

import inspect
import json
import math
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .actor import SequenceBatch, response_token_stats
from .algorithms import LossInputs, gamma_at, group_advantages, informative_groups, loss_settings, \
    overlong_penalty, papo_loss
from .batching import concat_prompts, repeat_prompts, select_prompts
from .config import Config, ConfigError, TrainingStopped
from .data import GeneratedDataset, chance_accuracy
from .datasets import load_dataset_files
from .head import FusedLMHead
from .masking import mask_per_prompt
from .models import PromptBatch, encode_prompts, load_image_processor, load_policy, load_tokenizer
from .rewards import load_reward_fn
from .hybrid import HybridEngine
from .rollout import build_rollout
from .rollout.base import SamplingParams
from .tracking import Tracker, plot_metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(step: int, total_steps: int, optim) -> float:
    """Linear warm-up over optim.warmup_steps, then constant or cosine down to 10% of optim.lr."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return optim.lr
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps - 1)
    return optim.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class RewardRole:
    """Calls the configured reward function; weights are passed only if the function declares them."""

    def __init__(self, cfg: Config):
        self.fn = load_reward_fn(cfg.reward.function)
        params = inspect.signature(self.fn).parameters
        self.kwargs = {k: v for k, v in (("accuracy_weight", cfg.reward.accuracy_weight),
                                         ("format_weight", cfg.reward.format_weight)) if k in params}

    def __call__(self, texts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.fn(t, a, **self.kwargs) for t, a in zip(texts, answers)]
        keys = rows[0].keys() if rows else ["reward"]
        return {k: torch.tensor([float(r[k]) for r in rows]) for k in keys}


@dataclass
class Rollouts:
    """One step's experience, prompt-major (row g*n + k = k-th response to prompt g)."""
    prompts: PromptBatch     # the B prompts (un-repeated)
    prompt_keys: list[int]   # each prompt's global draw index: seeds its sampling and its mask on any rank
    answers: list[str]
    sequences: SequenceBatch
    scores: dict[str, torch.Tensor]
    texts: list[str]


class PAPOTrainer:
    def __init__(self, cfg: Config, resume: str | None = None):
        """`resume`: "latest" or a checkpoint folder to continue from; None starts a new run."""
        self.cfg = cfg
        self.rank, self.world = dist_utils.init_distributed()
        mini_batch = cfg.trainer.mini_batch_prompts or cfg.trainer.prompts_per_step
        if mini_batch % self.world:
            raise ConfigError(f"trainer.mini_batch_prompts={mini_batch} (prompts per optimizer step; "
                              f"trainer.prompts_per_step when 0): must be divisible by the number of ranks "
                              f"({self.world})")
        self.updates_per_step = cfg.trainer.prompts_per_step // mini_batch
        seed_everything(cfg.trainer.seed)
        self.out_dir = Path(cfg.trainer.output_dir)
        self.resume_from = self._resume_point(resume)
        saved = ckpt.read_trainer_state(self.resume_from) if self.resume_from else ckpt.TrainerState(0, 0)
        self.tokenizer = load_tokenizer(cfg.model)
        self.image_processor = load_image_processor(cfg)
        model = load_policy(cfg.model, self.tokenizer, seed=cfg.trainer.seed)
        FusedLMHead.replace_in(model, cfg.kernels.fused_head, cfg.kernels.backend)
        self.train_set = self._dataset("train", cfg.data.train_files)
        self.eval_set = self._dataset("eval", cfg.data.eval_files)
        self.reward = RewardRole(cfg)
        self.tracker = Tracker(self.out_dir, cfg.to_dict(), cfg.logging.wandb, cfg.logging.project,
                               cfg.logging.run_name, enabled=dist_utils.is_main(), resume_run_id=saved.wandb_run_id,
                               resume_step=saved.step if self.resume_from else None)
        self.warmup_log: list[dict] = []
        # a resumed policy already holds the warm-start; it is re-run only to rebuild the reference (β > 0),
        # which is the post-warm-start policy and deterministic given the seed
        if cfg.warmup.steps > 0 and (self.resume_from is None or cfg.algo.ref_kl_coef > 0):
            from .warmup import format_warmup
            self.warmup_log = format_warmup(model, self, cfg.warmup)
        from .engine import TrainingEngine, frozen_reference
        # vLLM sizes its memory from what is free when it starts: before the trainer's states are allocated
        rollout = build_rollout(cfg, None, self.tokenizer, self.world) if cfg.rollout.backend == "vllm" else None
        # β > 0: a frozen copy of the starting policy (after the warm-start); none when β = 0
        self.reference = frozen_reference(model, cfg, self.world) if cfg.algo.ref_kl_coef > 0 else None
        self.engine = TrainingEngine(model, cfg, self.world)
        rollout = rollout or build_rollout(cfg, self.engine.module, self.tokenizer, self.world)
        self.hybrid = HybridEngine(self.engine, rollout, cfg)
        self.sampling = SamplingParams(cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p,
                                       cfg.rollout.max_new_tokens, seed=cfg.trainer.seed)
        self.settings = loss_settings(cfg.algo)
        # GRPO/DAPO (γ = η_mask = 0): no masked images, no masked branch — a true baseline, not PAPO at γ = 0
        a = cfg.algo
        self.masked_branch = a.gamma > 0 or (a.gamma_schedule == "linear" and a.gamma_final > 0) or a.eta_mask > 0
        self.data_cursor = 0
        self.start_step, self.history, self.nonfinite_skipped, self.consecutive_skips = 0, [], 0, 0
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.resume_from, self.engine, self.rank)  # also this rank's RNG
            self.data_cursor, self.start_step = state.data_cursor, state.step
            self.history, self.nonfinite_skipped = state.history, state.nonfinite_skipped
            if dist_utils.is_main():
                print(f"papo: resumed from {self.resume_from} at step {self.start_step}", flush=True)

    def _dataset(self, split: str, files: list):
        """Local files when given, else the generated task's split."""
        if files:
            return load_dataset_files(files, self.cfg.data, self.tokenizer, self.image_processor, split)
        size = self.cfg.data.train_size if split == "train" else self.cfg.data.eval_size
        return GeneratedDataset(self.cfg.data.task, split, size, self.cfg.data.seed, self.cfg.data.image_size)

    def _resume_point(self, resume: str | None) -> Path | None:
        """The checkpoint to continue from; a new run refuses an output_dir that already holds a run."""
        if resume is None:
            if (self.out_dir / "metrics.jsonl").is_file() or ckpt.complete_checkpoints(self.out_dir):
                raise ConfigError(f"trainer.output_dir={str(self.out_dir)!r} already holds a run: pass --resume to "
                                  f"continue it, or set another trainer.output_dir")
            return None
        path = ckpt.resolve_resume(self.out_dir, resume)
        ckpt.check_same_run(path, self.cfg.to_dict())
        if dist_utils.is_main():
            ckpt.remove_partial(self.out_dir)
        return path

    def save_checkpoint(self, step: int) -> Path:
        state = ckpt.TrainerState(step=step, data_cursor=self.data_cursor, history=self.history,
                                  wandb_run_id=self.tracker.run_id, nonfinite_skipped=self.nonfinite_skipped)
        return ckpt.save_checkpoint(self.out_dir, self.engine, state, self.cfg.to_dict(), self.rank,
                                    self.tokenizer, self.image_processor, self.cfg.trainer.keep_last)

    # ------------------------------------------------------------------------------------------------------
    # data

    def next_prompts(self, count: int) -> tuple[list, list[int]]:
        """`count` global prompts in a seeded per-epoch order, split into the step's optimizer mini-batches;
        this rank keeps its contiguous share of each mini-batch, so global mini-batch i is the union of the
        ranks' local mini-batch i whatever the number of ranks.
        Returns (samples, keys): a prompt's key is its global draw index, the same on every rank."""
        per_update = count // self.updates_per_step
        share = per_update // self.world
        keys = [self.data_cursor + i * per_update + self.rank * share + j
                for i in range(self.updates_per_step) for j in range(share)]
        samples = []
        for key in keys:
            epoch, pos = divmod(key, len(self.train_set))
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(
                self.cfg.data.seed * 1000 + epoch))
            samples.append(self.train_set[int(order[pos])])
        self.data_cursor += count
        return samples, keys

    def encode(self, samples):
        return encode_prompts([s.question for s in samples], [s.images for s in samples], self.tokenizer,
                              self.image_processor)

    # ------------------------------------------------------------------------------------------------------
    # phases

    def generate(self, samples, keys: list[int], timer: Timer | None = None) -> Rollouts:
        prompts = self.encode(samples)
        out = self.hybrid.generate(prompts, self.sampling, timer, prompt_keys=keys)
        answers = [s.answer for s in samples for _ in range(self.sampling.n)]
        scores = self.reward(out.texts, answers)
        if self.cfg.algo.overlong_buffer > 0:
            scores["reward"] = scores["reward"] + overlong_penalty(
                out.response_mask.sum(1), self.sampling.max_new_tokens, self.cfg.algo.overlong_buffer,
                self.cfg.algo.overlong_penalty)
        groups = torch.arange(len(samples)).repeat_interleave(self.sampling.n)  # the n responses share a prompt
        sequences = SequenceBatch(repeat_prompts(prompts, self.sampling.n), out.response_ids, out.response_mask,
                                  prompt_group=groups)
        return Rollouts(prompts, keys, [s.answer for s in samples], sequences, scores, out.texts)

    def collect(self, timer: Timer) -> tuple[Rollouts, dict]:
        """Generate for this step's prompts; with DAPO dynamic sampling, keep only groups whose rewards differ
        and regenerate (bounded rounds) until the batch is full again."""
        per_rank = self.cfg.trainer.prompts_per_step // self.world
        n = self.sampling.n
        batch = self.generate(*self.next_prompts(self.cfg.trainer.prompts_per_step), timer)
        info = {}
        if not self.cfg.algo.dynamic_sampling:
            return batch, info
        kept, dropped, rounds = [], 0, 1
        pieces = [batch]
        while True:
            keep = informative_groups(pieces[-1].scores["reward"], n)
            dropped += int((~keep).sum())
            kept.extend((len(pieces) - 1, g) for g in torch.nonzero(keep).flatten().tolist())
            # collective: every rank generates in every round (ZeRO-3 generation gathers parameters together)
            short = dist_utils.all_reduce_sum(float(len(kept) < per_rank))
            if short == 0 or rounds >= self.cfg.algo.dynamic_sampling_max_rounds:
                break
            pieces.append(self.generate(*self.next_prompts(self.cfg.trainer.prompts_per_step), timer))
            rounds += 1
        info = {"dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/rounds": rounds,
                "dynamic_sampling/kept_groups": min(len(kept), per_rank)}
        if not kept:  # nothing informative at all: train on the last batch (zero advantages, no-op pg)
            return pieces[-1], info
        kept = kept[:per_rank]
        # every rank trains on per_rank groups (equal micro-batch counts keep DeepSpeed's collectives in step):
        # missing groups are copies of kept ones with their responses masked out, so they add nothing
        padding = per_rank - len(kept)
        batch = self._merge_groups(pieces, kept + [kept[i % len(kept)] for i in range(padding)])
        if padding:
            batch.sequences.response_mask[-padding * n:] = 0
        info["dynamic_sampling/padding_groups"] = padding
        return batch, info

    def _merge_groups(self, pieces: list[Rollouts], kept: list[tuple[int, int]]) -> Rollouts:
        """One batch from group `g` of piece `i` for each (i, g) in `kept`, in that order."""
        n, pad = self.sampling.n, self.tokenizer.pad_token_id
        groups = []
        for piece_id, g in kept:
            p, rows = pieces[piece_id], list(range(g * n, (g + 1) * n))
            groups.append(Rollouts(select_prompts(p.prompts, [g]), [p.prompt_keys[g]], [p.answers[g]],
                                   SequenceBatch(select_prompts(p.sequences.prompts, rows),
                                                 p.sequences.response_ids[rows], p.sequences.response_mask[rows]),
                                   {k: v[rows] for k, v in p.scores.items()}, [p.texts[r] for r in rows]))
        width = max(x.sequences.response_ids.shape[1] for x in groups)

        def right_pad(t: torch.Tensor, value) -> torch.Tensor:
            return F.pad(t, (0, width - t.shape[1]), value=value)

        sequences = SequenceBatch(concat_prompts([x.sequences.prompts for x in groups], pad),
                                  torch.cat([right_pad(x.sequences.response_ids, pad) for x in groups]),
                                  torch.cat([right_pad(x.sequences.response_mask, 0.0) for x in groups]),
                                  prompt_group=torch.arange(len(groups)).repeat_interleave(n))
        return Rollouts(concat_prompts([x.prompts for x in groups], pad), [k for x in groups for k in x.prompt_keys],
                        [a for x in groups for a in x.answers],
                        sequences, {k: torch.cat([x.scores[k] for x in groups]) for k in groups[0].scores},
                        [t for x in groups for t in x.texts])

    def attach_masks(self, batch: Rollouts) -> torch.Tensor:
        """One mask per prompt, shared by the prompt's n responses, seeded by the prompt's key (fresh every draw,
        the same on any rank)."""
        gen = [torch.Generator().manual_seed(self.cfg.trainer.seed * 1_000_003 + key) for key in batch.prompt_keys]
        masked, _, unit_mask = mask_per_prompt(
            batch.prompts.pixel_values, batch.prompts.image_grid_thw, self.sampling.n, self.cfg.mask.ratio,
            self.cfg.mask.unit, self.cfg.mask.fill, self.image_processor.image_mean,
            self.image_processor.image_std, gen, self.image_processor.merge_size, batch.prompts.images_per_prompt)
        batch.sequences.masked_pixel_values = masked
        return unit_mask

    def micro_batches(self, start: int, stop: int) -> list[tuple[int, int]]:
        size = self.cfg.trainer.micro_batch_size
        return [(s, min(s + size, stop)) for s in range(start, stop, size)]

    @torch.no_grad()
    def old_stats(self, seqs: SequenceBatch) -> dict[str, torch.Tensor]:
        """Rollout-time log-probs of both branches in one no-grad forward per micro-batch (+ the reference's)."""
        model, temperature = self.engine.module, self.sampling.temperature
        parts = []
        for a, b in self.micro_batches(0, len(seqs)):
            mb = seqs.slice(a, b)
            part = response_token_stats(model, mb, both_branches=self.masked_branch, temperature=temperature)
            if self.reference is not None:
                part["ref_logprobs"] = response_token_stats(self.reference, mb, both_branches=False,
                                                            temperature=temperature)["logprobs"]
            parts.append(part)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def update(self, seqs: SequenceBatch, advantages: torch.Tensor, old: dict, gamma: float) -> dict:
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
        out = {f"update/{k}": v for k, v in dist_utils.global_means(
            {k: (v, total) for k, v in sums.items() if k != "loss"}).items()}
        optimizer_steps = self.cfg.trainer.ppo_epochs * self.updates_per_step
        out["update/loss"] = dist_utils.all_reduce_sum(sums.get("loss", 0.0)) / optimizer_steps
        if self.settings.official:  # the authors' loss is a per-rank mean, averaged over ranks
            out["update/loss"] /= self.world
        out["grad_norm"] = grad_norm
        out["_applied"] = applied_all
        out["_per_seq_kl"] = torch.cat(per_seq_kl) if per_seq_kl else torch.zeros(0)
        return out

    def _optimizer_step(self, seqs: SequenceBatch, lo: int, hi: int, advantages: torch.Tensor, old: dict,
                        gamma: float, sums: dict, per_seq_kl: list | None) -> tuple[float, bool]:
        """Sequences lo..hi-1: accumulate over micro-batches, then one optimizer step. Adds token-weighted metric
        sums to `sums` (and per-sequence perception KL to `per_seq_kl` when given)."""
        model = self.engine.module
        # official: the masked branch's log-probs are the rollout-time constants (no masked forward here)
        both = self.settings.masked_grad and self.masked_branch
        rollout_time = {k: old[k] for k in ("masked_logprobs", "masked_entropy", "kl") if k in old}
        valid = seqs.response_mask[lo:hi]
        global_tokens = dist_utils.all_reduce_sum(valid.sum())
        global_seqs = dist_utils.all_reduce_sum((valid.sum(1) > 0).sum())  # DAPO padding excluded
        chunks = self.micro_batches(lo, hi)
        loss_finite = True
        for i, (a, b) in enumerate(chunks):
            mb = seqs.slice(a, b)
            self.engine.start_micro_batch()
            stats = response_token_stats(model, mb, both_branches=both, temperature=self.sampling.temperature)
            mask = mb.response_mask
            masked = stats if both else {k: v[a:b] for k, v in rollout_time.items()}
            if self.settings.official:  # the authors: token-mean per micro-batch / accumulation count
                token_norm = mask.sum().clamp(min=1) * len(chunks)
            else:
                token_norm = global_tokens
            inputs = LossInputs(
                logprobs=stats["logprobs"], old_logprobs=old["logprobs"][a:b], response_mask=mask,
                advantages=advantages[a:b], entropy=stats["entropy"], masked_logprobs=masked.get("masked_logprobs"),
                masked_entropy=masked.get("masked_entropy"), full_kl=masked.get("kl"),
                ref_logprobs=old["ref_logprobs"][a:b] if "ref_logprobs" in old else None)
            loss, metrics = papo_loss(inputs, self.cfg.algo, gamma, token_normalizer=token_norm,
                                      seq_normalizer=global_seqs)
            loss_finite = loss_finite and bool(torch.isfinite(loss))
            # DeepSpeed averages gradients over ranks. Our loss is already a global mean, so undo that; the
            # authors' (official) loss is a per-rank mean that they average the same way.
            rank_scale = 1 if self.settings.official else self.world
            self.engine.backward(loss * rank_scale, last_micro_batch=i == len(chunks) - 1)
            kl_per_seq = metrics.pop("perception_kl_per_seq", None)
            if per_seq_kl is not None and kl_per_seq is not None:
                per_seq_kl.append(kl_per_seq.detach().float())
            weight = float(mask.sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
            sums["loss"] = sums.get("loss", 0.0) + float(loss)
        grad_norm, applied = self.engine.step()
        # a non-finite loss makes non-finite gradients, which every rank's step() detects and discards; a
        # non-finite loss with finite gradients is not expected, and is reported rather than trusted
        loss_nonfinite = dist_utils.all_reduce_sum(float(not loss_finite)) > 0  # a collective: every rank calls it
        if applied and loss_nonfinite:
            warnings.warn("non-finite loss but finite gradients: the step was applied")
        return grad_norm, applied

    # ------------------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> dict:
        steps = self.cfg.trainer.steps
        bar = tqdm(range(self.start_step, steps), desc="PAPO", disable=not dist_utils.is_main(), dynamic_ncols=True,
                   initial=self.start_step, total=steps)
        for step in bar:
            metrics = self.train_step(step)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics.get('accuracy', 0):.2f}",
                            kl=f"{metrics.get('perception_kl', 0.0):.3f}")
        return self.finish(self.history)

    def train_step(self, step: int) -> dict:
        """One PAPO step: rollout, reward, advantages, masks, old log-probs, update, metrics, checkpoint."""
        cfg = self.cfg
        steps = cfg.trainer.steps
        timer = Timer()
        step_start = time.perf_counter()
        batch, info = self.collect(timer)
        seqs = batch.sequences
        with timer.phase("advantages"):
            advantages = group_advantages(batch.scores["reward"], self.sampling.n, cfg.algo.norm_adv_by_std)
            if self.masked_branch:
                self.attach_masks(batch)
        with timer.phase("old_logprobs"):
            old = self.old_stats(seqs)
        gamma = gamma_at(step, steps, cfg.algo)
        lr = learning_rate(step, steps, cfg.optim)
        self.engine.set_lr(lr)
        with timer.phase("update"):
            upd = self.update(seqs, advantages, old, gamma)
        self.hybrid.mark_weights_updated()
        per_seq_kl = upd.pop("_per_seq_kl")
        applied = upd.pop("_applied")
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1
        self.nonfinite_skipped += 0 if applied else 1
        mask = seqs.response_mask
        valid = mask.sum(1) > 0  # DAPO padding groups have no response tokens
        tokens, sequences = float(mask.sum()), float(valid.sum())
        masked = {  # perception diagnostics exist only where the masked branch runs
            "perception_kl": (float((old["kl"] * mask).sum()), tokens),
            "masked_entropy": (float((old["masked_entropy"] * mask).sum()), tokens),
            "perception_reliance_mean": (float(per_seq_kl.sum()), float(len(per_seq_kl))),
        } if self.masked_branch else {}
        metrics = dist_utils.global_means({  # over all ranks' sequences / tokens
            **{k: (float(v[valid].sum()), sequences) for k, v in batch.scores.items()},
            "response_length": (float(mask.sum()), sequences),
            "entropy": (float((old["entropy"] * mask).sum()), tokens),
            **masked,
        })
        metrics.update({
            "clip_fraction": upd.get("update/pg_clipfrac", 0.0),
            "gamma": gamma, "lr": lr, **upd, **info,
            "nonfinite/skipped_step": float(not applied), "nonfinite/skipped_total": self.nonfinite_skipped,
            **{f"time/{k}": v for k, v in timer.seconds.items()},
            "time/step": time.perf_counter() - step_start,
        })
        metrics = self._reduce_metrics(metrics)
        if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0 and step + 1 < steps:
            metrics["eval/accuracy"] = self.evaluate()
        self.tracker.log(step, metrics, histograms={"perception_reliance": per_seq_kl.tolist()},
                         samples=[{"answer": batch.answers[0], "response": t, "reward": float(r)}
                                  for t, r in zip(batch.texts[:2], batch.scores["reward"][:2])])
        self.history.append(metrics)
        skips = self.consecutive_skips
        if not applied:
            tqdm.write(f"papo: step {step}: non-finite loss or gradient norm, update skipped "
                       f"({skips} in a row, {self.nonfinite_skipped} in total)")
        if skips >= cfg.trainer.max_nonfinite_steps:
            path = self.save_checkpoint(step + 1)
            raise TrainingStopped(f"{skips} consecutive steps had a non-finite loss or gradient norm "
                                  f"(trainer.max_nonfinite_steps={cfg.trainer.max_nonfinite_steps}); stopped "
                                  f"after saving {path}. Lower optim.lr or check the data of steps "
                                  f"{step + 1 - skips}..{step}")
        if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0:
            self.save_checkpoint(step + 1)
        return metrics

    def _reduce_metrics(self, metrics: dict) -> dict:
        """Average over ranks in one collective (per-rank timings and counts; global values stay as they are)."""
        if self.world == 1:
            return metrics
        names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
        means = [v / self.world for v in dist_utils.all_reduce_sums([float(metrics[k]) for k in names])]
        return {**metrics, **dict(zip(names, means))}

    @torch.no_grad()
    def evaluate(self, samples: int | None = None) -> float:
        """Greedy held-out accuracy (each rank a share, summed)."""
        count = min(samples or self.cfg.trainer.eval_samples, len(self.eval_set))
        mine = list(range(self.rank, count, self.world))
        correct = 0.0
        greedy = SamplingParams(1, 0.0, 1.0, self.sampling.max_new_tokens)
        size = self.cfg.rollout.batch_size
        calls = math.ceil(math.ceil(count / self.world) / size)  # the same on every rank
        for call in tqdm(range(calls), desc="held-out eval", disable=not dist_utils.is_main(), leave=False):
            index = mine[call * size:(call + 1) * size]
            # a rank out of prompts still generates (on a stand-in it then ignores): ZeRO-3 generation and
            # the weight push are collective
            chunk = [self.eval_set[i] for i in (index or [0])]
            out = self.hybrid.generate(self.encode(chunk), greedy)
            scores = self.reward(out.texts, [s.answer for s in chunk])
            correct += float(scores.get("accuracy", scores["reward"])[:len(index)].sum())
        return dist_utils.all_reduce_sum(correct) / count

    def finish(self, history: list[dict]) -> dict:
        cfg = self.cfg
        summary = {"steps": len(history)}
        if not cfg.data.eval_files:
            summary["chance_accuracy"] = chance_accuracy(cfg.data.task)
        summary["eval_accuracy"] = self.evaluate()
        if history:
            k = max(1, len(history) // 5)
            first = sum(h["reward"] for h in history[:k]) / k
            last = sum(h["reward"] for h in history[-k:]) / k
            summary.update(reward_first_20pct=first, reward_last_20pct=last,
                           reward_ratio=last / first if first > 0 else None)
        if cfg.trainer.save_final:
            path = self.out_dir / "checkpoint-final"
            self.engine.save_pretrained(path, self.tokenizer, self.image_processor)
            summary["checkpoint"] = str(path)
        if dist_utils.is_main():
            if cfg.logging.plot and history:
                summary["plot"] = str(plot_metrics(self.tracker.metrics_path, self.out_dir / "curves.png",
                                                   f"PAPO on {cfg.data.task}"))
            summary["metrics"] = str(self.tracker.metrics_path)
            summary["wandb_dir"] = self.tracker.wandb_dir
            if self.warmup_log:
                summary["warmup_final_loss"] = self.warmup_log[-1]["loss"]
            self.tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.tracker.close()
        return summary
