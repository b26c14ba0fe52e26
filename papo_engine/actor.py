"""The policy forward: original and masked images through ONE forward as one batch of 2B sequences, final
hidden states split in two, and the fused head computing per-token log-probs, entropies and KL(π‖π_mask).

The two halves share input_ids, attention mask and (M-RoPE) positions; only pixel_values differ.

Shared prompts: the n responses to a prompt share its tokens and image, so (when `prompt_group` says which
sequences share a prompt) each distinct prompt — image tokens included — runs once per branch and its cache is
expanded to the responses, which then run attending to it (continuing from it: the family's cache holds keys and
values, and for Qwen3.5's linear-attention layers a convolution window and a recurrent state, expanded alike).
Exact (same positions, same attention), and the prompt's share of the work drops n-fold; gradients flow back
through the shared cache. Not used under gradient checkpointing (HF drops the cache inside checkpointed layers).
The prompts' M-RoPE positions can be computed once for a step's batch (`with_prompt_positions`) and are then read
by every forward over its rows.

Length-aware micro-batches (`micro_batching.py`): a batch cut to its own longest prompt and response
(`SequenceBatch.select(…, trim=True)`) may carry `response_buckets`; the response forward then runs once per
bucket, each cut to its bucket's longest response, all attending to the prompts' cache computed once. The hidden
states come back per response token (`response_token_hidden`), so the layout of the forwards never reaches the loss.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch

from .batching import select_prompts
from .families import family_of
from .micro_batching import response_buckets
from .models import PromptBatch, mm_token_type_ids


@dataclass
class SequenceBatch:
    """S = B·n sampled sequences: the prompt (repeated per response) and the response."""
    prompts: PromptBatch              # one entry per sequence: input_ids [S, P] left-padded, images
    response_ids: torch.Tensor        # [S, R]
    response_mask: torch.Tensor       # [S, R] float
    masked_pixel_values: torch.Tensor | None = None  # laid out like prompts.pixel_values
    prompt_group: torch.Tensor | None = None  # [S]: equal ids on consecutive rows = the same prompt (and image)
    prompt_positions: torch.Tensor | None = None  # [3, S, P]: each row's prompt M-RoPE positions (with_prompt_positions)
    response_buckets: list[torch.Tensor] | None = None  # rows of each response forward; None: one over all rows

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, index, trim: bool = False) -> "SequenceBatch":
        """Sequences `index` (in that order). `trim`: cut the prompts' left padding to the longest prompt selected
        and the responses to the longest response selected (at least one slot)."""
        index = torch.as_tensor(index, dtype=torch.long).tolist()  # a range, a list or a tensor of row numbers
        prompts = select_prompts(self.prompts, index)
        masked = None if self.masked_pixel_values is None else _select_pixel_rows(self.prompts,
                                                                                  self.masked_pixel_values, index)
        group = None if self.prompt_group is None else self.prompt_group[index]
        positions = None if self.prompt_positions is None else self.prompt_positions[:, index]
        response_ids, response_mask = self.response_ids[index], self.response_mask[index]
        if trim:  # prompts are left-padded: their real tokens end every row
            width = int(prompts.attention_mask.sum(1).max())
            prompts = replace(prompts, input_ids=prompts.input_ids[:, -width:],
                              attention_mask=prompts.attention_mask[:, -width:])
            positions = None if positions is None else positions[:, :, -width:]
            length = max(1, int(response_mask.sum(1).max()))
            response_ids, response_mask = response_ids[:, :length], response_mask[:, :length]
        return SequenceBatch(prompts, response_ids, response_mask, masked, group, positions)

    def slice(self, start: int, stop: int) -> "SequenceBatch":
        return self.select(range(start, stop))

    def with_response_buckets(self) -> "SequenceBatch":
        """This batch with its rows in buckets of similar response length (`micro_batching.response_buckets`)."""
        lengths = self.response_mask.sum(1).long().tolist()
        buckets = [torch.tensor(b, dtype=torch.long) for b in response_buckets(lengths)]
        return replace(self, response_buckets=buckets)

    def to(self, device) -> "SequenceBatch":
        """The tensors the forward reads on `device`; prompt_group (bookkeeping for Python-side indexing) stays."""
        masked = None if self.masked_pixel_values is None else self.masked_pixel_values.to(device)
        positions = None if self.prompt_positions is None else self.prompt_positions.to(device)
        return SequenceBatch(self.prompts.to(device), self.response_ids.to(device), self.response_mask.to(device),
                             masked, self.prompt_group, positions, self.response_buckets)


def final_hidden(model, input_ids, attention_mask, pixel_values, image_grid_thw) -> torch.Tensor:
    """Hidden states after the final norm, [batch, L, d] (no logits)."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask,
                      pixel_values=pixel_values.to(model.dtype), image_grid_thw=image_grid_thw,
                      mm_token_type_ids=mm_token_type_ids(input_ids, model.config.image_token_id))
    return out.last_hidden_state


def _branches(batch: SequenceBatch, both_branches: bool):
    """(pixel_values, image_grid_thw, copies): the original images, then the masked ones when both branches."""
    prompts = batch.prompts
    if not both_branches:
        return prompts.pixel_values, prompts.image_grid_thw, 1
    if batch.masked_pixel_values is None:
        raise ValueError("both_branches=True needs batch.masked_pixel_values")
    return (torch.cat([prompts.pixel_values, batch.masked_pixel_values]),
            torch.cat([prompts.image_grid_thw, prompts.image_grid_thw]), 2)


def shares_prompts(model, batch: SequenceBatch) -> bool:
    """Whether the forward runs each distinct prompt once (see the module docstring)."""
    # transformers >= 5.20 names it is_activation_checkpointing, 5.19 (vLLM 0.32's range) is_gradient_checkpointing
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = model.is_gradient_checkpointing
    return batch.prompt_group is not None and not checkpointing


def response_token_hidden(model, batch: SequenceBatch, both_branches: bool) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token, [copies, N, d]: the N tokens of
    `batch.response_mask` in row-major order, for the original images (copy 0) and the masked ones (copy 1, with
    both_branches)."""
    buckets = batch.response_buckets or [torch.arange(len(batch))]
    if shares_prompts(model, batch):
        pieces = _shared_prompt_token_hidden(model, batch, both_branches, buckets)
    else:
        pieces = [_full_token_hidden(model, batch.select(rows, trim=batch.response_buckets is not None),
                                     both_branches) for rows in buckets]
    if len(buckets) == 1 and batch.response_buckets is None:
        return pieces[0]
    # the buckets' tokens, bucket by bucket, back in the batch's row-major order
    valid = batch.response_mask.bool()
    number = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
    number[valid] = torch.arange(int(valid.sum()), device=valid.device)
    produced = torch.cat([number[rows.to(valid.device)] for rows in buckets])      # rows in bucket order
    produced = produced[produced >= 0]
    return torch.cat(pieces, dim=1)[:, torch.argsort(produced)]


def response_hidden(model, batch: SequenceBatch, both_branches: bool) -> torch.Tensor:
    """`response_token_hidden` laid out per sequence: [S, R, d] (or [2S, R, d] with the masked-image half after the
    original half), zeros where response_mask is 0."""
    tokens = response_token_hidden(model, batch, both_branches)
    valid = batch.response_mask.bool()
    copies, _, d = tokens.shape
    out = tokens.new_zeros(copies, *valid.shape, d)
    out[:, valid] = tokens
    return out.view(copies * len(batch), -1, d)


def _full_token_hidden(model, batch: SequenceBatch, both_branches: bool) -> torch.Tensor:
    """`response_token_hidden` from one forward of every sequence, prompt and response, [copies, N, d]."""
    prompts = batch.prompts
    P = prompts.input_ids.shape[1]
    R = batch.response_ids.shape[1]
    input_ids = torch.cat([prompts.input_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([prompts.attention_mask, batch.response_mask.to(prompts.attention_mask.dtype)], 1)
    pixel_values, grid, copies = _branches(batch, both_branches)
    hidden = final_hidden(model, input_ids.repeat(copies, 1), attention_mask.repeat(copies, 1), pixel_values, grid)
    # position t predicts token t+1: response token j is predicted by the hidden state at P + j - 1
    hidden = hidden[:, P - 1:P - 1 + R].reshape(copies, len(batch), R, -1)
    return hidden[:, batch.response_mask.bool()]


def _distinct_prompts(group: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """(the first row of each distinct prompt, each row's distinct-prompt index [S]) from prompt_group."""
    first = torch.ones(len(group), dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    return torch.nonzero(first).flatten().tolist(), torch.cumsum(first.long(), 0) - 1


def prompt_positions(model, prompts) -> torch.Tensor:
    """M-RoPE positions [3, B, P] of prompts as the model computes them over a whole sequence (from the image grid)."""
    positions, _ = model.model.get_rope_index(
        prompts.input_ids, mm_token_type_ids(prompts.input_ids, model.config.image_token_id),
        image_grid_thw=prompts.image_grid_thw, attention_mask=prompts.attention_mask)
    return positions


def prefill(model, input_ids, attention_mask, positions, pixel_values, image_grid_thw):
    """One forward of prompts, their images included, filling a fresh cache (the family's: keys and values, and
    Qwen3.5's recurrent states): (final hidden states [B, P, d], the cache). Shared by the training forward (each
    distinct prompt once per branch) and the native rollout."""
    cache = family_of(model).new_prompt_cache(model)
    out = model.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
        pixel_values=pixel_values.to(model.dtype), image_grid_thw=image_grid_thw,
        mm_token_type_ids=mm_token_type_ids(input_ids, model.config.image_token_id),
        **{_cache_kwarg(model.model): cache}, use_cache=True)
    return out.last_hidden_state, cache


def with_prompt_positions(model, batch: SequenceBatch) -> SequenceBatch:
    """`batch` carrying its prompts' M-RoPE positions, computed once over its distinct prompts, so that every
    shared-prompt forward over its rows (update micro-batches, no-grad masked passes, π_old's and the reference's
    passes) reads them instead of recomputing them (HF's get_rope_index loops over prompts in Python). Unchanged
    where the forward does not share prompts."""
    if not shares_prompts(model, batch):
        return batch
    firsts, seq_to_distinct = _distinct_prompts(batch.prompt_group)
    positions = prompt_positions(model, select_prompts(batch.prompts, firsts))
    return replace(batch, prompt_positions=positions[:, seq_to_distinct.to(positions.device)])


def _shared_prompt_token_hidden(model, batch: SequenceBatch, both_branches: bool,
                                buckets: list[torch.Tensor]) -> list[torch.Tensor]:
    """`response_token_hidden` with each distinct prompt run once per branch (see the module docstring): per bucket,
    the hidden states of its rows' response tokens [copies, N_bucket, d] (row-major within the bucket)."""
    prompts = batch.prompts
    P = prompts.input_ids.shape[1]
    firsts, seq_to_distinct = _distinct_prompts(batch.prompt_group)
    distinct = SequenceBatch(select_prompts(prompts, firsts), batch.response_ids[firsts],
                             batch.response_mask[firsts],
                             None if batch.masked_pixel_values is None else
                             _select_pixel_rows(prompts, batch.masked_pixel_values, firsts))
    # the prompt's positions once per distinct prompt; response tokens are text right after it, at
    # max(prompt positions) + 1 + j; padding 0
    positions = (prompt_positions(model, distinct.prompts) if batch.prompt_positions is None
                 else batch.prompt_positions[:, firsts])
    start = positions.amax(dim=(0, 2))[seq_to_distinct]                                         # [S]
    pixel_values, grid, copies = _branches(distinct, both_branches)
    prompt_ids = distinct.prompts.input_ids.repeat(copies, 1)
    prompt_hidden, cache = prefill(model, prompt_ids, distinct.prompts.attention_mask.repeat(copies, 1),
                                   positions.repeat(1, copies, 1), pixel_values, grid)
    family = family_of(model)
    prompt_states = family.prompt_cache_states(cache)
    del cache
    pieces = []
    for rows in buckets:
        # branch c of sequence i reads distinct prompt c·U + seq_to_distinct[i]
        expand = torch.cat([seq_to_distinct[rows.cpu()] + c * len(firsts) for c in range(copies)]).to(
            prompt_ids.device)
        rows = rows.to(prompt_ids.device)
        mask = batch.response_mask[rows]
        width = mask.shape[1] if batch.response_buckets is None else max(1, int(mask.sum(1).max()))
        mask = mask[:, :width]
        rows_cache = family.expanded_cache(prompt_states, expand, model)
        attention_mask = torch.cat([prompts.attention_mask[rows], mask.to(prompts.attention_mask.dtype)], 1)
        response_positions = (start[rows, None] + 1 + torch.arange(width, device=start.device)) * mask.long()
        response_out = model.model(
            input_ids=batch.response_ids[rows, :width].repeat(copies, 1),
            attention_mask=attention_mask.repeat(copies, 1),
            position_ids=response_positions.repeat(copies, 1).unsqueeze(0).expand(3, -1, -1),
            **{_cache_kwarg(model.model): rows_cache}, use_cache=True)
        last_prompt = prompt_hidden[expand, P - 1:P]                              # predicts response token 0
        hidden = torch.cat([last_prompt, response_out.last_hidden_state[:, :width - 1]], dim=1)
        pieces.append(hidden.reshape(copies, len(rows), width, -1)[:, mask.bool()])
    return pieces


def _cache_kwarg(module) -> str:
    """The KV-cache argument's name: `cache` in transformers >= 5.20, `past_key_values` in 5.19 (vLLM 0.32's
    range). A wrong name is swallowed by **kwargs and the response forward silently runs without its prompt."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _select_pixel_rows(prompts, pixel_values: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Rows of `pixel_values` (laid out like prompts.pixel_values) for prompts `index`, in that order."""
    return select_prompts(replace(prompts, pixel_values=pixel_values), index).pixel_values


def masked_branch_hidden(model, batch: SequenceBatch) -> torch.Tensor:
    """`response_token_hidden` of the masked-image branch alone, [N, d]: the masked pixel values in the original's
    place. Without gradient (the authors' computation, masked_grad=false: the masked branch is a constant)."""
    with torch.no_grad():
        masked = replace(batch, prompts=replace(batch.prompts, pixel_values=batch.masked_pixel_values),
                         masked_pixel_values=None)
        return response_token_hidden(model, masked, both_branches=False)[0]


def response_token_stats(model, batch: SequenceBatch, *, both_branches: bool, temperature: float,
                         masked_hidden: torch.Tensor | None = None) -> dict:
    """Per-token [S, R] tensors over response positions (0 where response_mask is 0).

    Always: logprobs, entropy (full-vocabulary). With both_branches, or with `masked_hidden` (the masked branch's
    [N, d] hidden states of the batch's response tokens computed elsewhere, e.g. detached by `masked_branch_hidden`;
    the forward then runs the original branch only): also masked_logprobs, masked_entropy, kl (exact
    full-vocabulary KL(π(·|I) ‖ π(·|I_mask))), all from one fused head call over both branches."""
    S = len(batch)
    hidden = response_token_hidden(model, batch, both_branches)
    if both_branches:
        masked_hidden = hidden[1]
    valid = batch.response_mask.bool()
    targets = batch.response_ids[valid]
    if masked_hidden is not None:
        head = model.lm_head(hidden[0], targets=targets, hidden_masked=masked_hidden, temperature=temperature)
        names = ("logprobs", "masked_logprobs", "entropy", "masked_entropy", "kl")
    else:
        head = model.lm_head(hidden[0], targets=targets, temperature=temperature)
        names = ("logprobs", "entropy")
    stats = {}
    for name, values in zip(names, head):
        full = values.new_zeros(S, batch.response_ids.shape[1])
        stats[name] = full.masked_scatter(valid, values)
    return stats
