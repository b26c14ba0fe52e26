"""Local-file datasets in the ViRL39K / EasyR1 schema (problem, answer, images) -> the same `Sample` objects as
the generated task, so the trainer can use either.

One public entry: `load_dataset_files(files, data_cfg, tokenizer, image_processor, split_name, prompt_limit)
-> LocalDataset`.

Files (concatenated in the order given): `.jsonl` / `.json` (JSON lines; a `.json` holding one JSON array is
accepted too), `.parquet`, or a folder written by `datasets.Dataset.save_to_disk`.  Columns are mapped with
`data.problem_key`, `data.answer_key`, `data.images_key`, `data.id_key`.

An image may be a path (relative paths resolve against the data file's folder), raw bytes, a
`{"bytes": ..., "path": ...}` dict (what `datasets.Image()` and Parquet exports hold), a PIL image, or a list of
any of these.  `<image>` placeholders are removed from the question (`chat_prompt` puts the images first); when
there are placeholders, their count must equal the number of images.

Bad records are skipped and counted by reason (see `data_sources.REASONS`), one WARNING line each plus a summary
line; with `data.strict=True` the first bad record raises ConfigError naming file, record id and reason.  A record
is named by its id and `file:N`, N counted from 1 (the line of a JSON-lines file, else the row).  A line that is
not UTF-8 is one bad record (`bad_encoding`), not a bad file.  Prompts longer than `prompt_limit` tokens (chat
template + expanded image tokens; `models.prompt_token_limit`: data.max_prompt_length, or when 0 the model's
maximum positions minus rollout.max_new_tokens) are dropped and counted as `prompt_too_long`, never truncated:
truncation would cut through image tokens and break the alignment between `<|image_pad|>` tokens and image
features.  That drop is a length filter, not a data error, so it is not an error under `strict` either (it is
still logged and counted).
"""
from __future__ import annotations

import io
import logging
import math
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .config import ConfigError
from .data import Sample
from .data_sources import REASONS, BadRecord, one_line, open_source
from .prompts import chat_prompt

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
# ----------------------------------------------------------------------------------------------------------
# images


def _is_pil(value) -> bool:
    return isinstance(value, Image.Image)


def _image_values(value) -> list:
    """The record's images column as a list of single-image values (no decoding)."""
    if value is None:
        raise BadRecord("no_image")
    if isinstance(value, (list, tuple)):
        if not value:
            raise BadRecord("no_image")
        items = list(value)
    else:
        items = [value]
    for item in items:
        if not (isinstance(item, (str, bytes, bytearray, memoryview, dict)) or _is_pil(item)):
            raise BadRecord("bad_images_type", f"image of type {type(item).__name__}")
    return items


def _open_image(value, base_dir: Path) -> tuple[Image.Image, bool]:
    """An opened (not yet loaded) image and whether this function owns it (and must close it)."""
    if _is_pil(value):
        return value, False
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadRecord("bad_images_type", f"'bytes' of type {type(data).__name__}")
        if path is not None and not isinstance(path, str):
            raise BadRecord("bad_images_type", f"'path' of type {type(path).__name__}")
        if data:
            value = data
        elif path:
            value = path
        else:
            raise BadRecord("no_image", "image dict with neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise BadRecord("corrupt_image", "empty bytes")
        try:
            return Image.open(io.BytesIO(bytes(value))), True
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise BadRecord("corrupt_image", f"bytes: {one_line(err)}") from None
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("no_image", "empty image path")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise BadRecord("missing_image_file", str(path))
        try:
            return Image.open(path), True
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise BadRecord("corrupt_image", f"{path}: {one_line(err)}") from None
    raise BadRecord("bad_images_type", f"image of type {type(value).__name__}")


def _probe_image(value, base_dir: Path) -> tuple[int, int]:
    """(width, height) of an image after checking it decodes completely — once, at load time, so counts are exact.

    JPEGs are decoded at 1/8 scale through `draft` (the DCT-domain reduction decodes every block, so truncated or
    corrupt data still fails, at a fraction of the cost); other formats are decoded in full and dropped at once.
    """
    image, owned = _open_image(value, base_dir)
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise BadRecord("corrupt_image", f"size {width}x{height}")
        if owned:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
        return width, height
    except BadRecord:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadRecord("corrupt_image", one_line(err)) from None
    finally:
        if owned:
            image.close()


# 16-bit greyscale as Pillow opens it ("I;16", big-endian "I;16B"; older Pillow versions give 32-bit "I")
HIGH_BIT_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _high_bit_grey_to_8bit(image: Image.Image) -> Image.Image:
    """8-bit "L" (or "LA" when a tRNS grey value marks transparent pixels), 0..65535 scaled to 0..255.

    Pillow's own convert clips these modes to 0..255 instead of scaling, so nearly every pixel of a 16-bit PNG
    would come out white.  Mode "I" is read in the same 16-bit range; values beyond it are clipped.
    """
    raw = np.asarray(image)
    grey = Image.fromarray(np.clip(np.rint(raw / 257.0), 0, 255).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        grey.putalpha(Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8)))
    return grey


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; 16-bit greyscale is scaled to 8 bits; transparency is composited onto white, as the HF image
    processors do."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_GREY_MODES:
        image = _high_bit_grey_to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class _Geometry:
    """The image processor's resize rule, used to size images up front and to count image tokens.

    Size policy: `Qwen2VLImageProcessorPil` already smart-resizes every image to multiples of patch*merge (28)
    with width*height in [min_pixels, max_pixels] (the processor is built from data.min_pixels / max_pixels).
    So nothing is upscaled here (that would only cost memory), and an image ABOVE max_pixels is downscaled at
    `__getitem__` to exactly the processor's own target size: memory stays bounded (JPEGs are even decoded at
    reduced scale), and the processor's smart-resize is then the identity, so the image is resampled once, not
    twice.  Token counts are computed from the size actually handed to the processor, so they are exact.
    """

    def __init__(self, image_processor):
        size = image_processor.size
        self.processor = image_processor
        self.min_pixels = int(size["shortest_edge"])
        self.max_pixels = int(size["longest_edge"])
        self.factor = int(image_processor.patch_size * image_processor.merge_size)
        self.merge = int(image_processor.merge_size) ** 2

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image `__getitem__` returns for a source image of this size."""
        if width * height <= self.max_pixels:
            return width, height
        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return w, h

    def image_tokens(self, width: int, height: int) -> int:
        """`<|image_pad|>` tokens for a source image of this size (grid_t*grid_h*grid_w / merge_size²)."""
        try:
            w, h = self.target_size(width, height)
            patches = self.processor.get_number_of_image_patches(h, w)
        except ValueError as err:  # aspect ratio > 200
            raise BadRecord("bad_image_size", f"{width}x{height}: {one_line(err)}") from None
        return int(patches) // self.merge

    def decode(self, value, base_dir: Path) -> Image.Image:
        """The RGB image, downscaled to the processor's target size when above max_pixels (see the class doc)."""
        image, owned = _open_image(value, base_dir)
        out = None
        try:
            width, height = image.size
            target = self.target_size(width, height)
            if owned and target != (width, height) and image.format == "JPEG":
                image.draft("RGB", target)  # decode at the smallest DCT scale still >= target: bounded memory
            image.load()
            out = _to_rgb(image)
            if out.size != target:
                out = out.resize(target, Image.Resampling.BICUBIC)
            elif out is image and (not owned or getattr(image, "n_frames", 1) > 1):
                # never hand out the caller's own object; a multi-frame file would keep its handle open
                out = image.copy()
            return out
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # changed since the load
            raise BadRecord("corrupt_image", f"{getattr(image, 'filename', '') or 'image bytes'}: "
                                             f"{one_line(err)}") from None
        finally:
            if owned and out is not image:
                image.close()


# ----------------------------------------------------------------------------------------------------------
# prompt length


def prompt_length(question: str, image_sizes: list[tuple[int, int]], tokenizer, image_processor) -> int:
    """Prompt tokens `encode_prompts([question], [images])` yields for images of these (width, height) sizes.

    No pixels are processed: image tokens come from the processor's grid for the size, and the text is tokenized
    with one `<|image_pad|>` per image.  That pad is a special (added) token, which the tokenizer splits out
    before BPE, so expanding it to k copies adds exactly k-1 tokens per image.
    """
    try:
        return _prompt_length(question, image_sizes, tokenizer, _Geometry(image_processor))
    except BadRecord as bad:
        raise ValueError(f"{bad.reason}: {bad.detail}") from None


def _prompt_length(question: str, image_sizes, tokenizer, geometry: _Geometry) -> int:
    text = chat_prompt(tokenizer, question, len(image_sizes))
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(text_ids) - len(image_sizes) + sum(geometry.image_tokens(w, h) for w, h in image_sizes)


def check_generated_prompts_fit(data_cfg, tokenizer, image_processor) -> None:
    """data.max_prompt_length on the generated task: its prompts are never dropped, so its longest must fit."""
    from .data import task_questions
    from .hint_task import TASK as HINT_TASK, hint_questions
    questions = hint_questions() if data_cfg.task == HINT_TASK else task_questions(data_cfg.task)
    size = (data_cfg.image_size, data_cfg.image_size)
    longest = max(prompt_length(q, [size], tokenizer, image_processor) for q in questions)
    if longest > data_cfg.max_prompt_length:
        raise ConfigError(f"data.max_prompt_length={data_cfg.max_prompt_length}: the generated task "
                          f"{data_cfg.task!r} at data.image_size={data_cfg.image_size} has prompts of up to "
                          f"{longest} tokens; raise it, or set 0 (automatic)")


# ----------------------------------------------------------------------------------------------------------
# record fields


def _clean_question(text: str) -> tuple[str, int]:
    """The question without `<image>` placeholders, and how many there were.

    Whitespace around a placeholder is dropped; where it held a line break, one line break is kept.
    """
    parts = text.split(IMAGE_PLACEHOLDER)
    out = parts[0]
    for part in parts[1:]:
        left, right = out.rstrip(), part.lstrip()
        gap = out[len(left):] + part[:len(part) - len(right)]
        sep = ("\n" if "\n" in gap else " ") if left and right else ""
        out = left + sep + right
    return out.strip(), len(parts) - 1


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def _question(record: dict, key: str) -> tuple[str, int]:
    value = record.get(key)
    if _is_missing(value):
        raise BadRecord("missing_problem", f"'{key}'")
    if not isinstance(value, str):
        raise BadRecord("bad_problem_type", f"'{key}' is {type(value).__name__}")
    question, placeholders = _clean_question(value)
    if not question:
        raise BadRecord("missing_problem", f"'{key}' holds only {IMAGE_PLACEHOLDER} placeholders")
    return question, placeholders


def _answer(record: dict, key: str) -> str:
    value = record.get(key)
    if _is_missing(value):
        raise BadRecord("missing_answer", f"'{key}'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRecord("bad_answer_type", f"'{key}' is {type(value).__name__}")
    return value.strip() if isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------------------------------------
# the dataset


@dataclass(frozen=True)
class _Entry:
    source: int
    row: int
    uid: str
    question: str
    answer: str


class LocalDataset:
    """Validated records of one or more local files; `dataset[i]` is a `Sample` (uid = record id, caption="").

    Memory: only the question, answer and id are kept per record; images are decoded lazily in `__getitem__`
    (from the file path, or from the encoded bytes in the Arrow table, which for `save_to_disk` folders is
    memory-mapped).  Every image was still decoded once at load time, so `loaded` and `skipped` are exact.
    Attributes: `loaded` (samples kept), `skipped` (reason -> count), `prompt_lengths[i]` (prompt tokens of
    sample i incl. image tokens, as `encode_prompts` produces for it alone).
    """

    def __init__(self, sources: list, entries: list[_Entry], prompt_lengths: array, skipped: dict[str, int],
                 geometry: _Geometry, split_name: str):
        self._sources, self._entries, self._geometry = sources, entries, geometry
        self.prompt_lengths = prompt_lengths
        self.skipped = skipped
        self.replaced: dict[str, int] = {}  # reason -> records whose images failed when drawn, after the load
        self.loaded = len(entries)
        self.split_name = split_name

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> Sample:
        """Sample `index`; if its images no longer read (a file deleted or changed since the load), the next
        record that reads is used in its place, counted in `replaced` and logged with the record and the file."""
        count = len(self._entries)
        if not -count <= index < count:
            raise IndexError(index)
        failed = None
        for offset in range(count):
            entry = self._entries[(index + offset) % count]
            source = self._sources[entry.source]
            try:
                images = [self._geometry.decode(v, source.base_dir) for v in _image_values(source.images(entry.row))]
            except BadRecord as bad:
                self.replaced[bad.reason] = self.replaced.get(bad.reason, 0) + 1
                failed = f"record {entry.uid} ({source.label}:{entry.row}): {bad.reason} ({bad.detail})"
                logger.warning("%s: %s since the load; the next record is used in its place (counted as "
                               "replaced)", self.split_name, failed)
                continue
            return Sample(images=images, question=entry.question, answer=entry.answer, uid=entry.uid)
        raise ConfigError(f"{self.split_name}: none of the {count} records' images can be read any more (the last: "
                          f"{failed}); were the data files moved or deleted during the run?")


def data_counts(dataset: LocalDataset) -> dict:
    """summary.json's account of a local dataset: records loaded, skipped at load by reason (every rank loads
    every file, so these are global) and, if any, replaced at use by reason, summed over ranks (collective)."""
    from . import distributed
    counts = {"loaded": len(dataset), "skipped": dict(dataset.skipped)}
    totals = distributed.all_reduce_sums([float(dataset.replaced.get(reason, 0)) for reason in REASONS])
    replaced = {reason: int(total) for reason, total in zip(REASONS, totals) if total}
    if replaced:
        counts["replaced"] = replaced
    return counts


def load_dataset_files(files: list[str], data_cfg, tokenizer, image_processor, split_name: str,
                       prompt_limit: int) -> LocalDataset:
    """Load, validate and concatenate `files` (in order) into a `LocalDataset`; see the module docstring.

    `prompt_limit`: the most prompt tokens (image tokens included) a kept sample may have —
    `models.prompt_token_limit(cfg)`, which resolves data.max_prompt_length=0 from the model's positions.
    """
    from . import distributed

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise ConfigError(f"{split_name}: no data files given")
    if prompt_limit < 1:
        raise ValueError(f"prompt_limit={prompt_limit}: must be >= 1")
    geometry = _Geometry(image_processor)
    sources, entries, lengths = [], [], array("l")
    skipped: dict[str, int] = {}
    show = distributed.is_main()

    for index, file in enumerate(files):
        source = open_source(file, data_cfg, split_name)
        sources.append(source)
        for row, record in tqdm(source.rows(), total=len(source), desc=f"loading {Path(str(file)).name}",
                                disable=not show, leave=False, dynamic_ncols=True):
            where = f"{source.label}:{row}"
            uid = where
            try:
                if isinstance(record, BadRecord):
                    raise record
                rid = record.get(data_cfg.id_key)
                if rid is not None and not _is_missing(rid):
                    uid = str(rid)
                question, placeholders = _question(record, data_cfg.problem_key)
                answer = _answer(record, data_cfg.answer_key)
                values = _image_values(record.get(data_cfg.images_key))
                if placeholders and placeholders != len(values):
                    raise BadRecord("image_placeholder_mismatch",
                                     f"{placeholders} {IMAGE_PLACEHOLDER} placeholders, {len(values)} images")
                sizes = [_probe_image(v, source.base_dir) for v in values]
                length = _prompt_length(question, sizes, tokenizer, geometry)
                if length > prompt_limit:
                    raise BadRecord("prompt_too_long", f"{length} tokens > limit {prompt_limit}")
            except BadRecord as bad:
                detail = f" ({bad.detail})" if bad.detail else ""
                name = f"record {uid}" if uid == where else f"record {uid} ({where})"
                if data_cfg.strict and bad.reason != "prompt_too_long":
                    raise ConfigError(f"data.strict=true: {name}: {bad.reason}{detail}") from None
                skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
                logger.warning("%s: skipped %s: %s%s", split_name, name, bad.reason, detail)
                continue
            source.keep(row, record)
            entries.append(_Entry(index, row, uid, question, answer))
            lengths.append(length)

    total_skipped = sum(skipped.values())
    by_reason = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items())) or "none"
    logger.log(logging.WARNING if total_skipped else logging.INFO,
               "%s: loaded %d samples from %d file(s), skipped %d (%s); prompt limit %d tokens", split_name,
               len(entries), len(files), total_skipped, by_reason, prompt_limit)
    if not entries:
        raise ConfigError(f"{split_name}: no usable records in {', '.join(map(str, files))} "
                          f"(skipped {total_skipped}: {by_reason})")
    return LocalDataset(sources, entries, lengths, skipped, geometry, split_name)
