"""Masking on Qwen2/2.5-VL's patch layout, checked against the real (PIL) image processor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from papo_engine.masking import (
    QWEN_IMAGE_MEAN,
    QWEN_IMAGE_STD,
    black_value,
    blacken_raw_squares,
    mask_raw_per_prompt,
    mask_per_prompt,
    mask_pixel_values,
    repeat_for_rollouts,
)

H, W = 84, 112  # multiples of 28 inside [min_pixels, max_pixels]: the processor does not change the size


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLImageProcessorPil(min_pixels=784, max_pixels=1003520)


def _image(seed=0, h=H, w=W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _process(processor, arrays):
    out = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _changed_rows(a, b):
    return (a != b).any(dim=1).nonzero().flatten().tolist()


def _fake(num_images=1, h=8, w=8, dim=3 * 2 * 2 * 2, seed=0):
    """Synthetic pixel_values with a small row width (C=3, T=2, P=2) for statistics over many units."""
    g = torch.Generator().manual_seed(seed)
    thw = torch.tensor([[1, h, w]] * num_images)
    return torch.randn(int(thw.prod(-1).sum()), dim, generator=g), thw


# ----------------------------------------------------------------------------------------------------------
# the layout, verified on the real processor


def test_processor_layout_merge_units(processor):
    """Blacking out the 28×28 block (i, j) of the raw image changes exactly rows 4u..4u+3, u = i·(W/28) + j."""
    arr = _image()
    pv, thw = _process(processor, [arr])
    assert thw.tolist() == [[1, H // 14, W // 14]] and pv.shape == (H * W // 196, 3 * 2 * 14 * 14)
    black = black_value(QWEN_IMAGE_MEAN, QWEN_IMAGE_STD)
    for i in range(H // 28):
        for j in range(W // 28):
            arr2 = arr.copy()
            arr2[28 * i:28 * (i + 1), 28 * j:28 * (j + 1)] = 0
            pv2, _ = _process(processor, [arr2])
            u = i * (W // 28) + j
            assert _changed_rows(pv, pv2) == [4 * u, 4 * u + 1, 4 * u + 2, 4 * u + 3]
            # the processor's black equals (0 - mean_c) / std_c per channel, row layout [C, T, P, P]
            rows = pv2[4 * u:4 * u + 4].view(4, 3, -1)
            assert torch.allclose(rows, black[None, :, None].expand_as(rows), atol=1e-6)


def test_processor_layout_patch_rows_and_channels(processor):
    """Single 14×14 patch (r, c) is row 4·((r//2)·(W/28) + c//2) + 2·(r%2) + c%2, laid out [C, T, P, P]."""
    arr = _image(seed=1)
    pv, _ = _process(processor, [arr])
    mean = np.array(QWEN_IMAGE_MEAN)
    std = np.array(QWEN_IMAGE_STD)
    for r, c in [(0, 0), (0, 1), (1, 0), (1, 1), (3, 6), (5, 7)]:
        row = 4 * ((r // 2) * (W // 28) + c // 2) + 2 * (r % 2) + c % 2
        arr2 = arr.copy()
        arr2[14 * r:14 * (r + 1), 14 * c:14 * (c + 1)] = 0
        pv2, _ = _process(processor, [arr2])
        assert _changed_rows(pv, pv2) == [row]
        block = arr[14 * r:14 * (r + 1), 14 * c:14 * (c + 1)].astype(np.float64) / 255.0  # [P, P, C]
        want = torch.from_numpy(((block - mean) / std).transpose(2, 0, 1))  # [C, P, P]
        got = pv[row].view(3, 2, 14, 14).double()
        for t in range(2):  # T = 2 copies of the same frame
            assert torch.allclose(got[:, t], want, atol=1e-5)


def test_mask_matches_processor_black(processor):
    """ratio=1 turns every row into exactly what the processor gives for an all-black image."""
    pv, thw = _process(processor, [_image(seed=2)])
    black_pv, _ = _process(processor, [np.zeros((H, W, 3), dtype=np.uint8)])
    masked, unit_mask = mask_pixel_values(pv, thw, ratio=1.0)
    assert unit_mask.all() and unit_mask.shape == (pv.shape[0] // 4,)
    assert torch.allclose(masked, black_pv, atol=1e-6)
    # TRL-port defects absent: the fill is black, not the normalized 0 (channel mean) ...
    assert (masked.abs() > 1.0).all()
    # ... and the mask really changes Qwen's 2-D pixel_values
    m, um = mask_pixel_values(pv, thw, ratio=0.6, generator=torch.Generator().manual_seed(0))
    assert um.any() and not torch.equal(m, pv)


def test_real_image_masked_units_are_black_and_others_identical(processor):
    pv, thw = _process(processor, [_image(seed=3), _image(seed=4, h=56, w=84)])
    masked, unit_mask = mask_pixel_values(pv, thw, 0.5, generator=torch.Generator().manual_seed(1))
    rows = unit_mask.repeat_interleave(4)
    assert _changed_rows(pv, masked) == rows.nonzero().flatten().tolist()
    black = black_value(QWEN_IMAGE_MEAN, QWEN_IMAGE_STD)
    assert torch.equal(masked[rows].view(-1, 3, 2 * 14 * 14),
                       black[None, :, None].expand(int(rows.sum()), 3, 2 * 14 * 14))


# ----------------------------------------------------------------------------------------------------------
# statistics, fills, purity


@pytest.mark.parametrize("p", [0.4, 0.6, 0.8])
def test_masked_fraction_near_ratio(p):
    pv, thw = _fake(num_images=40, h=32, w=32)  # 40 × 256 = 10,240 merge units
    masked, unit_mask = mask_pixel_values(pv, thw, p, generator=torch.Generator().manual_seed(11))
    assert unit_mask.numel() == 10240
    assert abs(unit_mask.float().mean().item() - p) <= 0.02
    changed = (masked != pv).any(dim=1).view(-1, 4)
    # merge units are all-or-nothing and follow unit_mask
    assert torch.equal(changed.all(dim=1), unit_mask) and torch.equal(changed.any(dim=1), unit_mask)


def test_patch_unit_masks_single_rows():
    pv, thw = _fake(num_images=20, h=16, w=16)  # 5,120 patch rows
    masked, unit_mask = mask_pixel_values(pv, thw, 0.6, unit="patch", generator=torch.Generator().manual_seed(2))
    assert unit_mask.numel() == pv.shape[0]
    assert abs(unit_mask.float().mean().item() - 0.6) <= 0.02
    changed = (masked != pv).any(dim=1)
    assert torch.equal(changed, unit_mask)
    per_merge = changed.view(-1, 4).sum(dim=1)
    assert ((per_merge > 0) & (per_merge < 4)).any()  # really per patch, not per merge unit


@pytest.mark.parametrize("fill", ["black", "mean", "noise"])
def test_input_untouched_and_unmasked_rows_bit_identical(fill):
    pv, thw = _fake(num_images=3, h=8, w=12, seed=3)
    pv_before, thw_before = pv.clone(), thw.clone()
    input_ids = torch.randint(0, 100, (3, 30))
    ids_before = input_ids.clone()
    masked, unit_mask = mask_pixel_values(pv, thw, 0.5, fill=fill, generator=torch.Generator().manual_seed(4))
    assert torch.equal(pv, pv_before) and torch.equal(thw, thw_before) and torch.equal(input_ids, ids_before)
    assert masked.data_ptr() != pv.data_ptr() and masked.shape == pv.shape and masked.dtype == pv.dtype
    rows = unit_mask.repeat_interleave(4)
    assert torch.equal(masked[~rows], pv[~rows])
    if fill == "mean":
        assert torch.equal(masked[rows], torch.zeros_like(masked[rows]))
    if fill == "noise":
        noise = masked[rows]
        assert not torch.equal(noise, pv[rows])
        assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.0) < 0.05


def test_seeded_and_fresh():
    pv, thw = _fake(num_images=4, h=16, w=16)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a1, m1 = mask_pixel_values(pv, thw, 0.6, generator=g1)
    a2, m2 = mask_pixel_values(pv, thw, 0.6, generator=g2)
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    a3, m3 = mask_pixel_values(pv, thw, 0.6, generator=g1)  # advanced state: the next step's mask
    assert not torch.equal(m1, m3)
    _, m4 = mask_pixel_values(pv, thw, 0.6, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(m1, m4)


def test_bad_inputs_raise():
    pv, thw = _fake()
    with pytest.raises(ValueError):
        mask_pixel_values(pv[:-4], thw, 0.5)  # grid does not cover the rows
    with pytest.raises(ValueError):
        mask_pixel_values(pv, thw, 0.5, unit="grid")
    with pytest.raises(ValueError):
        mask_pixel_values(pv, thw, 0.5, fill="zero")
    with pytest.raises(ValueError):
        mask_pixel_values(pv, thw, 1.5)


# ----------------------------------------------------------------------------------------------------------
# one mask per prompt, shared by its n rollouts


def test_mask_per_prompt_shared_across_rollouts():
    g = torch.Generator().manual_seed(8)
    # 3 prompts with 1, 2, 1 images of different sizes
    thw = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4], [1, 4, 4]])
    rows = thw.prod(-1)
    pv = torch.randn(int(rows.sum()), 24, generator=g)
    ipp, n = [1, 2, 1], 4
    masked_rep, thw_rep, unit_mask = mask_per_prompt(pv, thw, n, 0.5, images_per_prompt=ipp,
                                                     generator=torch.Generator().manual_seed(9))
    orig_rep, thw_rep2 = repeat_for_rollouts(pv, thw, n, ipp)
    assert torch.equal(thw_rep, thw_rep2)
    # expected order: prompt 0 ×4, prompt 1 ×4, prompt 2 ×4
    want_thw = torch.cat([thw[0:1]] * 4 + [thw[1:3]] * 4 + [thw[3:4]] * 4)
    assert torch.equal(thw_rep, want_thw)
    prompt_rows = [int(rows[0]), int(rows[1] + rows[2]), int(rows[3])]
    starts = [0, prompt_rows[0], prompt_rows[0] + prompt_rows[1]]
    masked_once, _ = mask_pixel_values(pv, thw, 0.5, generator=torch.Generator().manual_seed(9))
    off = 0
    for gi in range(3):
        block = pv[starts[gi]:starts[gi] + prompt_rows[gi]]
        mblock = masked_once[starts[gi]:starts[gi] + prompt_rows[gi]]
        for _ in range(n):
            assert torch.equal(orig_rep[off:off + prompt_rows[gi]], block)
            assert torch.equal(masked_rep[off:off + prompt_rows[gi]], mblock)  # same mask for every rollout
            off += prompt_rows[gi]
    assert off == masked_rep.shape[0] == n * pv.shape[0]
    assert unit_mask.numel() == pv.shape[0] // 4 and unit_mask.any() and not unit_mask.all()


def test_repeat_for_rollouts_default_one_image_per_prompt():
    pv, thw = _fake(num_images=3, h=2, w=4)
    rep, thw_rep = repeat_for_rollouts(pv, thw, 2)
    assert torch.equal(rep, torch.cat([pv[0:8], pv[0:8], pv[8:16], pv[8:16], pv[16:24], pv[16:24]]))
    assert torch.equal(thw_rep, thw.repeat_interleave(2, dim=0))
    with pytest.raises(ValueError):
        repeat_for_rollouts(pv, thw, 2, images_per_prompt=[1, 1])


def test_per_prompt_generators_make_a_prompts_mask_independent_of_its_batch():
    """One generator per prompt (seeded by the prompt's key): prompt 2's mask is the same alone or in a batch."""
    grid = torch.tensor([[1, 4, 4], [1, 4, 6], [1, 2, 2]])
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)

    def gens(keys):
        return [torch.Generator().manual_seed(1000 + k) for k in keys]

    together, _, units = mask_per_prompt(pixel_values, grid, 2, 0.5, generator=gens([0, 1, 2]))
    alone, _, units_alone = mask_per_prompt(pixel_values[16 + 24:], grid[2:], 2, 0.5, generator=gens([2]))
    assert torch.equal(together[2 * (16 + 24):], alone)
    assert torch.equal(units[-1:], units_alone)
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        mask_per_prompt(pixel_values, grid, 2, 0.5, generator=gens([0, 1]))


# ----------------------------------------------------------------------------------------------------------
# raw-image space (mask.space=raw): the authors' random_patch_blackening, then the same image processor


def _authors_blackening(arr: np.ndarray, draws: list[float], ratio: float, size: int) -> np.ndarray:
    """MikeWangWZHL/PAPO verl/trainer/papo_utils.py, written out: a loop over squares from the top-left corner,
    one uniform draw per square in row-major order (ours come from a torch generator instead of np.random)."""
    img = arr.astype(np.float32)
    h, w = img.shape[:2]
    k = 0
    for y in range(0, h, size):
        for x in range(0, w, size):
            if draws[k] < ratio:
                img[y:min(y + size, h), x:min(x + size, w), :] = 0
            k += 1
    return img.astype(np.uint8)


@pytest.mark.parametrize("h, w", [(50, 37), (84, 112), (13, 29)])
def test_raw_squares_match_the_authors_loop(h, w):
    arr = _image(seed=5, h=h, w=w)
    masked, squares = blacken_raw_squares(Image.fromarray(arr), 0.6, 14, torch.Generator().manual_seed(3))
    draws = torch.rand(-(-h // 14) * -(-w // 14), generator=torch.Generator().manual_seed(3)).tolist()
    assert squares.shape == (-(-h // 14), -(-w // 14))
    assert squares.flatten().tolist() == [d < 0.6 for d in draws]
    assert np.array_equal(np.array(masked), _authors_blackening(arr, draws, 0.6, 14))  # partial edge squares too


def test_raw_masked_fraction_near_ratio_and_input_untouched():
    arr = _image(seed=6, h=560, w=560)  # 1,600 squares
    image = Image.fromarray(arr)
    masked, squares = blacken_raw_squares(image, 0.6, 14, torch.Generator().manual_seed(4))
    assert abs(squares.float().mean().item() - 0.6) <= 0.03
    assert np.array_equal(np.array(image), arr)
    black = (np.array(masked) == 0).all(axis=2)
    assert abs(black.mean() - squares.float().mean().item()) < 1e-3  # random pixels are rarely exactly black


def test_raw_mask_goes_through_the_processor_with_the_original_grid():
    """Images the processor RESIZES (not multiples of 28): the masked images keep the original grid, ratio 0 gives
    the original pixel_values bit for bit, ratio 1 the processor's all-black image; one mask per prompt."""
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=20000)
    images = [[Image.fromarray(_image(seed=7, h=50, w=61))],
              [Image.fromarray(_image(seed=8, h=90, w=45)), Image.fromarray(_image(seed=9, h=33, w=70))]]
    flat = [im for ims in images for im in ims]
    pv, thw = _process(processor, [np.array(im) for im in flat])
    gens = [torch.Generator().manual_seed(k) for k in (0, 1)]
    none, thw_rep, _ = mask_raw_per_prompt(images, thw, 3, 0.0, 14, processor, gens)
    assert torch.equal(none, repeat_for_rollouts(pv, thw, 3, [1, 2])[0])
    assert torch.equal(thw_rep, repeat_for_rollouts(pv, thw, 3, [1, 2])[1])
    all_black, _, squares = mask_raw_per_prompt(images, thw, 1, 1.0, 14, processor, gens)
    black_pv, _ = _process(processor, [np.zeros_like(np.array(im)) for im in flat])
    assert squares.all() and torch.equal(all_black, black_pv)
    masked, _, squares = mask_raw_per_prompt(images, thw, 2, 0.6, 14, processor,
                                             [torch.Generator().manual_seed(k) for k in (0, 1)])
    want = [blacken_raw_squares(im, 0.6, 14, g)[0] for g, ims in
            zip([torch.Generator().manual_seed(k) for k in (0, 1)], images) for im in ims]
    want_pv, _ = _process(processor, [np.array(im) for im in want])
    assert torch.equal(masked, repeat_for_rollouts(want_pv, thw, 2, [1, 2])[0])
    assert squares.any() and not squares.all() and not torch.equal(masked, repeat_for_rollouts(pv, thw, 2, [1, 2])[0])
    with pytest.raises(ValueError, match="image_grid_thw"):
        mask_raw_per_prompt(images, thw[[1, 0, 2]], 1, 0.5, 14, processor, gens)


def test_raw_mask_of_a_transparent_image_is_opaque_black():
    """A non-RGB image: masked squares reach the model black (a zeroed transparent pixel would become white),
    unmasked pixels exactly as the processor treats the original."""
    processor = Qwen2VLImageProcessorPil(min_pixels=784, max_pixels=1003520)
    rgba = np.concatenate([_image(seed=10, h=56, w=56), np.full((56, 56, 1), 128, np.uint8)], axis=2)
    image = Image.fromarray(rgba, mode="RGBA")
    pv = processor(images=[image], return_tensors="pt")["pixel_values"]
    masked, squares = blacken_raw_squares(image, 1.0, 28, torch.Generator().manual_seed(0))
    assert squares.all()
    black = processor(images=[Image.new("RGB", (56, 56))], return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(images=[masked], return_tensors="pt")["pixel_values"], black)
    kept, _ = blacken_raw_squares(image, 0.0, 28, torch.Generator().manual_seed(0))
    assert torch.equal(processor(images=[kept], return_tensors="pt")["pixel_values"], pv)


def test_mask_prompts_dispatches_on_space_with_key_seeded_generators():
    from types import SimpleNamespace

    from papo_engine.config import MaskConfig, ModelConfig
    from papo_engine.masking import mask_prompts
    from papo_engine.models import encode_prompts, load_tokenizer

    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=20000)
    images = [[Image.fromarray(_image(seed=11, h=56, w=56))], [Image.fromarray(_image(seed=12, h=61, w=47))]]
    prompts = encode_prompts(["a", "b"], images, load_tokenizer(ModelConfig()), processor)
    keys, seed = [5, 9], 3

    def gens():
        return [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in keys]

    grid, units = mask_prompts(MaskConfig(), prompts, keys, 2, seed, processor)
    want, _, want_units = mask_per_prompt(prompts.pixel_values, prompts.image_grid_thw, 2, 0.6, generator=gens(),
                                          images_per_prompt=[1, 1])
    assert torch.equal(grid, want) and torch.equal(units, want_units)
    raw, squares = mask_prompts(MaskConfig(space="raw"), prompts, keys, 2, seed, processor)
    want, _, want_squares = mask_raw_per_prompt(images, prompts.image_grid_thw, 2, 0.6, 14, processor, gens())
    assert torch.equal(raw, want) and torch.equal(squares, want_squares) and not torch.equal(raw, grid)
    with pytest.raises(ValueError, match="raw images"):
        mask_prompts(MaskConfig(space="raw"), SimpleNamespace(**{**prompts.__dict__, "images": None}), keys, 2,
                     seed, processor)


class _CountingProcessor:
    """A real processor that records how many images each call processes."""

    def __init__(self, processor):
        self.processor, self.calls = processor, []

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, images, **kwargs):
        self.calls.append(len(images))
        return self.processor(images=images, **kwargs)


@pytest.mark.parametrize("ratio", [0.0, 0.6, 1.0])
def test_raw_mask_in_the_originals_rows_equals_the_processor_pass(ratio):
    """RGB images the processor takes at their own size are masked in the original pixel_values (no second
    processor pass for them); the result is bit for bit the processor's on the masked images. Resized and
    non-RGB images in the same batch still go through the processor."""
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=20000)
    rgba = Image.fromarray(np.concatenate([_image(seed=20, h=56, w=56), np.full((56, 56, 1), 200, np.uint8)], 2),
                           mode="RGBA")
    images = [[Image.fromarray(_image(seed=21, h=56, w=56))],
              [Image.fromarray(_image(seed=22, h=84, w=112)), Image.fromarray(_image(seed=23, h=50, w=61))],
              [rgba], [Image.fromarray(_image(seed=24, h=112, w=56)), Image.fromarray(_image(seed=25, h=56, w=56))]]
    flat = [im for ims in images for im in ims]
    pv, thw = _process(processor, [np.array(im) for im in flat])

    def gens():
        return [torch.Generator().manual_seed(30 + k) for k in range(len(images))]

    want, want_thw, want_squares = mask_raw_per_prompt(images, thw, 2, ratio, 14, processor, gens())
    counting = _CountingProcessor(processor)
    got, got_thw, got_squares = mask_raw_per_prompt(images, thw, 2, ratio, 14, counting, gens(), pixel_values=pv)
    assert torch.equal(got, want) and torch.equal(got_thw, want_thw) and torch.equal(got_squares, want_squares)
    # four in place, the two 56x56 ones (prompts 0 and 3) in one operation (one all-black image per size: 56x56,
    # 84x112, 56x112), the resized and the RGBA one processed
    assert sorted(counting.calls) == [1, 1, 1, 2]
    if ratio == 0.6:
        assert want_squares.any() and not want_squares.all()
