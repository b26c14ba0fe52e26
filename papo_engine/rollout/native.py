"""Our own rollout for Qwen2.5-VL (`rollout.backend=native`): generation with the trainer's module, without HF
`generate`.

Per call of `batch_size` sequences:
1. prefill once per distinct prompt: the vision encoder and the prompt forward run on the B prompts, not on their
   B·n rows (the same forward as the training side's shared prompts, `actor.prefill`), and the prompt's keys and
   values are copied into each of its n rows' slots of a preallocated cache (`decoder.TextDecoder`);
2. a decode loop of fixed-shape steps written on the weights (CUDA: replayed from one CUDA graph), rotary positions
   continued from each prompt's largest M-RoPE position; it stops as soon as every row has produced its eos;
3. keyed sampling (`sampling.keyed_sample`): the same tokens as the HF backend under the same (seed, key).

Under ZeRO-3 the prefill goes through the modules (collective, as in training), then the text weights are gathered
once for the whole decode loop (not once per token as `generate(synced_gpus=True)` does), so ranks decode
independently and may stop at different steps.

It also returns each sampled token's log-probability under the policy at the sampling temperature, over the whole
vocabulary (log softmax(logits / T)) — the quantity the trainer computes, so the rollout-mismatch metrics measure
only numerical differences between the two computations.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch

from ..actor import prefill, prompt_positions
from ..batching import select_prompts
from ..models import PromptBatch
from ..prompts import vision_token_ids
from .base import RolloutOutput, SamplingParams, response_keys, response_mask_from_ids
from .decoder import TextDecoder, text_parameters
from .sampling import inverse_cdf_sample, keyed_sample, row_streams


def _gathered(params: list[torch.nn.Parameter]):
    """ZeRO-3: the partitioned parameters gathered for the block (collective); otherwise nothing to do."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class NativeRollout:
    def __init__(self, model, tokenizer, batch_size: int, cuda_graphs: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.suppress = torch.tensor(vision_token_ids(tokenizer), dtype=torch.long)  # a sampled image pad has no
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id           # image features behind it
        self.cuda_graphs = cuda_graphs
        self.decoders: dict[tuple[int, int], TextDecoder] = {}  # per (rows, capacity): buffers (and graph) reused

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: generation reads the training module's weights."""

    def _decoder(self, rows: int, capacity: int, graphed: bool) -> TextDecoder:
        """A decoder for this shape: kept when it holds a CUDA graph (which needs its buffers to stay put)."""
        if not graphed:
            return TextDecoder(self.model, rows, capacity)
        key = (rows, capacity)
        if key not in self.decoders:
            self.decoders[key] = TextDecoder(self.model, rows, capacity)
        return self.decoders[key]

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingParams,
                 prompt_keys: list[int] | None = None) -> RolloutOutput:
        """n responses per prompt, prompt-major. Keyed sampling when `sampling.seed` is set and `prompt_keys` given."""
        num_prompts = len(prompts.images_per_prompt)
        per_call = max(1, self.batch_size // sampling.n)  # whole prompts per call
        was_training = self.model.training
        self.model.eval()
        pieces = []
        try:
            for start in range(0, num_prompts, per_call):
                index = list(range(start, min(start + per_call, num_prompts)))
                streams = None  # keyed sampling: one random stream per response, from (seed, its key)
                if sampling.seed is not None and prompt_keys is not None:
                    streams = row_streams(sampling.seed, response_keys([prompt_keys[i] for i in index], sampling.n))
                pieces.append(self._generate_chunk(select_prompts(prompts, index), sampling, streams))
        finally:
            self.model.train(was_training)
        width = max(ids.shape[1] for ids, _ in pieces)
        response_ids = torch.cat([torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad)
                                  for ids, _ in pieces])
        mask = response_mask_from_ids(response_ids, self.eos)
        texts = self.tokenizer.batch_decode(response_ids.masked_fill(mask == 0, self.pad), skip_special_tokens=True)
        logprobs = None
        if sampling.temperature > 0:
            logprobs = torch.cat([torch.nn.functional.pad(lp, (0, width - lp.shape[1])) for _, lp in pieces]) * mask
        return RolloutOutput(response_ids, mask, texts, logprobs)

    def _generate_chunk(self, prompts: PromptBatch, sampling: SamplingParams, streams: torch.Tensor | None):
        """(response ids [B·n, T], sampled-token log-probs [B·n, T]) for B distinct prompts, on the host."""
        model, n = self.model, sampling.n
        device = next(model.parameters()).device
        prompts = prompts.to(device)
        B, P = prompts.input_ids.shape
        rows = B * n
        rows_from = torch.arange(B, device=device).repeat_interleave(n)  # row g·n + k answers prompt g
        positions = prompt_positions(model, prompts)
        hidden, cache = prefill(model, prompts.input_ids, prompts.attention_mask, positions, prompts.pixel_values,
                                prompts.image_grid_thw)
        next_position = positions.amax(dim=(0, 2))[rows_from] + 1   # [rows]: the first response token's position
        graphed = self.cuda_graphs and device.type == "cuda" and not hasattr(model.lm_head.weight, "ds_id")
        steps = sampling.max_new_tokens
        tokens_out = torch.full((rows, steps), self.pad, dtype=torch.long, device=device)
        logprobs_out = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        suppress = self.suppress.to(device)
        done = 0
        with _gathered(text_parameters(model)):
            decoder = self._decoder(rows, P + steps, graphed)
            decoder.fill_prompt(cache, n, prompts.attention_mask)
            del cache
            logits = decoder.first_logits(hidden[:, -1])[rows_from]  # left-padded: the last slot is the prompt's end
            for t in range(steps):
                tokens, logprobs = self._sample(logits, t, sampling, streams, suppress)
                tokens = tokens.masked_fill(finished, self.pad)
                tokens_out[:, t] = tokens
                logprobs_out[:, t] = logprobs.masked_fill(finished, 0.0)
                finished |= tokens == self.eos
                done = t + 1
                if t + 1 == steps or bool(finished.all()):
                    break
                slot = torch.tensor([P + t], device=device)
                step_positions = next_position + t
                if graphed:
                    logits = decoder.graphed_step(tokens, step_positions, slot)
                else:
                    logits = decoder.step(tokens, step_positions, slot, width=P + t + 1)
        return tokens_out[:, :done].cpu(), logprobs_out[:, :done].cpu()

    def _sample(self, logits: torch.Tensor, t: int, sampling: SamplingParams, streams: torch.Tensor | None,
                suppress: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token t of every row, and its log-prob under log_softmax(logits / T) over the whole vocabulary (0 when
        greedy). `logits` is this step's own tensor: the suppression is written into it."""
        x = logits.float()
        temperature = sampling.temperature
        if temperature > 0:  # the policy's normalizer, before suppression (the trainer's log-probs have none)
            lse = torch.logsumexp(x / temperature if temperature != 1.0 else x, -1)
        x.index_fill_(1, suppress, float("-inf"))  # as HF's suppress_tokens
        if t < sampling.min_new_tokens:
            x[:, self.eos] = float("-inf")
        if temperature == 0:
            return x.argmax(-1), torch.zeros(len(x), device=x.device)
        if streams is not None:
            tokens = keyed_sample(x, streams, t, temperature, sampling.top_p)
        else:
            tokens = inverse_cdf_sample(x, temperature, sampling.top_p, torch.rand(len(x), dtype=torch.float64))
        # a drawn token is never a suppressed one, so its entry still holds the policy's logit
        return tokens, x.gather(1, tokens.unsqueeze(1)).squeeze(1) / temperature - lse
