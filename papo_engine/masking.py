"""Random patch masking of Qwen2/2.5-VL `pixel_values`, on the model's own patch grid.

Layout (verified against transformers' `Qwen2VLImageProcessorPil.patchify` and the torch processor, and by
`tests/test_masking.py` on a real image): `pixel_values` is [num_patches, C·T·P·P] (C=3, T=2, P=14), images
concatenated in order, image i owning t·h·w consecutive rows (`image_grid_thw[i] = (t, h, w)` in patches).
Within an image the rows are ordered (t, h/m, w/m, m, m): every m² = 4 consecutive rows are the 2×2 patches of
one merge unit (28×28 pixels, one LLM token). Each row is a flattened [C, T, P, P] block, so a row viewed as
[C, T·P·P] holds one channel per line.

Masking replaces whole rows (units of 4 rows = 28 px with unit="merge", single rows = 14 px with
unit="patch") by the fill value IN NORMALIZED SPACE: "black" = (0 − mean_c)/std_c per channel (what the
processor produces for a black pixel), "mean" = 0 (the channel mean), "noise" = N(0, 1) per value.
The token layout (`input_ids`, `image_grid_thw`) is unchanged, so original and masked sequences batch together.

Mask draw: one independent Bernoulli(ratio) per unit (the authors' "each square black with probability p").
It is unbiased for any image size (an exact per-image count would round, e.g. 0.6 × 4 units → 2 = 50%), and
the masked fraction over many units concentrates at p.

One mask per prompt, shared by its n rollouts: mask the prompt batch ONCE (before the rollout repeat), then
repeat rows with `repeat_for_rollouts` — `mask_per_prompt` does both. Use a fresh generator state every step.

Raw space (`mask.space=raw`, the authors' `random_patch_blackening`): square_px × square_px squares of the RAW
image, anchored at its top-left corner (the last row/column of squares may be partial), each set to black with
probability `ratio`; the masked images then go through the same image processor as the originals. Their
squares do not line up with the model's 14-px patches once the processor resizes the image. An RGB image the
processor takes at its own size (no resize: every step is per pixel up to the patch layout) is masked in place in
the original's pixel_values instead, with the processor's own value for a black pixel — exactly what the second
processor pass would give (tested), without it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# Qwen2/2.5-VL image processor defaults (OpenAI CLIP statistics)
QWEN_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

UNITS = ("merge", "patch")
FILLS = ("black", "mean", "noise")


def black_value(image_mean: Sequence[float], image_std: Sequence[float], dtype=torch.float32,
                device=None) -> Tensor:
    """Normalized value of a black pixel per channel, [C]: (0 − mean_c) / std_c."""
    mean = torch.tensor(list(image_mean), dtype=torch.float64)
    std = torch.tensor(list(image_std), dtype=torch.float64)
    return ((0.0 - mean) / std).to(dtype=dtype, device=device)


def _check_layout(pixel_values: Tensor, image_grid_thw: Tensor, merge_size: int) -> None:
    if pixel_values.dim() != 2:
        raise ValueError(f"pixel_values must be 2-D [num_patches, C*T*P*P], got shape {tuple(pixel_values.shape)}")
    rows = image_grid_thw.prod(dim=-1)
    if int(rows.sum()) != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw covers {int(rows.sum())} patches but pixel_values has "
                         f"{pixel_values.shape[0]} rows")
    if bool((image_grid_thw[:, 1:] % merge_size != 0).any()):
        raise ValueError(f"image_grid_thw h and w must be multiples of merge_size={merge_size}")


def mask_pixel_values(pixel_values: Tensor, image_grid_thw: Tensor, ratio: float, unit: str = "merge",
                      fill: str = "black", image_mean: Sequence[float] = QWEN_IMAGE_MEAN,
                      image_std: Sequence[float] = QWEN_IMAGE_STD, generator: torch.Generator | None = None,
                      merge_size: int = 2) -> tuple[Tensor, Tensor]:
    """Mask random units of every image; returns (masked_pixel_values, unit_mask).

        unit_mask[u] ~ Bernoulli(ratio)   for every unit u (merge: m² consecutive rows; patch: one row)
        masked[row]  = fill               if its unit is masked, else pixel_values[row] (bit-identical)

    `unit_mask` is a BoolTensor [num_units] in row order (num_units = num_patches / m² for "merge").
    Random draws come from `generator` (CPU or on pixel_values' device); the input is never modified.
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}: must be one of {', '.join(UNITS)}")
    if fill not in FILLS:
        raise ValueError(f"fill={fill!r}: must be one of {', '.join(FILLS)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio}: must be in [0, 1]")
    _check_layout(pixel_values, image_grid_thw, merge_size)
    num_rows, dim = pixel_values.shape
    channels = len(image_mean)
    if dim % channels:
        raise ValueError(f"row width {dim} is not a multiple of {channels} channels")
    rows_per_unit = merge_size * merge_size if unit == "merge" else 1
    num_units = num_rows // rows_per_unit
    draw_device = generator.device if generator is not None else pixel_values.device

    unit_mask = torch.rand(num_units, generator=generator, device=draw_device) < ratio
    unit_mask = unit_mask.to(pixel_values.device)
    row_mask = unit_mask.repeat_interleave(rows_per_unit)  # [num_rows]

    if fill == "noise":
        k = int(row_mask.sum())
        noise = torch.randn(k, dim, generator=generator, device=draw_device).to(pixel_values)
        masked = pixel_values.clone()
        masked[row_mask] = noise
        return masked, unit_mask
    if fill == "black":
        per_channel = black_value(image_mean, image_std, pixel_values.dtype, pixel_values.device)
    else:  # "mean": the channel mean is 0 after normalization
        per_channel = torch.zeros(channels, dtype=pixel_values.dtype, device=pixel_values.device)
    fill_row = per_channel.repeat_interleave(dim // channels)  # row layout [C, T, P, P] -> channel-major
    masked = torch.where(row_mask[:, None], fill_row[None, :], pixel_values)
    return masked, unit_mask


def _block_repeat_index(block_sizes: Tensor, n: int) -> Tensor:
    """Row index that repeats each contiguous block n times in place: [b0]*n, [b1]*n, ... (vectorized)."""
    block_sizes = block_sizes.to(torch.long)
    starts = torch.cumsum(block_sizes, 0) - block_sizes
    lengths = block_sizes.repeat_interleave(n)
    rep_starts = starts.repeat_interleave(n)
    total = int(lengths.sum())
    block_id = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    offset = torch.arange(total) - (torch.cumsum(lengths, 0) - lengths)[block_id]
    return rep_starts[block_id] + offset


def repeat_for_rollouts(pixel_values: Tensor, image_grid_thw: Tensor, n: int,
                        images_per_prompt: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Repeat each prompt's image rows n times, prompt-major, to match responses laid out [g*n + k].

    Prompt g owns `images_per_prompt[g]` consecutive images (default: one image per prompt) and their rows.
    Returns (pixel_values [n·num_patches, D], image_grid_thw [n·num_images, 3]); sequence g*n + k sees exactly
    prompt g's rows. Applied to masked pixel values it shares one mask across the n rollouts of a prompt.
    """
    num_images = image_grid_thw.shape[0]
    if images_per_prompt is None:
        images_per_prompt = torch.ones(num_images, dtype=torch.long)
    ipp = torch.as_tensor(images_per_prompt, dtype=torch.long).cpu()
    if int(ipp.sum()) != num_images:
        raise ValueError(f"images_per_prompt sums to {int(ipp.sum())}, image_grid_thw has {num_images} images")
    rows_per_image = image_grid_thw.prod(dim=-1).to(torch.long).cpu()
    image_prompt = torch.repeat_interleave(torch.arange(ipp.numel()), ipp)
    rows_per_prompt = torch.zeros(ipp.numel(), dtype=torch.long).index_add_(0, image_prompt, rows_per_image)
    row_idx = _block_repeat_index(rows_per_prompt, n).to(pixel_values.device)
    img_idx = _block_repeat_index(ipp, n).to(image_grid_thw.device)
    return pixel_values.index_select(0, row_idx), image_grid_thw.index_select(0, img_idx)


def mask_per_prompt(pixel_values: Tensor, image_grid_thw: Tensor, n: int, ratio: float, unit: str = "merge",
                    fill: str = "black", image_mean: Sequence[float] = QWEN_IMAGE_MEAN,
                    image_std: Sequence[float] = QWEN_IMAGE_STD,
                    generator: torch.Generator | Sequence[torch.Generator] | None = None,
                    merge_size: int = 2, images_per_prompt: Sequence[int] | Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Mask the PROMPT batch once, then repeat for the n rollouts: every rollout of a prompt shares its mask.

    `generator`: one for the batch, or one per prompt — then a prompt's mask does not depend on which other
    prompts share its batch (or rank), which keeps 1-rank and N-rank runs identical.

    Input: the un-repeated prompt batch (pixel_values of all prompts' images, image_grid_thw, images_per_prompt).
    Returns (masked pixel_values repeated [n·num_patches, D], image_grid_thw repeated, unit_mask of the prompt
    batch [num_units]). Repeat the original pixel_values with `repeat_for_rollouts` the same way.
    """
    if isinstance(generator, (list, tuple)):  # one generator per prompt
        ipp = [1] * image_grid_thw.shape[0] if images_per_prompt is None else [int(k) for k in images_per_prompt]
        if len(generator) != len(ipp):
            raise ValueError(f"{len(generator)} generators for {len(ipp)} prompts")
        rows_per_image = image_grid_thw.prod(dim=-1).tolist()
        pieces, image, row = [], 0, 0
        for gen, k in zip(generator, ipp):
            rows = int(sum(rows_per_image[image:image + k]))
            pieces.append(mask_pixel_values(pixel_values[row:row + rows], image_grid_thw[image:image + k], ratio,
                                            unit, fill, image_mean, image_std, gen, merge_size))
            image, row = image + k, row + rows
        masked, unit_mask = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    else:
        masked, unit_mask = mask_pixel_values(pixel_values, image_grid_thw, ratio, unit, fill, image_mean,
                                              image_std, generator, merge_size)
    masked_rep, thw_rep = repeat_for_rollouts(masked, image_grid_thw, n, images_per_prompt)
    return masked_rep, thw_rep, unit_mask


def _draw_squares(height: int, width: int, ratio: float, square_px: int, generator: torch.Generator | None
                  ) -> tuple[Tensor, Tensor]:
    """The authors' square draw: (square_mask BoolTensor [rows, cols], pixel_mask BoolTensor [height, width])."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio}: must be in [0, 1]")
    if square_px < 1:
        raise ValueError(f"square_px={square_px}: must be >= 1")
    rows, cols = -(-height // square_px), -(-width // square_px)
    square_mask = (torch.rand(rows * cols, generator=generator) < ratio).view(rows, cols)
    pixel_mask = square_mask[:, None, :, None].expand(rows, square_px, cols, square_px).reshape(
        rows * square_px, cols * square_px)[:height, :width]
    return square_mask, pixel_mask


def blacken_raw_squares(image: Image.Image, ratio: float, square_px: int = 14,
                        generator: torch.Generator | None = None) -> tuple[Image.Image, Tensor]:
    """The authors' masking on a raw PIL image; returns (masked image, square_mask BoolTensor [rows, cols]).

        square (i, j) covers pixels [i·s, min((i+1)·s, H)) × [j·s, min((j+1)·s, W)),  rows = ⌈H/s⌉, cols = ⌈W/s⌉
        square_mask[i, j] ~ Bernoulli(ratio), drawn in row-major order; masked pixels become opaque black

    RGB images stay RGB; other modes are converted to RGBA first (the first step of the processor's own
    conversion to RGB, which composites on white), so the unmasked pixels reach the model exactly as the
    original's do. The input image is never modified.
    """
    work = image if image.mode == "RGB" else image.convert("RGBA")
    pixels = np.array(work)  # a copy: [H, W, C]
    square_mask, pixel_mask = _draw_squares(pixels.shape[0], pixels.shape[1], ratio, square_px, generator)
    pixel_mask = pixel_mask.numpy()
    pixels[pixel_mask] = 0
    if pixels.shape[2] == 4:
        pixels[pixel_mask, 3] = 255  # opaque: a transparent square would be composited to white
    return Image.fromarray(pixels, mode=work.mode), square_mask


def _taken_at_own_size(image: Image.Image, thw: Tensor, patch: int) -> bool:
    """Whether the processor took this RGB image at its own size (grid × patch = the image): then processing it is
    per pixel up to the patch layout, and a masked copy can be made in its pixel_values rows."""
    t, h, w = (int(v) for v in thw)
    return image.mode == "RGB" and t == 1 and image.size == (w * patch, h * patch)


def _pixels_to_rows(values: Tensor, temporal: int, patch: int, merge: int) -> Tensor:
    """Per-pixel values [K, C, H, W] of K images in the processor's pixel_values layout [K, h·w, C·T·P·P] (each
    image repeated over T frames; rows ordered (h/m, w/m, m, m); each row a flattened [C, T, P, P] block)."""
    images, channels, height, width = values.shape
    h, w = height // patch, width // patch
    frames = values.unsqueeze(1).expand(images, temporal, channels, height, width).reshape(
        images, temporal, channels, h // merge, merge, patch, w // merge, merge, patch)
    return frames.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(images, h * w, channels * temporal * patch * patch)


def _blacken_rows(rows: Tensor, pixel_masks: Tensor, black_rows: Tensor, image_processor) -> Tensor:
    """K images' pixel_values `rows` [K, h·w, D] with the pixels of `pixel_masks` [K, H, W] taken from `black_rows`
    [h·w, D] (the processor's pixel_values of an all-black image of their size)."""
    temporal, patch = image_processor.temporal_patch_size, image_processor.patch_size
    channels = black_rows.shape[1] // (temporal * patch * patch)
    images, height, width = pixel_masks.shape
    where = _pixels_to_rows(pixel_masks[:, None].expand(images, channels, height, width), temporal, patch,
                            image_processor.merge_size)
    return torch.where(where, black_rows.to(rows.dtype), rows)


def mask_raw_per_prompt(images: Sequence[Sequence[Image.Image]], image_grid_thw: Tensor, n: int, ratio: float,
                        square_px: int, image_processor, generators: Sequence[torch.Generator],
                        pixel_values: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Raw-space counterpart of `mask_per_prompt`: prompt g's images are masked with generators[g] (one mask
    per prompt, shared by its n rollouts), processed by `image_processor` like the originals, then repeated.

    `image_grid_thw` is the ORIGINAL images' grid: the masked images must produce the same one (same size, same
    resize), else a ValueError — original and masked sequences must share their token layout.
    `pixel_values`, the originals' rows (optional): an RGB image taken at its own size is masked in them, with the
    processor's pixel_values of an all-black image of that size as the fill — the same values as the processor
    pass, which then runs only for the other images.
    Returns (masked pixel_values repeated [n·num_patches, D], image_grid_thw repeated, the concatenated square
    masks of all images [num_squares]).
    """
    if len(generators) != len(images):
        raise ValueError(f"{len(generators)} generators for {len(images)} prompts")
    patch = getattr(image_processor, "patch_size", 0)
    rows_per_image = image_grid_thw.prod(dim=-1).tolist()
    starts = np.cumsum([0, *rows_per_image]).tolist()
    pieces: list[Tensor | None] = [None] * len(rows_per_image)  # per image: its masked rows (filled in below)
    to_process, processed_images, squares = [], [], []
    own_size: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}  # image size -> [(image index, pixel mask)]
    index = 0
    for gen, prompt_images in zip(generators, images):
        for image in prompt_images:
            if pixel_values is not None and patch and _taken_at_own_size(image, image_grid_thw[index], patch):
                square_mask, pixel_mask = _draw_squares(image.height, image.width, ratio, square_px, gen)
                own_size.setdefault(image.size, []).append((index, pixel_mask))
            else:
                out, square_mask = blacken_raw_squares(image, ratio, square_px, gen)
                to_process.append(out)
                processed_images.append(index)
            squares.append(square_mask.flatten())
            index += 1
    for size, drawn in own_size.items():  # all images of one size at once
        black = image_processor(images=[Image.new("RGB", size)], return_tensors="pt")["pixel_values"]
        rows = torch.stack([pixel_values[starts[i]:starts[i] + rows_per_image[i]] for i, _ in drawn])
        masked_rows = _blacken_rows(rows, torch.stack([mask for _, mask in drawn]), black, image_processor)
        for (i, _), image_rows in zip(drawn, masked_rows):
            pieces[i] = image_rows
    if to_process:
        vision = image_processor(images=to_process, return_tensors="pt")
        want = image_grid_thw[processed_images]
        if not torch.equal(vision["image_grid_thw"], want.to(vision["image_grid_thw"].dtype)):
            raise ValueError(f"raw-masked images give image_grid_thw {vision['image_grid_thw'].tolist()}, the "
                             f"originals {want.tolist()}: they must be processed alike")
        for i, image_rows in zip(processed_images, vision["pixel_values"].split(
                [rows_per_image[i] for i in processed_images])):
            pieces[i] = image_rows
    masked, thw = repeat_for_rollouts(torch.cat(pieces), image_grid_thw, n, [len(x) for x in images])
    return masked, thw, torch.cat(squares)


def mask_prompts(mask_cfg, prompts, keys: Sequence[int], n: int, seed: int, image_processor
                 ) -> tuple[Tensor, Tensor]:
    """The masked pixel_values of a prompt batch, repeated for its n rollouts, as configured by `mask_cfg`
    (`MaskConfig`): one mask per prompt, drawn from a generator seeded by (seed, the prompt's key) — the same on
    any rank and in any batch. `prompts` is a `models.PromptBatch` (its raw `images` are needed for
    space=raw). Returns (masked pixel_values [n·num_patches, D], the drawn units or squares, flattened)."""
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + key) for key in keys]
    if mask_cfg.space == "raw":
        if prompts.images is None:
            raise ValueError("mask.space=raw needs the prompts' raw images (PromptBatch.images is None)")
        masked, _, drawn = mask_raw_per_prompt(prompts.images, prompts.image_grid_thw, n, mask_cfg.ratio,
                                               mask_cfg.square_px, image_processor, generators, prompts.pixel_values)
        return masked.to(prompts.pixel_values.dtype), drawn
    masked, _, drawn = mask_per_prompt(prompts.pixel_values, prompts.image_grid_thw, n, mask_cfg.ratio, mask_cfg.unit,
                                       mask_cfg.fill, image_processor.image_mean, image_processor.image_std,
                                       generators, image_processor.merge_size, prompts.images_per_prompt)
    return masked, drawn
