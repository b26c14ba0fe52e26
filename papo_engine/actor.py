"""The policy forward: original and masked images through ONE forward as one batch of 2B sequences, final
hidden states split in two, and the fused head computing per-token log-probs, entropies and KL(π‖π_mask).

The two halves share input_ids, attention mask and (M-RoPE) positions; only pixel_values differ, so under
ZeRO-3 the parameters are gathered once for both branches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batching import select_prompts, slice_pixel_rows
from .models import PromptBatch, mm_token_type_ids


@dataclass
class SequenceBatch:
    """S = B·n sampled sequences: the prompt (repeated per response) and the response."""
    prompts: PromptBatch              # one entry per sequence: input_ids [S, P] left-padded, images
    response_ids: torch.Tensor        # [S, R]
    response_mask: torch.Tensor       # [S, R] float
    masked_pixel_values: torch.Tensor | None = None  # laid out like prompts.pixel_values

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def slice(self, start: int, stop: int) -> "SequenceBatch":
        masked = (None if self.masked_pixel_values is None
                  else slice_pixel_rows(self.prompts, self.masked_pixel_values, start, stop))
        return SequenceBatch(select_prompts(self.prompts, list(range(start, stop))),
                             self.response_ids[start:stop], self.response_mask[start:stop], masked)


def final_hidden(model, input_ids, attention_mask, pixel_values, image_grid_thw) -> torch.Tensor:
    """Hidden states after the final norm, [batch, L, d] (no logits)."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask,
                      pixel_values=pixel_values.to(model.dtype), image_grid_thw=image_grid_thw,
                      mm_token_type_ids=mm_token_type_ids(input_ids, model.config.image_token_id))
    return out.last_hidden_state


def response_hidden(model, batch: SequenceBatch, both_branches: bool) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token: [S, R, d], or [2S, R, d] with the
    masked-image half stacked after the original half."""
    prompts = batch.prompts
    P = prompts.input_ids.shape[1]
    R = batch.response_ids.shape[1]
    input_ids = torch.cat([prompts.input_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([prompts.attention_mask, batch.response_mask.to(prompts.attention_mask.dtype)], 1)
    pixel_values, grid = prompts.pixel_values, prompts.image_grid_thw
    if both_branches:
        if batch.masked_pixel_values is None:
            raise ValueError("both_branches=True needs batch.masked_pixel_values")
        input_ids, attention_mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)
        pixel_values = torch.cat([pixel_values, batch.masked_pixel_values])
        grid = torch.cat([grid, grid])
    hidden = final_hidden(model, input_ids, attention_mask, pixel_values, grid)
    # position t predicts token t+1: response token j is predicted by the hidden state at P + j - 1
    return hidden[:, P - 1:P - 1 + R]


def response_token_stats(model, batch: SequenceBatch, *, both_branches: bool, temperature: float) -> dict:
    """Per-token [S, R] tensors over response positions (0 where response_mask is 0).

    Always: logprobs, entropy (full-vocabulary). With both_branches: also masked_logprobs, masked_entropy,
    kl (exact full-vocabulary KL(π(·|I) ‖ π(·|I_mask)))."""
    S = len(batch)
    hidden = response_hidden(model, batch, both_branches)
    valid = batch.response_mask.bool()
    targets = batch.response_ids[valid]
    if both_branches:
        head = model.lm_head(hidden[:S][valid], targets=targets, hidden_masked=hidden[S:][valid],
                             temperature=temperature)
        names = ("logprobs", "masked_logprobs", "entropy", "masked_entropy", "kl")
    else:
        head = model.lm_head(hidden[valid], targets=targets, temperature=temperature)
        names = ("logprobs", "entropy")
    stats = {}
    for name, values in zip(names, head):
        full = values.new_zeros(S, batch.response_ids.shape[1])
        stats[name] = full.masked_scatter(valid, values)
    return stats
