"""Rollout and training on the same GPUs: the trainer's weights go to the rollout engine once per training
step, the trainer's states can step aside while the engine generates.

For a backend holding its own copy of the weights (`rollout.needs_weight_sync`, i.e. vLLM) one `generate`:

    [offload trainer states except the parameters]          (deepspeed.offload_states_during_rollout)
    weight_sync:  wake(weights) -> push buckets -> [offload parameters] -> wake(kv_cache)   (only if stale)
    rollout:      generate -> reset caches -> sleep(1)
    [reload trainer states]
    [sync check, once, after the first push]                (rollout.sync_check)

The push reads the trainer's parameters, so they leave the GPU only after it. Weights are stale at start
(the engine loaded the checkpoint; the trainer may have warm-started) and after every optimizer step
(`mark_weights_updated()`); several `generate` calls in one step (DAPO regeneration, evaluation) push once.
For the HF backend (`generate` runs on the training module) it is just the `rollout` phase.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext

from .config import Config
from .models import PromptBatch
from .rollout.base import RolloutOutput, SamplingParams

logger = logging.getLogger(__name__)


class HybridEngine:
    def __init__(self, training_engine, rollout, cfg: Config):
        self.training_engine, self.rollout, self.cfg = training_engine, rollout, cfg
        self.needs_sync = bool(getattr(rollout, "needs_weight_sync", False))
        self.weights_stale = True
        self.syncs = 0
        self.last_sync_stats: dict = {}
        self.last_sync_check: float | None = None

    def mark_weights_updated(self) -> None:
        """The trainer calls this after each optimizer step: the engine's copy is now out of date."""
        self.weights_stale = True

    @staticmethod
    def _phase(timer, name: str):
        return timer.phase(name) if timer is not None else nullcontext()

    def _offload(self, include) -> None:
        self.training_engine.engine.offload_states(include=include)

    def generate(self, prompts: PromptBatch, sampling: SamplingParams, timer=None,
                 prompt_keys: list[int] | None = None) -> RolloutOutput:
        """`rollout.generate(prompts, sampling, prompt_keys)` with the weight push and state offload around it;
        `timer` (the trainer's Timer, optional) gets the phases weight_sync / rollout / offload / sync_check."""
        if not self.needs_sync:
            with self._phase(timer, "rollout"):
                return self.rollout.generate(prompts, sampling, prompt_keys=prompt_keys)

        offload = self.cfg.deepspeed.offload_states_during_rollout
        first_sync = False
        offloaded = False
        try:
            if offload:
                from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum
                params = OffloadStateTypeEnum.lp_params
                with self._phase(timer, "offload"):
                    # everything but the parameters now; the parameters once the push has read them
                    self._offload([s for s in OffloadStateTypeEnum if s != params] if self.weights_stale else None)
                offloaded = True
            if self.weights_stale:
                with self._phase(timer, "weight_sync"):
                    self._sync(before_kv_cache=(lambda: self._offload([params])) if offload else None)
                first_sync = self.syncs == 1
            with self._phase(timer, "rollout"):
                out = self.rollout.generate(prompts, sampling, prompt_keys=prompt_keys)
        finally:
            if offloaded:
                with self._phase(timer, "offload"):
                    self.training_engine.engine.reload_states()
        if first_sync and self.cfg.rollout.sync_check:
            with self._phase(timer, "sync_check"):
                self._check(prompts)
        return out

    def _sync(self, before_kv_cache=None) -> None:
        from .weight_sync import iter_weight_buckets

        start = time.perf_counter()
        buckets = iter_weight_buckets(self.training_engine.module, self.training_engine.zero_stage,
                                      self.cfg.rollout.weight_sync_bucket_mb * 2**20)
        stats = self.rollout.sync_weights(buckets, before_kv_cache=before_kv_cache)
        self.weights_stale = False
        self.syncs += 1
        self.last_sync_stats = {**(stats or {}), "seconds": time.perf_counter() - start}

    def _check(self, prompts: PromptBatch) -> None:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        synced = world > 1 and self.training_engine.zero_stage == 3  # every rank joins every ZeRO-3 forward
        frac = self.rollout.sync_check(prompts, self.training_engine.module, synced_gpus=synced)
        self.last_sync_check = frac
        if frac < 1.0:
            logger.warning("rollout/trainer sync check: only %.1f%% of greedy tokens agree between the rollout "
                           "engine and the trainer after the first weight push (a missing or misnamed weight "
                           "diverges from the first token; bf16 kernel differences only late)", 100 * frac)
        else:
            logger.info("rollout/trainer sync check: greedy tokens identical")
