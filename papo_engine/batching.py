"""Batch surgery on prompt tensors: select prompts, repeat each prompt n times (its image rows too), and lay
a [original; masked] pair out as ONE batch of 2B sequences that differ only in pixel_values."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import PromptBatch


def _row_slices(pb: PromptBatch) -> list[tuple[int, int]]:
    starts, out = 0, []
    for rows in pb.patches_per_prompt():
        out.append((starts, starts + rows))
        starts += rows
    return out


def _grid_slices(pb: PromptBatch) -> list[tuple[int, int]]:
    start, out = 0, []
    for k in pb.images_per_prompt:
        out.append((start, start + k))
        start += k
    return out


def select_prompts(pb: PromptBatch, index: list[int], repeat: int = 1) -> PromptBatch:
    """Prompts `index` (in that order), each repeated `repeat` times consecutively, images included."""
    rows, grids = _row_slices(pb), _grid_slices(pb)
    order = [i for i in index for _ in range(repeat)]
    take = torch.tensor(order, dtype=torch.long)
    return PromptBatch(
        input_ids=pb.input_ids[take],
        attention_mask=pb.attention_mask[take],
        pixel_values=torch.cat([pb.pixel_values[slice(*rows[i])] for i in order]),
        image_grid_thw=torch.cat([pb.image_grid_thw[slice(*grids[i])] for i in order]),
        images_per_prompt=[pb.images_per_prompt[i] for i in order],
        images=[pb.images[i] for i in order] if pb.images is not None else None,
    )


def repeat_prompts(pb: PromptBatch, n: int) -> PromptBatch:
    return select_prompts(pb, list(range(len(pb.images_per_prompt))), repeat=n)


def concat_prompts(batches: list[PromptBatch], pad_id: int) -> PromptBatch:
    """Stack prompt batches of different (left-padded) lengths into one."""
    length = max(b.input_ids.shape[1] for b in batches)
    left = [length - b.input_ids.shape[1] for b in batches]
    return PromptBatch(
        input_ids=torch.cat([F.pad(b.input_ids, (k, 0), value=pad_id) for b, k in zip(batches, left)]),
        attention_mask=torch.cat([F.pad(b.attention_mask, (k, 0)) for b, k in zip(batches, left)]),
        pixel_values=torch.cat([b.pixel_values for b in batches]),
        image_grid_thw=torch.cat([b.image_grid_thw for b in batches]),
        images_per_prompt=[k for b in batches for k in b.images_per_prompt],
        images=[x for b in batches for x in b.images] if all(b.images is not None for b in batches) else None,
    )
