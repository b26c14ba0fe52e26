"""Length-aware micro-batches: which sequences each training forward takes, planned from their lengths alone.

A step's responses have long-tailed lengths; micro-batches of fixed size padded to the step's longest response
(and prompt) compute mostly padding. With `trainer.micro_batch_tokens` > 0:
- a micro-batch holds up to micro_batch_tokens tokens — each distinct prompt counted once (the shared-prompt
  forward runs it once for its rows), plus every response — and up to micro_batch_size sequences. Prompt groups are
  taken whole where they fit, longest prompts first, so a micro-batch's prompts pad little; a group that does not
  fit is split, its longest responses first (`plan_micro_batches`);
- a micro-batch is cut to its own longest prompt and response (`SequenceBatch.select(…, trim=True)`);
- inside it, the response forward runs in buckets of rows of similar length (`response_buckets`), each cut to its
  own longest response, all attending to the prompts' cache computed once (`actor.py`).
The loss does not change: its token-mean normalizer is global (`trainer._optimizer_step`), so how the sequences are
grouped into forwards changes only the shapes of the matrix products (fp32 rounding). The authors' computation
(`official`) normalizes per micro-batch, so it keeps the fixed micro-batches (each still cut and bucketed).
Ranks run the same number of micro-batches — ZeRO-3 gathers parameters collectively in every forward — so a rank
that planned fewer splits its largest ones (`split_to_count`).

Plans are lists of sequence indices, computed on plain lists of lengths (tested without a model).
"""
from __future__ import annotations

import torch

# a bucket boundary pays when it saves more padded token slots than this: the cost of one more forward call
BUCKET_OVERHEAD_TOKENS = 32


def plan_micro_batches(prompt_lengths: list[int], response_lengths: list[int], groups: list[int],
                       max_tokens: int, max_sequences: int) -> list[list[int]]:
    """Micro-batches of sequence indices (see the module docstring). `groups[i]`: sequence i's prompt group
    (consecutive sequences with the same value share a prompt); a prompt's tokens count once per micro-batch."""
    runs: list[list[int]] = []  # sequences of each prompt group, in order
    for i, g in enumerate(groups):
        if runs and groups[runs[-1][0]] == g:
            runs[-1].append(i)
        else:
            runs.append([i])
    runs.sort(key=lambda run: -prompt_lengths[run[0]])  # stable: equal prompts keep their order
    plan: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for run in runs:
        prompt = prompt_lengths[run[0]]
        opened = False  # whether `current` holds this prompt already (its tokens counted)
        for i in sorted(run, key=lambda i: -response_lengths[i]):
            extra = response_lengths[i] + (0 if opened else prompt)
            if current and (len(current) >= max_sequences or tokens + extra > max_tokens):
                plan.append(current)
                current, tokens, opened = [], 0, False
                extra = response_lengths[i] + prompt
            current.append(i)
            tokens += extra
            opened = True
    if current:
        plan.append(current)
    return plan


def split_to_count(plan: list[list[int]], count: int, response_lengths: list[int]) -> list[list[int]]:
    """`plan` split into `count` micro-batches (count ≥ len(plan), ≤ the number of sequences): the micro-batch with
    the most response tokens is halved, by rows, until there are enough."""
    plan = [list(mb) for mb in plan]
    while len(plan) < count:
        largest = max(range(len(plan)), key=lambda k: (len(plan[k]) > 1, sum(response_lengths[i] for i in plan[k])))
        mb = plan.pop(largest)
        if len(mb) < 2:
            raise ValueError(f"cannot split {len(plan) + 1} micro-batches into {count}: too few sequences")
        plan[largest:largest] = [mb[:len(mb) // 2], mb[len(mb) // 2:]]
    return plan


def response_buckets(response_lengths: list[int]) -> list[list[int]]:
    """Rows (indices into `response_lengths`) in buckets of similar length, longest first: the partition of the
    rows sorted by length that minimizes padded slots (Σ rows × the bucket's longest) + BUCKET_OVERHEAD_TOKENS per
    bucket (dynamic programming over the sorted rows)."""
    order = sorted(range(len(response_lengths)), key=lambda i: -response_lengths[i])
    lengths = [max(1, response_lengths[i]) for i in order]
    m = len(order)
    best = [0.0] + [float("inf")] * m  # best[j]: cost of the first j sorted rows
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j):  # bucket = sorted rows i..j-1, its longest is lengths[i]
            cost = best[i] + (j - i) * lengths[i] + BUCKET_OVERHEAD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], m
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def forward_slots(batch, shares_prompts: bool) -> tuple[int, int]:
    """(token slots one branch's forward over `batch` (an `actor.SequenceBatch`) computes, of which real tokens),
    laid out as `actor.py` runs it: shared prompts — each distinct prompt once at the batch's prompt width, then
    each bucket's rows at the bucket's response width; otherwise every row at prompt + response width."""
    prompt_mask, response_mask = batch.prompts.attention_mask, batch.response_mask
    lengths = response_mask.sum(1).long()
    buckets = batch.response_buckets
    rows = [torch.arange(len(lengths))] if buckets is None else buckets
    widths = [response_mask.shape[1] if buckets is None else max(1, int(lengths[b].max())) for b in rows]
    prompt_width = prompt_mask.shape[1]
    if shares_prompts:
        first = torch.ones(len(lengths), dtype=torch.bool)
        first[1:] = batch.prompt_group[1:] != batch.prompt_group[:-1]
        slots = int(first.sum()) * prompt_width + sum(len(b) * w for b, w in zip(rows, widths))
        real = int(prompt_mask[first].sum()) + int(lengths.sum())
    else:
        slots = sum(len(b) * (prompt_width + w) for b, w in zip(rows, widths))
        real = int(prompt_mask.sum()) + int(lengths.sum())
    return slots, real
