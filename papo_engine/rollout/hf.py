"""HF `generate` rollout (the CPU default): samples from the trainer's own module, so no weight copy is needed.

Under ZeRO-3 every rank must take part in every forward (parameters are gathered collectively), so
`synced_gpus=True` keeps ranks generating until all have finished. With `sampling.seed` and prompt keys,
sampling is keyed (`sampling.py`): the same prompt gets the same responses whatever batch or rank it is in.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..batching import repeat_prompts, select_prompts
from ..models import PromptBatch, mm_token_type_ids
from ..prompts import vision_token_ids
from .base import RolloutOutput, SamplingParams, imposed_lengths, response_keys, response_mask_from_ids
from .lengths import ImposedLengths
from .sampling import KeyedSampler


class HFRollout:
    def __init__(self, model, tokenizer, batch_size: int, synced_gpus: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.synced_gpus = batch_size, synced_gpus
        # a sampled <|image_pad|> would claim image features that do not exist
        self.suppress = vision_token_ids(tokenizer)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: generation runs on the training module itself."""

    def _sampling_kwargs(self, sampling: SamplingParams, keys: torch.Tensor | None, prompt_width: int,
                         lengths: torch.Tensor | None) -> dict:
        # repetition_penalty=1: a checkpoint's generation_config (Qwen2.5-VL ships 1.05) would otherwise bend the
        # sampling distribution away from the policy whose log-probs the loss uses
        common = {"repetition_penalty": 1.0}
        if sampling.min_new_tokens:
            common["min_new_tokens"] = sampling.min_new_tokens
        # imposed lengths (benchmarks) edit the scores before any sampler
        processors = [] if lengths is None else [ImposedLengths(lengths, self.tokenizer.eos_token_id, prompt_width)]
        if sampling.temperature == 0:  # greedy (evaluation)
            return {"do_sample": False, "logits_processor": processors, **common}
        if keys is not None:
            sampler = KeyedSampler(keys, sampling.seed, sampling.temperature, sampling.top_p, prompt_width)
            return {"do_sample": False, "logits_processor": [*processors, sampler], **common}
        return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
                "logits_processor": processors, **common}

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingParams,
                 prompt_keys: list[int] | None = None) -> RolloutOutput:
        """n responses per prompt. Keyed sampling when `sampling.seed` is set and `prompt_keys` given."""
        num_prompts = len(prompts.images_per_prompt)
        per_call = max(1, self.batch_size // sampling.n)  # whole prompts per generate call
        lengths = imposed_lengths(sampling, prompt_keys)
        pieces = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, num_prompts, per_call):
                index = list(range(start, min(start + per_call, num_prompts)))
                # the module's device (under ZeRO-3 its empty shards sit there too); responses come back to the host
                chunk = repeat_prompts(select_prompts(prompts, index), sampling.n).to(
                    next(self.model.parameters()).device)
                keys = None
                if sampling.seed is not None and prompt_keys is not None:
                    keys = response_keys([prompt_keys[i] for i in index], sampling.n)
                out = self.model.generate(
                    input_ids=chunk.input_ids, attention_mask=chunk.attention_mask,
                    pixel_values=chunk.pixel_values.to(self.model.dtype), image_grid_thw=chunk.image_grid_thw,
                    mm_token_type_ids=mm_token_type_ids(chunk.input_ids, self.model.config.image_token_id),
                    **self._sampling_kwargs(sampling, keys, chunk.input_ids.shape[1], None if lengths is None else
                                            lengths[start * sampling.n:(index[-1] + 1) * sampling.n]),
                    max_new_tokens=sampling.max_new_tokens, synced_gpus=self.synced_gpus,
                    suppress_tokens=self.suppress,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
                pieces.append(out[:, chunk.input_ids.shape[1]:].cpu())
        finally:
            self.model.train(was_training)
        width = max(p.shape[1] for p in pieces)
        pad = self.tokenizer.pad_token_id
        response_ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in pieces])
        mask = response_mask_from_ids(response_ids, self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(response_ids.masked_fill(mask == 0, pad), skip_special_tokens=True)
        # generate computes every row of a call until its last one ends
        return RolloutOutput(response_ids, mask, texts, row_steps=sum(p.shape[0] * p.shape[1] for p in pieces))
