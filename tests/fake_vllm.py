"""A stand-in for GPU vLLM's offline API: what CPU vLLM cannot show (tests/test_vllm_real.py runs the real CPU
build for everything else).

It plays vLLM 0.32 on a CUDA machine (`platforms.current_platform.is_cpu()` is False): sleep mode with its memory
semantics, and `model_runner.model.load_weights` as the push path. Same names and signatures as vLLM's `LLM`,
`SamplingParams`, `RequestOutput`, `CompletionOutput`, `Logprob`; generation is real (transformers'
Qwen2_5_VLForConditionalGeneration loaded from the model directory). What it enforces, like the real engine:

* `LLM(...)` takes only keyword arguments vLLM's EngineArgs has (KNOWN_ENGINE_ARGS; a test checks them against
  the real EngineArgs where vllm is installed); `SamplingParams` rejects greedy with n > 1 and temperature > 2,
  and `logprobs=0` returns each sampled token's log-prob of the processed (biased, tempered) distribution;
* `distributed_executor_backend="external_launcher"` needs RANK / LOCAL_RANK and VLLM_ENABLE_V1_MULTIPROCESSING=0;
* `worker_extension_cls` is a dotted name whose class is appended to the worker's bases; `collective_rpc(method,
  timeout=None, args=(), kwargs=None)` calls it on the (single) worker and returns a one-element list;
* prompts are `{"prompt_token_ids", "multi_modal_data": {"image": [...]}}` with ONE `<|image_pad|>` per image,
  expanded here to grid_t*h*w/merge^2 pads by the image processor (min/max pixels from `mm_processor_kwargs`);
  a prompt whose pads are already expanded raises (the real engine would expand them again -> garbage);
* `CompletionOutput.token_ids` ends with the stop token (EOS or a `stop_token_ids` entry) when one ended it;
* sleep mode: generating while any tag sleeps raises, loading weights while "weights" sleeps raises, sleep
  without `enable_sleep_mode=True` raises; level 2 discards the weights (they become noise until reloaded);
* `load_weights` takes checkpoint names in either spelling (`model.*`/`visual.*` or `model.language_model.*`/
  `model.visual.*`, as vLLM's Qwen2.5-VL mapper) and raises on an unknown name or a shape mismatch.

Every public call is appended to `llm.calls` in order, e.g. ("wake_up", ("weights",)), ("load", [names]).
Internals that the real engine has and the rollout never touches (scheduler, paged KV cache) are absent.
"""
from __future__ import annotations

import importlib
import itertools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

__version__ = "0.32.0+fake"

_TAGS = ("weights", "kv_cache")
# the GPU build: sleep mode and `load_weights` exist there
platforms = SimpleNamespace(current_platform=SimpleNamespace(is_cpu=lambda: False))
KNOWN_ENGINE_ARGS = frozenset({
    "tensor_parallel_size", "distributed_executor_backend", "dtype", "seed", "gpu_memory_utilization",
    "enable_sleep_mode", "worker_extension_cls", "limit_mm_per_prompt", "mm_processor_cache_gb", "mm_processor_kwargs",
    "generation_config", "max_model_len", "logprobs_mode", "kv_cache_memory_bytes", "enable_chunked_prefill",
    "max_num_batched_tokens", "enforce_eager"})


class Logprob:
    def __init__(self, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


class SamplingParams:
    """Only the fields papo_engine sets, with vLLM's names and defaults; unknown names raise like msgspec."""

    _DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, seed=None, max_tokens=16, min_tokens=0,
                     stop_token_ids=None, logit_bias=None, detokenize=True, skip_special_tokens=True, ignore_eos=False,
                     logprobs=None)

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self._DEFAULTS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        for k, v in {**self._DEFAULTS, **kwargs}.items():
            setattr(self, k, v)
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError("n and max_tokens must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.temperature > 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")


class CompletionOutput:
    def __init__(self, index, text, token_ids, finish_reason, stop_reason=None):
        self.index, self.text, self.token_ids = index, text, token_ids
        self.finish_reason, self.stop_reason = finish_reason, stop_reason
        self.cumulative_logprob, self.logprobs = None, None


class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, outputs):
        self.request_id, self.prompt, self.prompt_token_ids, self.outputs = request_id, prompt, prompt_token_ids, outputs
        self.finished = True


# ----------------------------------------------------------------------------------------------------------
# worker side


class _LoadableModel:
    """What `worker.model_runner.model` offers the extension: `load_weights(weights)` copying by name."""

    # vLLM's Qwen2.5-VL hf_to_vllm_mapper accepts both spellings; here they map onto the HF module's names
    _PREFIXES = [("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
                 ("lm_head.", "lm_head."), ("model.", "model.language_model."), ("visual.", "model.visual.")]

    def __init__(self, hf_model, llm: "LLM"):
        self.hf_model, self._llm = hf_model, llm

    def _target(self, name: str) -> str:
        for old, new in self._PREFIXES:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        if "weights" in self._llm.sleeping:
            raise RuntimeError("load_weights while the weights are asleep: the copy would land in unmapped memory")
        params = dict(self.hf_model.named_parameters())
        loaded, names = set(), []
        for name, tensor in weights:
            target = self._target(name)
            if target not in params:
                raise ValueError(f"There is no module or parameter named {name!r} in the model")
            if tuple(params[target].shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(params[target].shape)}")
            params[target].copy_(tensor.to(params[target].dtype))
            loaded.add(target)
            names.append(name)
        self._llm.calls.append(("load", names))
        return loaded


class _ModelRunner:
    def __init__(self, model):
        self.model = model


class _WorkerBase:
    def __init__(self, model_runner):
        self.model_runner = model_runner


def _resolve(qualname: str):
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _Engine:
    """`llm.llm_engine`: only the encoder-cache reset that newer versions expose there."""

    def __init__(self, llm):
        self._llm = llm

    def reset_encoder_cache(self) -> None:
        self._llm.calls.append(("reset_encoder_cache",))


# ----------------------------------------------------------------------------------------------------------
# the engine


class LLM:
    def __init__(self, model: str, **kwargs):
        from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        unknown = sorted(set(kwargs) - KNOWN_ENGINE_ARGS)
        if unknown:  # EngineArgs is a dataclass: an unknown field is a TypeError
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
        self.model_path, self.kwargs = model, dict(kwargs)
        self.calls: list[tuple] = []
        if kwargs.get("tensor_parallel_size", 1) != 1:
            raise ValueError("stand-in: tensor_parallel_size must be 1")
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
                raise AssertionError("To get deterministic execution, please set VLLM_ENABLE_V1_MULTIPROCESSING=0")
            int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])  # KeyError like the real executor
        self.enable_sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        self.sleeping: set[str] = set()
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": None}
        self.hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model, dtype=dtypes[kwargs.get("dtype", "auto")]).eval()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
        self.tokenizer.pad_token = self.tokenizer.pad_token or "<|endoftext|>"
        saved = json.loads((Path(model) / "preprocessor_config.json").read_text()) \
            if (Path(model) / "preprocessor_config.json").is_file() else {}
        proc_kwargs = {k: saved[k] for k in ("image_mean", "image_std", "patch_size", "merge_size",
                                             "temporal_patch_size") if k in saved}
        proc_kwargs.update(kwargs.get("mm_processor_kwargs") or {})
        self.image_processor = Qwen2VLImageProcessorPil(**proc_kwargs)
        self.limit_images = (kwargs.get("limit_mm_per_prompt") or {}).get("image", 1)
        worker_cls = _WorkerBase
        if kwargs.get("worker_extension_cls"):
            ext = _resolve(kwargs["worker_extension_cls"])
            worker_cls = type("Worker", (_WorkerBase, ext), {})  # vLLM appends the extension to the bases
        self.worker = worker_cls(_ModelRunner(_LoadableModel(self.hf_model, self)))
        self.llm_engine = _Engine(self)
        self._request_ids = itertools.count()

    # --- sleep mode ------------------------------------------------------------------------------------------
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self.enable_sleep_mode:
            raise ValueError("Sleep mode is not enabled (LLM(enable_sleep_mode=True))")
        if level not in (1, 2):
            raise ValueError(f"stand-in: sleep level {level} not modelled")
        self.calls.append(("sleep", level))
        if level == 2:  # weights discarded: their memory comes back with undefined contents
            with torch.no_grad():
                for p in self.hf_model.parameters():
                    p.normal_()
        self.sleeping = set(_TAGS)

    def wake_up(self, tags: list[str] | None = None) -> None:
        if tags is not None and not set(tags) <= set(_TAGS):
            raise ValueError(f"wake_up tags must be in {_TAGS}, got {tags}")
        self.calls.append(("wake_up", tuple(tags) if tags is not None else None))
        self.sleeping -= set(tags) if tags is not None else set(_TAGS)

    # --- control ---------------------------------------------------------------------------------------------
    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if isinstance(method, str):
            return [getattr(self.worker, method)(*args, **kwargs)]
        return [method(self.worker, *args, **kwargs)]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    def reset_mm_cache(self) -> None:
        self.calls.append(("reset_mm_cache",))

    def get_tokenizer(self):
        return self.tokenizer

    # --- generation ------------------------------------------------------------------------------------------
    def _expand(self, ids: list[int], images: list) -> tuple[list[int], dict]:
        pad = self.hf_model.config.image_token_id
        count = sum(t == pad for t in ids)
        runs = sum(1 for i, t in enumerate(ids) if t == pad and (i == 0 or ids[i - 1] != pad))
        if count != runs:
            raise ValueError("stand-in: prompt_token_ids hold already-expanded <|image_pad|> runs; vLLM expects one "
                             "placeholder per image and would expand them again")
        if count != len(images):
            raise RuntimeError(f"Expected there to be {len(images)} prompt updates corresponding to {len(images)} "
                               f"image items, but instead found {count} prompt updates!")
        if len(images) > self.limit_images:
            raise ValueError(f"At most {self.limit_images} image(s) may be provided in one prompt.")
        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        sizes = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
        out = []
        for t in ids:
            out.extend([t] * next(sizes) if t == pad else [t])
        return out, vision

    def generate(self, prompts, sampling_params: SamplingParams | None = None, *, use_tqdm=True,
                 lora_request=None, priority=None, tokenization_kwargs=None) -> list[RequestOutput]:
        if self.sleeping:
            raise RuntimeError(f"generate while asleep ({sorted(self.sleeping)}): wake_up first")
        prompts = prompts if isinstance(prompts, (list, tuple)) else [prompts]
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"The lengths of prompts ({len(prompts)}) and sampling_params "
                                 f"({len(sampling_params)}) must be the same.")
            per_prompt = list(sampling_params)
        else:
            per_prompt = [sampling_params or SamplingParams()] * len(prompts)
        self.calls.append(("generate", len(prompts), per_prompt[0].n if per_prompt else 0))
        self.seen_params = per_prompt
        return [self._generate_one(prompt, sp) for prompt, sp in zip(prompts, per_prompt)]

    def _generate_one(self, prompt, sp: SamplingParams) -> RequestOutput:
        from transformers import LogitsProcessor, LogitsProcessorList

        eos = self.tokenizer.eos_token_id
        stops = [eos] + list(sp.stop_token_ids or [])

        class _Bias(LogitsProcessor):
            def __call__(self, input_ids, scores):
                for t, b in (sp.logit_bias or {}).items():
                    scores[:, t] += b
                return scores

        images = list((prompt.get("multi_modal_data") or {}).get("image", []))
        ids, vision = self._expand(list(prompt["prompt_token_ids"]), images)
        pixel = vision["pixel_values"].to(self.hf_model.dtype)
        kwargs = {}
        if sp.temperature == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or 0)

        def run(rows: int):
            """[(token ids, log-probs of the processed distribution)] per row."""
            input_ids = torch.tensor([ids] * rows)
            with torch.no_grad():
                out = self.hf_model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    pixel_values=torch.cat([pixel] * rows), image_grid_thw=torch.cat([vision["image_grid_thw"]] * rows),
                    mm_token_type_ids=(input_ids == self.hf_model.config.image_token_id).int(),
                    max_new_tokens=sp.max_tokens, min_new_tokens=sp.min_tokens, eos_token_id=stops,
                    pad_token_id=self.tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList([_Bias()]), output_scores=True,
                    return_dict_in_generate=True, **kwargs)
            tokens = out.sequences[:, len(ids):]
            logps = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [rows, steps, V]
            chosen = logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            return [(t.tolist(), lp.tolist()) for t, lp in zip(tokens, chosen)]

        if sp.seed is not None and sp.temperature > 0:
            generated = []
            for k in range(sp.n):  # vLLM: child k of a seeded request samples with its own generator, seed + k
                with torch.random.fork_rng():
                    torch.manual_seed(sp.seed + k)
                    generated.append(run(1)[0])
        else:
            generated = run(sp.n)
        completions = []
        for k, (gen, logps) in enumerate(generated):
            end = next((i for i, t in enumerate(gen) if t in stops), None)
            token_ids = gen if end is None else gen[:end + 1]  # the stop token is part of the output
            text = self.tokenizer.decode(token_ids, skip_special_tokens=sp.skip_special_tokens) if sp.detokenize else ""
            completion = CompletionOutput(k, text, token_ids, "length" if end is None else "stop",
                                          None if end is None or gen[end] == eos else gen[end])
            if sp.logprobs is not None:  # logprobs=0: the sampled token only, as {token: Logprob} per position
                completion.logprobs = [{t: Logprob(lp)} for t, lp in zip(token_ids, logps)]
            completions.append(completion)
        return RequestOutput(str(next(self._request_ids)), None, ids, completions)
