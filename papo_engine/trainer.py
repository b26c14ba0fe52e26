"""The PAPO loop, and nothing else: rollout → reward → advantages → mask → old log-probs → update → log.

Each phase is a role (rollout backend, reward function, pure algorithms, actor forward, training engine)
and is timed under its own name in the metrics.
"""
from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import lora
from .actor import SequenceBatch, with_prompt_positions
from .old_policy import on_policy_reuse, rollout_mismatch
from .algorithms import gamma_at, group_advantages, loss_settings, overlong_penalty
from .batching import repeat_prompts
from .config import Config, ConfigError, TrainingStopped
from .data import GeneratedDataset, chance_accuracy
from .datasets import check_generated_prompts_fit, data_counts, load_dataset_files
from .dynamic_sampling import Rollouts, collect_informative_groups
from .evaluation import held_out_accuracy
from .head import FusedLMHead
from .hint_task import TASK as HINT_TASK, HintDataset
from .masking import mask_prompts
from .models import encode_prompts, load_image_processor, load_policy, load_tokenizer, prompt_token_limit
from .rewards import RewardRole
from .hybrid import HybridEngine
from .preemption import Preempted, StopSignals, check_stop
from .runlock import acquire_run_lock
from .rollout import build_rollout
from .rollout.base import SamplingParams
from .tracking import Tracker, plot_metrics
from .update import PolicyUpdate


WARMUP_STOPPED = "warmup_stopped.json"  # a start stopped during the warm-up: the next one says it redoes it


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
            if torch.cuda.is_available():  # a phase's GPU work is counted in that phase, not the next
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class PAPOTrainer(PolicyUpdate):
    def __init__(self, cfg: Config, resume: str | None = None):
        """`resume`: "latest" or a checkpoint folder to continue from; None starts a new run."""
        self.cfg = cfg
        self.rank, self.world = dist_utils.init_distributed(cfg.trainer.collective_timeout_s)
        self.device = dist_utils.device()  # where the update runs; rollouts, rewards and masks work on the host
        mini_batch = cfg.trainer.mini_batch_prompts or cfg.trainer.prompts_per_step
        if mini_batch % self.world:
            raise ConfigError(f"trainer.mini_batch_prompts={mini_batch} (prompts per optimizer step; "
                              f"trainer.prompts_per_step when 0): must be divisible by the number of ranks "
                              f"({self.world})")
        self.updates_per_step = cfg.trainer.prompts_per_step // mini_batch
        seed_everything(cfg.trainer.seed)
        self.out_dir = Path(cfg.trainer.output_dir)
        ckpt.check_output_dir(self.out_dir)
        # one run per folder (runlock.py): taken before anything in it is modified (partial checkpoints, metrics)
        self.run_lock = acquire_run_lock(self.out_dir, resume is not None, cfg.trainer.lock_wait_s)
        ckpt.check_shared_output_dir(self.out_dir)  # several nodes: one folder seen by all, not node-local disks
        self.restart = False  # --resume found no complete checkpoint: the run starts again from step 0
        self.resume_from = self._resume_point(resume)
        saved = ckpt.read_trainer_state(self.resume_from) if self.resume_from else ckpt.TrainerState(0, 0)
        self.tokenizer = load_tokenizer(cfg.model)
        self.image_processor = load_image_processor(cfg)
        # LoRA: the base the adapters apply to; a resumed run loads the one its first start wrote (lora.py)
        self.lora_base, model_cfg = lora.run_base(cfg, self.out_dir, self.resume_from is not None)
        from_base = model_cfg is not cfg.model
        model = load_policy(model_cfg, self.tokenizer, seed=cfg.trainer.seed)
        lora.check_targets(model, cfg.model.lora)  # before the warm-up: a bad target costs nothing
        FusedLMHead.replace_in(model, cfg.kernels.fused_head, cfg.kernels.backend)
        self.train_set = self._dataset("train", cfg.data.train_files)
        self.eval_set = self._dataset("eval", cfg.data.eval_files)
        self.reward = RewardRole(cfg)
        self.reward.check(self.train_set[0].answer)  # a reward function that fails is named before the warm-up
        self.stop_point("during model building")
        self.warmup_log: list[dict] = []
        # a resumed policy already holds the warm-start; it is re-run only to rebuild the reference (β > 0),
        # which is the post-warm-start policy and deterministic given the seed
        if cfg.warmup.steps > 0 and not from_base and (self.resume_from is None or cfg.algo.ref_kl_coef > 0):
            from .warmup import format_warmup
            if dist_utils.is_main() and (self.out_dir / WARMUP_STOPPED).is_file():
                print(f"papo: the previous start was stopped during the warm-up "
                      f"({(self.out_dir / WARMUP_STOPPED).read_text().strip()}): redoing it from its start", flush=True)
            self.warmup_log = format_warmup(model, self, cfg.warmup, stop_check=self.warmup_stop_point)
            if dist_utils.is_main():
                (self.out_dir / WARMUP_STOPPED).unlink(missing_ok=True)
        if self.lora_base is not None:  # the base written once where it is not on disk, then the adapters on it
            adapters_off = lora.start_adapters(model, cfg, self.lora_base, not from_base and dist_utils.is_main(),
                                               self.tokenizer, self.image_processor)
        from .engine import TrainingEngine, frozen_reference
        # vLLM sizes its memory from what is free when it starts: before the trainer's states are allocated
        rollout = build_rollout(cfg, None, self.tokenizer, self.world) if cfg.rollout.backend == "vllm" else None
        # β > 0: a frozen copy of the starting policy (after the warm-start), under LoRA the base; none when β = 0
        self.reference = None if cfg.algo.ref_kl_coef == 0 else adapters_off if self.lora_base is not None else \
            frozen_reference(model, cfg, self.world)
        self.engine = TrainingEngine(model, cfg, self.world)
        rollout = rollout or build_rollout(cfg, self.engine.module, self.tokenizer, self.world)
        self.hybrid = HybridEngine(self.engine, rollout, cfg)
        self.sampling = SamplingParams(cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p,
                                       cfg.rollout.max_new_tokens, seed=cfg.trainer.seed)
        self.derive_algorithm()
        self.data_cursor = 0
        self.start_step, self.history, self.nonfinite_skipped, self.consecutive_skips = 0, [], 0, 0
        self.decode_counts = [0.0, 0.0]  # this step's decode: tokens generated, row-steps computed
        self.last_saved_step = None
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.resume_from, self.engine, self.rank)  # also this rank's RNG
            self.data_cursor, self.start_step = state.data_cursor, state.step
            self.history, self.nonfinite_skipped = state.history, state.nonfinite_skipped
            if dist_utils.is_main():
                print(f"papo: resumed from {self.resume_from} at step {self.start_step}", flush=True)
        # NaN/inf weights (an earlier run's, an overflowing warm-up) are neither trained on nor saved again
        self.engine.require_finite_parameters(f"--resume {self.resume_from}" if self.resume_from else
                                              f"after the warm-up (warmup.lr={cfg.warmup.lr:g})" if self.warmup_log
                                              else f"model.path={cfg.model.path!r}")
        self.stop_point("while building the training engine")
        # only now, with the checkpoint loaded, may metrics.jsonl lose the steps logged after it
        self.tracker = Tracker(self.out_dir, cfg.to_dict(), cfg.logging.wandb, cfg.logging.project,
                               cfg.logging.run_name, enabled=dist_utils.is_main(), resume_run_id=saved.wandb_run_id,
                               resume_step=self.start_step if self.resume_from or self.restart else None)

    def stop_point(self, stage: str, redo: str = "") -> None:
        """Before the first step (collective, `papo train` only): stop here with one line if SIGTERM/SIGINT was
        received, saying that nothing was saved yet and how to continue (preemption.py)."""
        if self.resume_from is not None:
            saved = f"nothing new was saved ({self.resume_from} is unchanged); continue with --resume"
        elif self.restart:
            saved = "nothing was saved yet; start it again with --resume"
        else:
            saved = "nothing was saved yet; run the same command again to start"
        check_stop(stage, redo + saved)

    def warmup_stop_point(self, done: int) -> None:
        """After every warm-up step: a stop here records the step in the folder, so the next start says that the
        warm-up it redoes was interrupted (the warm-up keeps no state of its own: it is redone from its start)."""
        total = self.cfg.warmup.steps
        if done >= total:
            return
        try:
            self.stop_point(f"during the warm-up (step {done} of {total})",
                            "the warm-up is redone from its start on the next run; ")
        except Preempted:
            if dist_utils.is_main():
                (self.out_dir / WARMUP_STOPPED).write_text(json.dumps({"done": done, "steps": total}))
            raise

    def derive_algorithm(self) -> None:
        """The loss settings and the branches to run, from self.cfg.algo / trainer (called again by benchmarks
        that time several algorithms on one model, each on its own shallow copy of the trainer)."""
        cfg = self.cfg
        self.settings = loss_settings(cfg.algo)
        # GRPO/DAPO (γ = η_mask = 0): no masked images, no masked branch — a true baseline, not PAPO at γ = 0
        a = cfg.algo
        self.masked_branch = a.gamma > 0 or (a.gamma_schedule == "linear" and a.gamma_final > 0) or a.eta_mask > 0
        # exactly on-policy: π_old is the update forward itself, detached — no separate no-grad pass (old_policy.py)
        self.reuse_update_forward = on_policy_reuse(cfg, self.updates_per_step)
        # ... and no gradient through the masked branch (official): no-grad forwards of the masked half (a few
        # micro-batches each) feed the update's head calls, which give π_old's masked-branch constants and KL
        self.masked_forward_without_grad = (self.reuse_update_forward and self.masked_branch
                                            and not self.settings.masked_grad)

    def _dataset(self, split: str, files: list):
        """Local files when given, else the generated task's split; None (no held-out set) for local training
        files without data.eval_files: the generated task's held-out split would be another task."""
        if files:
            return load_dataset_files(files, self.cfg.data, self.tokenizer, self.image_processor, split,
                                      prompt_token_limit(self.cfg))
        if self.cfg.data.train_files:
            if dist_utils.is_main():
                print("papo: data.eval_files is empty: no held-out evaluation at the end (summary.json says so); "
                      "set data.eval_files to held-out files in the training data's schema", flush=True)
            return None
        if split == "train" and self.cfg.data.max_prompt_length:  # no generated prompt is dropped: all must fit
            check_generated_prompts_fit(self.cfg.data, self.tokenizer, self.image_processor)
        size = self.cfg.data.train_size if split == "train" else self.cfg.data.eval_size
        if self.cfg.data.task == HINT_TASK:
            return HintDataset(split, size, self.cfg.data.seed, self.cfg.data.image_size, self.cfg.data.hint_accuracy)
        return GeneratedDataset(self.cfg.data.task, split, size, self.cfg.data.seed, self.cfg.data.image_size)

    def _resume_point(self, resume: str | None) -> Path | None:
        """The checkpoint to continue from; a new run refuses an output_dir that already holds a run.
        `--resume` on a run that stopped before its first checkpoint starts it again from step 0; on a finished run
        (summary.json, all trainer.steps done) it is refused: nothing is redone or overwritten."""
        complete = ckpt.complete_checkpoints(self.out_dir)
        self.previous_summary = ckpt.unfinished_run_summary(self.out_dir, self.cfg.trainer.steps) if resume else {}
        if resume is None:
            if (self.out_dir / "metrics.jsonl").is_file() or complete:
                how = ("pass --resume to continue it" if complete else
                       "it has no complete checkpoint: pass --resume to start it again from step 0")
                raise ConfigError(f"trainer.output_dir={str(self.out_dir)!r} already holds a run: {how}, or set "
                                  f"another trainer.output_dir")
            return None
        if resume == "latest" and not complete:
            if dist_utils.is_main():
                ckpt.remove_partial(self.out_dir)
                print(f"papo: --resume: no complete checkpoint in {self.out_dir}: starting the run from step 0",
                      flush=True)
            self.restart = True
            return None
        path = ckpt.resolve_resume(self.out_dir, resume)
        ckpt.verify_checkpoint(path)
        ckpt.check_same_run(path, self.cfg.to_dict())
        if dist_utils.is_main():
            ckpt.remove_partial(self.out_dir)
        return path

    def save_checkpoint(self, step: int) -> Path:
        self.last_saved_step = step
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
        if out.row_steps is not None:  # the step's decode: tokens generated, row-steps computed
            self.decode_counts = [self.decode_counts[0] + float(out.response_mask.sum()),
                                  self.decode_counts[1] + out.row_steps]
        answers = [s.answer for s in samples for _ in range(self.sampling.n)]
        try:  # a bad reward on one rank's share stops every rank together, with one line (no hang)
            scores, error = self.reward(out.texts, answers), None
        except ConfigError as err:
            scores, error = None, err
        dist_utils.raise_together(error)
        if self.cfg.algo.overlong_buffer > 0:
            scores["reward"] = scores["reward"] + overlong_penalty(
                out.response_mask.sum(1), self.sampling.max_new_tokens, self.cfg.algo.overlong_buffer,
                self.cfg.algo.overlong_penalty)
        groups = torch.arange(len(samples)).repeat_interleave(self.sampling.n)  # the n responses share a prompt
        sequences = SequenceBatch(repeat_prompts(prompts, self.sampling.n), out.response_ids, out.response_mask,
                                  prompt_group=groups)
        return Rollouts(prompts, keys, [s.answer for s in samples], sequences, scores, out.texts,
                        rollout_logprobs=out.logprobs)

    def collect(self, timer: Timer) -> tuple[Rollouts, dict]:
        """Generate for this step's prompts; with DAPO dynamic sampling, keep only informative groups and
        regenerate (bounded rounds) until the batch is full again (`dynamic_sampling.py`)."""
        def draw_batch() -> Rollouts:
            return self.generate(*self.next_prompts(self.cfg.trainer.prompts_per_step), timer)

        if not self.cfg.algo.dynamic_sampling:
            return draw_batch(), {}
        return collect_informative_groups(draw_batch, self.cfg.trainer.prompts_per_step // self.world,
                                          self.sampling.n, self.cfg.algo.dynamic_sampling_max_rounds,
                                          self.tokenizer.pad_token_id, self.cfg.algo.dynamic_sampling_metric)

    def attach_masks(self, batch: Rollouts) -> torch.Tensor:
        """One mask per prompt, shared by the prompt's n responses, seeded by the prompt's key (fresh every draw,
        the same on any rank)."""
        masked, drawn = mask_prompts(self.cfg.mask, batch.prompts, batch.prompt_keys, self.sampling.n,
                                     self.cfg.trainer.seed, self.image_processor)  # grid units or raw squares
        batch.sequences.masked_pixel_values = masked
        return drawn

    # ------------------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> dict:
        steps = self.cfg.trainer.steps
        bar = tqdm(range(self.start_step, steps), desc="PAPO", disable=not dist_utils.is_main(), dynamic_ncols=True,
                   initial=self.start_step, total=steps)
        with StopSignals() as signals:  # SIGTERM / SIGINT: stop after the current step (preemption.py)
            for step in bar:
                metrics = self.train_step(step)
                if self.run_lock is not None:  # rank 0: the folder's lock record says the run is alive
                    self.run_lock.heartbeat(step + 1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics.get('accuracy', 0):.2f}",
                                kl=f"{metrics.get('perception_kl', 0.0):.3f}", len=f"{metrics['response_length']:.0f}")
                signum = signals.agreed_stop()  # collective: all ranks stop at the same step
                if signum is not None:
                    self.stop_preempted(step + 1, signum)
        return self.finish(self.history)

    def stop_preempted(self, steps_done: int, signum: int) -> None:
        """Checkpoint the `steps_done` steps (unless that step was just saved), flush the metrics and W&B, and
        raise Preempted (the CLI prints its one line and exits with 128 + signum)."""
        path = ckpt.checkpoints_dir(self.out_dir) / f"step-{steps_done:06d}"
        if self.last_saved_step != steps_done:
            path = self.save_checkpoint(steps_done)
        self.tracker.close()
        name = signal.Signals(signum).name
        raise Preempted(f"{name} received: saved {path} after step {steps_done} of {self.cfg.trainer.steps}; "
                        f"continue with --resume", signum)

    def train_step(self, step: int) -> dict:
        """One PAPO step: rollout, reward, advantages, masks, old log-probs, update, metrics, checkpoint."""
        cfg = self.cfg
        steps = cfg.trainer.steps
        timer = Timer()
        step_start = time.perf_counter()
        self.decode_counts = [0.0, 0.0]
        batch, info = self.collect(timer)
        with timer.phase("advantages"):
            advantages = group_advantages(batch.scores["reward"], self.sampling.n, cfg.algo.norm_adv_by_std)
            if self.masked_branch:
                self.attach_masks(batch)
            seqs, advantages = batch.sequences.to(self.device), advantages.to(self.device)
            seqs = with_prompt_positions(self.engine.module, seqs)  # once a step, for every forward below
            rollout_logprobs = None if batch.rollout_logprobs is None else batch.rollout_logprobs.to(self.device)
        with timer.phase("old_logprobs"):  # on-policy reuse: only the reference's pass (β > 0) runs here
            old = self.old_stats(seqs, rollout_logprobs)
        gamma = gamma_at(step, steps, cfg.algo)
        lr = learning_rate(step, steps, cfg.optim)
        self.engine.set_lr(lr)
        with timer.phase("update"):
            upd = self.update(seqs, advantages, old, gamma)
        self.hybrid.mark_weights_updated()
        mismatch = rollout_mismatch(old, rollout_logprobs, seqs.response_mask)  # π_old is complete now
        per_seq_kl = upd.pop("_per_seq_kl")
        applied = upd.pop("_applied")
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1
        self.nonfinite_skipped += 0 if applied else 1
        mask = seqs.response_mask
        valid = batch.sequences.response_mask.sum(1) > 0  # on the host, like the scores; DAPO padding: no tokens
        tokens, sequences = float(mask.sum()), float(valid.sum())
        masked = {  # perception diagnostics exist only where the masked branch runs
            "perception_kl": (float((old["kl"] * mask).sum()), tokens),
            "masked_entropy": (float((old["masked_entropy"] * mask).sum()), tokens),
            "perception_reliance_mean": (float(per_seq_kl.sum()), float(len(per_seq_kl))),
        } if self.masked_branch else {}
        lengths = batch.sequences.response_mask.sum(1)[valid]
        prompt_lengths = batch.prompts.attention_mask.sum(1).float()
        generated, row_steps = self.decode_counts
        metrics = dist_utils.global_means({  # over all ranks' sequences / tokens
            **{k: (float(v[valid].sum()), sequences) for k, v in batch.scores.items()},
            "response_length": (float(mask.sum()), sequences),
            "response_length/clip_ratio": (float((lengths >= self.sampling.max_new_tokens).sum()), sequences),
            "prompt_length": (float(prompt_lengths.sum()), float(len(prompt_lengths))),
            "entropy": (float((old["entropy"] * mask).sum()), tokens),
            **({"rollout/row_utilization": (generated, row_steps)} if row_steps else {}),
            **masked, **mismatch,
        })
        metrics["response_length/max"], metrics["prompt_length/max"] = dist_utils.all_reduce_maxes(
            [float(lengths.max()) if len(lengths) else 0.0, float(prompt_lengths.max())])
        metrics.update({
            "clip_fraction": upd.get("update/pg_clipfrac", 0.0),
            "gamma": gamma, "lr": lr, **upd, **info,
            "nonfinite/skipped_step": float(not applied), "nonfinite/skipped_total": self.nonfinite_skipped,
            **{f"time/{k}": v for k, v in timer.seconds.items()},
            "time/step": time.perf_counter() - step_start,
        })
        if self.hybrid.last_sync_check is not None:
            metrics["rollout/sync_check"] = self.hybrid.last_sync_check
        metrics = self._reduce_metrics(metrics)
        if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0 and step + 1 < steps:
            metrics["eval/accuracy"] = held_out_accuracy(self)
        self.tracker.log(step, metrics, histograms={"perception_reliance": per_seq_kl.tolist()},
                         samples=[{"answer": batch.answers[0], "response": t, "reward": float(r)}
                                  for t, r in zip(batch.texts[:2], batch.scores["reward"][:2])])
        self.history.append(metrics)
        skips = self.consecutive_skips
        if not applied:
            tqdm.write(f"papo: step {step}: non-finite loss or gradient norm, update skipped "
                       f"({skips} in a row, {self.nonfinite_skipped} in total)")
        if self.engine.nonfinite_after_step:  # finite loss and gradients, but the update overflowed: stop unsaved
            raise TrainingStopped(f"step {step}: the optimizer step made {self.engine.nonfinite_after_step:,} of "
                                  f"{self.engine.parameter_count:,} parameter values NaN or inf (lr {lr:g}; loss and "
                                  f"gradients finite); they were not saved, {ckpt.newest_text(self.out_dir)}; lower "
                                  f"optim.lr and start a new trainer.output_dir")
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

    def finish(self, history: list[dict]) -> dict:
        cfg = self.cfg
        summary = {"steps": len(history)}
        if not cfg.data.train_files:  # the generated task's
            summary["chance_accuracy"] = chance_accuracy(cfg.data.task)
        for split, dataset in (("train", self.train_set), ("eval", self.eval_set)):  # local files: every rank
            if getattr(dataset, "skipped", None) is not None:  # loads them all, so these counts are global
                summary[f"data_{split}"] = data_counts(dataset)
        if cfg.trainer.save_final:  # before the evaluation: an error there must not lose the final weights
            path = self.out_dir / "checkpoint-final"
            try:
                self.engine.save_pretrained(path, self.tokenizer, self.image_processor)
            except Exception as err:
                full = ckpt.no_space_left(err, self.out_dir)
                if full is None:
                    raise
                raise TrainingStopped(f"{full}; the final model was not written (the training checkpoints under "
                                      f"{ckpt.checkpoints_dir(self.out_dir)} are intact)") from None
            summary["checkpoint"] = str(path)
        done = f"training finished (all {self.cfg.trainer.steps} steps)"
        model = (f"the final model is saved at {summary['checkpoint']}" if "checkpoint" in summary else
                 f"the training checkpoints are under {ckpt.checkpoints_dir(self.out_dir)} (`papo export` one)")
        self._final_stop_point("while saving the final model",
                               f"{done}; {model}; the final evaluation was not run: run `papo eval --model <the "
                               f"model> --data <files>`; nothing to continue")
        summary["eval_accuracy"] = None if self.eval_set is None else held_out_accuracy(self)
        if self.eval_set is None:
            summary["eval"] = "not run: data.train_files without data.eval_files (no held-out files given)"
        if history:
            k = max(1, len(history) // 5)
            first = sum(h["reward"] for h in history[:k]) / k
            last = sum(h["reward"] for h in history[-k:]) / k
            summary.update(reward_first_20pct=first, reward_last_20pct=last,
                           reward_ratio=last / first if first > 0 else None)
        if dist_utils.is_main():
            if cfg.logging.plot and history:
                summary["plot"] = str(plot_metrics(self.tracker.metrics_path, self.out_dir / "curves.png",
                                                   f"PAPO on {cfg.data.task}"))
            summary["metrics"] = str(self.tracker.metrics_path)
            summary["wandb_dir"] = self.tracker.wandb_dir
            if self.warmup_log:
                summary["warmup_final_loss"] = self.warmup_log[-1]["loss"]
            elif "warmup_final_loss" in self.previous_summary:  # a continued run: the warm-up ran in its first start
                summary["warmup_final_loss"] = self.previous_summary["warmup_final_loss"]
            self.tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._final_stop_point("during the final evaluation",
                               f"{done} and evaluated; {model}, the summary at {self.out_dir / 'summary.json'}; "
                               f"nothing to continue")
        self.tracker.close()
        return summary

    def _final_stop_point(self, stage: str, saved: str) -> None:
        """After the last step (collective, `papo train` only): a SIGTERM/SIGINT received since stops here."""
        try:
            check_stop(stage, saved)
        except Preempted:
            self.tracker.close()
            raise
