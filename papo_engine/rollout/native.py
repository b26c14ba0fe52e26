"""Our own rollout for Qwen2.5-VL and Qwen3-VL (`rollout.backend=native`): generation with the trainer's module,
without HF `generate`. Qwen3.5 is refused (its family's `native_refusal`: the decode step has no linear-attention
layers).

Per call of `batch_size` sequences:
1. prefill once per distinct prompt: the vision encoder and the prompt forward run on the B prompts, not on their
   B·n rows (the same forward as the training side's shared prompts, `actor.prefill`); the prompts' keys and values
   stay one copy per prompt, which the prompt's n rows read together (`decoder.TextDecoder`);
2. a decode loop of steps written on the weights (CUDA: replayed from CUDA graphs), rotary positions continued from
   each prompt's largest M-RoPE position. Finished rows leave the batch: when the unfinished ones fit a smaller
   size of `decoder.row_buckets`, they are moved to the front and the steps run on them alone, so the work follows
   the tokens generated, not rows × the longest response (`row_steps` counts what was computed). It stops when
   every row has produced its eos;
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
from ..config import ConfigError
from ..families import family_of
from ..models import PromptBatch
from ..prompts import vision_token_ids
from .base import RolloutOutput, SamplingParams, imposed_lengths, response_keys, response_mask_from_ids
from .decoder import TextDecoder, row_buckets, text_parameters
from .lengths import force_lengths
from .sampling import cpu_kernel_draws, inverse_cdf_sample, kernel_draw, keyed_sample, row_streams, stream_uniform


def _gathered(params: list[torch.nn.Parameter]):
    """ZeRO-3: the partitioned parameters gathered for the block (collective); otherwise nothing to do."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class NativeRollout:
    def __init__(self, model, tokenizer, batch_size: int, cuda_graphs: bool = True):
        refusal = family_of(model).native_refusal
        if refusal:
            raise ConfigError(refusal)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.suppress = torch.tensor(vision_token_ids(tokenizer), dtype=torch.long)  # a sampled image pad has no
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id           # image features behind it
        self.cuda_graphs = cuda_graphs
        self.decoders: dict[tuple, TextDecoder] = {}  # per shape: buffers (and graphs) reused

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: generation reads the training module's weights."""

    def _decoder(self, groups: int, n: int, prompt_width: int, capacity: int, graphed: bool) -> TextDecoder:
        """A decoder for this shape: kept when it holds CUDA graphs (which need its buffers to stay put)."""
        key = (groups, n, prompt_width, capacity)
        if not graphed:
            return TextDecoder(self.model, *key)
        if key not in self.decoders:
            self.decoders[key] = TextDecoder(self.model, *key)
        return self.decoders[key]

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingParams,
                 prompt_keys: list[int] | None = None) -> RolloutOutput:
        """n responses per prompt, prompt-major. Keyed sampling when `sampling.seed` is set and `prompt_keys` given."""
        num_prompts = len(prompts.images_per_prompt)
        per_call = max(1, self.batch_size // sampling.n)  # whole prompts per call
        was_training = self.model.training
        self.model.eval()
        lengths = imposed_lengths(sampling, prompt_keys)
        pieces = []
        try:
            for start in range(0, num_prompts, per_call):
                index = list(range(start, min(start + per_call, num_prompts)))
                rows = slice(start * sampling.n, index[-1] * sampling.n + sampling.n)
                streams = None  # keyed sampling: one random stream per response, from (seed, its key)
                if sampling.seed is not None and prompt_keys is not None:
                    streams = row_streams(sampling.seed, response_keys([prompt_keys[i] for i in index], sampling.n))
                pieces.append(self._generate_chunk(select_prompts(prompts, index), sampling, streams,
                                                   None if lengths is None else lengths[rows]))
        finally:
            self.model.train(was_training)
        width = max(ids.shape[1] for ids, _, _ in pieces)
        response_ids = torch.cat([torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad)
                                  for ids, _, _ in pieces])
        mask = response_mask_from_ids(response_ids, self.eos)
        texts = self.tokenizer.batch_decode(response_ids.masked_fill(mask == 0, self.pad), skip_special_tokens=True)
        logprobs = None
        if sampling.temperature > 0:
            logprobs = torch.cat([torch.nn.functional.pad(lp, (0, width - lp.shape[1])) for _, lp, _ in pieces]) * mask
        return RolloutOutput(response_ids, mask, texts, logprobs, row_steps=sum(steps for _, _, steps in pieces))

    def _generate_chunk(self, prompts: PromptBatch, sampling: SamplingParams, streams: torch.Tensor | None,
                        lengths: torch.Tensor | None):
        """(response ids [B·n, T], sampled-token log-probs [B·n, T], row-steps computed) for B distinct prompts,
        on the host."""
        model, n = self.model, sampling.n
        device = next(model.parameters()).device
        prompts = prompts.to(device)
        B, P = prompts.input_ids.shape
        rows = B * n
        positions = prompt_positions(model, prompts)
        hidden, cache = prefill(model, prompts.input_ids, prompts.attention_mask, positions, prompts.pixel_values,
                                prompts.image_grid_thw)
        graphed = self.cuda_graphs and device.type == "cuda" and not hasattr(model.lm_head.weight, "ds_id")
        steps = sampling.max_new_tokens
        tokens_out = torch.full((rows, steps), self.pad, dtype=torch.long, device=device)
        logprobs_out = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        # the current batch: row r is response origin[r] (spare rows of a bucket size: `rows`, born finished);
        # reads of per-response values take `response` = origin with spare rows on the last response
        origin = response = torch.arange(rows, device=device)
        first_position = positions.amax(dim=(0, 2)).repeat_interleave(n) + 1   # [rows]: response token 0's position
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        if streams is not None:
            streams = streams.to(device)
        if lengths is not None:
            lengths = lengths.to(device)
        suppress = self.suppress.to(device)
        sizes = row_buckets(rows)
        done, row_steps = 0, 0
        with _gathered(text_parameters(model)):
            decoder = self._decoder(B, n, P, steps, graphed)
            decoder.fill_prompt(cache, prompts.attention_mask)
            del cache
            # left-padded: the last slot is the prompt's end; row g·n + k takes prompt g's logits
            logits = decoder.first_logits(hidden[:, -1]).repeat_interleave(n, 0)
            for t in range(steps):
                tokens, logprobs = self._sample(logits, t, sampling, None if streams is None else streams[response],
                                                suppress, None if lengths is None else lengths[response])
                tokens = tokens.masked_fill(finished, self.pad)
                real = origin < rows
                tokens_out[origin[real], t] = tokens[real]
                logprobs_out[origin[real], t] = logprobs.masked_fill(finished, 0.0)[real]
                finished |= tokens == self.eos
                row_steps += len(origin)
                done = t + 1
                unfinished = int((~finished).sum())
                if t + 1 == steps or unfinished == 0:
                    break
                size = min(s for s in sizes if s >= unfinished)
                if size < len(origin):  # rows left: move the unfinished ones to the front of a smaller batch
                    source = decoder.compact(torch.nonzero(~finished).flatten(), size, written=t + 1)
                    spare = torch.arange(size, device=device) >= unfinished
                    origin = torch.where(spare, rows, origin[source])
                    response = origin.clamp(max=rows - 1)
                    tokens, finished = tokens[source], spare
                slot = torch.tensor([t], device=device)
                step_positions = first_position[response] + t
                if graphed:
                    logits = decoder.graphed_step(tokens, step_positions, slot, written=t + 1)
                else:
                    logits = decoder.step(tokens, step_positions, slot, width=t + 1)
        return tokens_out[:, :done].cpu(), logprobs_out[:, :done].cpu(), row_steps

    def _sample(self, logits: torch.Tensor, t: int, sampling: SamplingParams, streams: torch.Tensor | None,
                suppress: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token t of every row, and its log-prob under log_softmax(logits / T) over the whole vocabulary (0 when
        greedy). `logits` is this step's own tensor: the suppression is written into it. `lengths`: imposed
        response lengths (a benchmark's `LengthProfile`)."""
        x = logits.float()
        temperature = sampling.temperature
        if temperature > 0 and cpu_kernel_draws(x, sampling.top_p):  # the draw and normalizer in one C++ op
            return self._kernel_sample(x, t, sampling, streams, suppress, lengths)
        if temperature > 0:  # the policy's normalizer, before suppression (the trainer's log-probs have none)
            lse = torch.logsumexp(x / temperature if temperature != 1.0 else x, -1)
        x.index_fill_(1, suppress, float("-inf"))  # as HF's suppress_tokens
        if t < sampling.min_new_tokens:
            x[:, self.eos] = float("-inf")
        if lengths is not None:
            force_lengths(x, lengths, t, self.eos)
        if temperature == 0:
            return x.argmax(-1), torch.zeros(len(x), device=x.device)
        if streams is not None:
            tokens = keyed_sample(x, streams, t, temperature, sampling.top_p)
        else:
            tokens = inverse_cdf_sample(x, temperature, sampling.top_p, torch.rand(len(x), dtype=torch.float64))
        # a drawn token is never a suppressed one, so its entry still holds the policy's logit
        return tokens, x.gather(1, tokens.unsqueeze(1)).squeeze(1) / temperature - lse

    def _kernel_sample(self, x: torch.Tensor, t: int, sampling: SamplingParams, streams: torch.Tensor | None,
                       suppress: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`_sample` on a float32 CPU decode at T > 0, top_p = 1 (`sampling.kernel_draw`): the same rules (vision
        tokens never, eos held back or forced) as the op's arguments, `x` left as it is."""
        eos_rule = torch.zeros(len(x), dtype=torch.int8)
        if t < sampling.min_new_tokens:
            eos_rule.fill_(1)
        if lengths is not None:  # held back before the row's length, the only token at it
            eos_rule = torch.where(lengths > t + 1, 1, torch.where(lengths == t + 1, 2, eos_rule)).to(torch.int8)
        u = (stream_uniform(streams, t) if streams is not None else torch.rand(len(x), dtype=torch.float64))
        tokens, lse = kernel_draw(x, sampling.temperature, u, suppress, self.eos, eos_rule)
        return tokens, x.gather(1, tokens.unsqueeze(1)).squeeze(1) / sampling.temperature - lse
