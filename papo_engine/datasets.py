"""Local-file datasets in the ViRL39K / EasyR1 schema (problem, answer, images) -> the same `Sample` objects as
the generated task, so the trainer can use either.

One public entry: `load_dataset_files(files, data_cfg, tokenizer, image_processor, split_name) -> LocalDataset`.

Files (concatenated in the order given): `.jsonl` / `.json` (JSON lines; a `.json` holding one JSON array is
accepted too), `.parquet`, or a folder written by `datasets.Dataset.save_to_disk`.  Columns are mapped with
`data.problem_key`, `data.answer_key`, `data.images_key`, `data.id_key`.

An image may be a path (relative paths resolve against the data file's folder), raw bytes, a
`{"bytes": ..., "path": ...}` dict (what `datasets.Image()` and Parquet exports hold), a PIL image, or a list of
any of these.  `<image>` placeholders are removed from the question (`chat_prompt` puts the images first); when
there are placeholders, their count must equal the number of images.

Bad records are skipped and counted by reason (see `REASONS`), one WARNING line each plus a summary line; with
`data.strict=True` the first bad record raises ConfigError naming file, record id and reason.  Prompts longer
than `data.max_prompt_length` (chat template + expanded image tokens) are dropped and counted as
`prompt_too_long`, never truncated: truncation would cut through image tokens and break the alignment between
`<|image_pad|>` tokens and image features.  That drop is a length filter, not a data error, so it is not an error
under `strict` either (it is still logged and counted).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image
from tqdm import tqdm
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .config import ConfigError
from .data import Sample
from .prompts import chat_prompt

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

REASONS = {
    "bad_json": "the line is not a JSON object",
    "missing_problem": "problem field missing or empty",
    "missing_answer": "answer field missing or empty",
    "bad_problem_type": "problem is not a string",
    "bad_answer_type": "answer is not a string or a number",
    "no_image": "images field missing or empty",
    "bad_images_type": "an image is not a path, bytes, {bytes, path} dict or PIL image",
    "missing_image_file": "an image file does not exist",
    "corrupt_image": "an image does not decode",
    "bad_image_size": "an image's aspect ratio is beyond what the image processor accepts (200:1)",
    "image_placeholder_mismatch": "the number of <image> placeholders differs from the number of images",
    "prompt_too_long": "prompt tokens (incl. image tokens) exceed data.max_prompt_length",
}


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------------------
# images


def _is_pil(value) -> bool:
    return isinstance(value, Image.Image)


def _image_values(value) -> list:
    """The record's images column as a list of single-image values (no decoding)."""
    if value is None:
        raise _BadRecord("no_image")
    if isinstance(value, (list, tuple)):
        if not value:
            raise _BadRecord("no_image")
        items = list(value)
    else:
        items = [value]
    for item in items:
        if not (isinstance(item, (str, bytes, bytearray, memoryview, dict)) or _is_pil(item)):
            raise _BadRecord("bad_images_type", f"image of type {type(item).__name__}")
    return items


def _open_image(value, base_dir: Path) -> tuple[Image.Image, bool]:
    """An opened (not yet loaded) image and whether this function owns it (and must close it)."""
    if _is_pil(value):
        return value, False
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise _BadRecord("bad_images_type", f"'bytes' of type {type(data).__name__}")
        if path is not None and not isinstance(path, str):
            raise _BadRecord("bad_images_type", f"'path' of type {type(path).__name__}")
        if data:
            value = data
        elif path:
            value = path
        else:
            raise _BadRecord("no_image", "image dict with neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise _BadRecord("corrupt_image", "empty bytes")
        try:
            return Image.open(io.BytesIO(bytes(value))), True
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _BadRecord("corrupt_image", f"bytes: {_one_line(err)}") from None
    if isinstance(value, str):
        if not value.strip():
            raise _BadRecord("no_image", "empty image path")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise _BadRecord("missing_image_file", str(path))
        try:
            return Image.open(path), True
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _BadRecord("corrupt_image", f"{path}: {_one_line(err)}") from None
    raise _BadRecord("bad_images_type", f"image of type {type(value).__name__}")


def _probe_image(value, base_dir: Path) -> tuple[int, int]:
    """(width, height) of an image after checking it decodes completely — once, at load time, so counts are exact.

    JPEGs are decoded at 1/8 scale through `draft` (the DCT-domain reduction decodes every block, so truncated or
    corrupt data still fails, at a fraction of the cost); other formats are decoded in full and dropped at once.
    """
    image, owned = _open_image(value, base_dir)
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise _BadRecord("corrupt_image", f"size {width}x{height}")
        if owned:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
        return width, height
    except _BadRecord:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _BadRecord("corrupt_image", _one_line(err)) from None
    finally:
        if owned:
            image.close()


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency is composited onto white, as the HF image processors do."""
    if image.mode == "RGB":
        return image
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
            raise _BadRecord("bad_image_size", f"{width}x{height}: {_one_line(err)}") from None
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
    except _BadRecord as bad:
        raise ValueError(f"{bad.reason}: {bad.detail}") from None


def _prompt_length(question: str, image_sizes, tokenizer, geometry: _Geometry) -> int:
    text_ids = tokenizer(chat_prompt(question, len(image_sizes)), add_special_tokens=False)["input_ids"]
    return len(text_ids) - len(image_sizes) + sum(geometry.image_tokens(w, h) for w, h in image_sizes)


# ----------------------------------------------------------------------------------------------------------
# record fields


def _one_line(err) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


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
        raise _BadRecord("missing_problem", f"'{key}'")
    if not isinstance(value, str):
        raise _BadRecord("bad_problem_type", f"'{key}' is {type(value).__name__}")
    question, placeholders = _clean_question(value)
    if not question:
        raise _BadRecord("missing_problem", f"'{key}' holds only {IMAGE_PLACEHOLDER} placeholders")
    return question, placeholders


def _answer(record: dict, key: str) -> str:
    value = record.get(key)
    if _is_missing(value):
        raise _BadRecord("missing_answer", f"'{key}'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRecord("bad_answer_type", f"'{key}' is {type(value).__name__}")
    return value.strip() if isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------------------------------------
# sources: one per file, each yields (row, record dict or _BadRecord) and gives a row's images column again


class _JsonSource:
    """JSON lines (or one JSON array).  Only the mapped fields are kept; image values here are paths, so small."""

    def __init__(self, path: Path, label: str, images_key: str):
        self.path, self.label, self.base_dir, self.images_key = path, label, path.parent, images_key
        self._images: dict[int, Any] = {}
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"data file {label!r}: not UTF-8 text ({_one_line(err)})") from None
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{label}: not valid JSON ({_one_line(err)})") from None
            self._rows, self._parsed = list(enumerate(rows)) if isinstance(rows, list) else [(0, rows)], True
        else:
            self._rows = [(i, line) for i, line in enumerate(text.splitlines()) if line.strip()]
            self._parsed = False

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> Iterator[tuple[int, dict | _BadRecord]]:
        for row, raw in self._rows:
            if not self._parsed:
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as err:
                    yield row, _BadRecord("bad_json", _one_line(err))
                    continue
            if not isinstance(raw, dict):
                yield row, _BadRecord("bad_json", f"a JSON {type(raw).__name__}, not an object")
                continue
            yield row, raw
        self._rows = []  # parsed once; only the kept rows' image values remain (`keep`)

    def keep(self, row: int, record: dict) -> None:
        self._images[row] = record.get(self.images_key)

    def images(self, row: int):
        return self._images[row]


class _ArrowSource:
    """A Parquet file or a `save_to_disk` folder as an Arrow table (memory-mapped for `save_to_disk`).

    Images stay in the table as encoded bytes and are fetched per row when a sample is requested.
    """

    def __init__(self, table, path: Path, label: str, data_cfg):
        self.table, self.label = table, label
        self.base_dir = path if path.is_dir() else path.parent
        names = set(table.column_names)
        for what, key in (("problem_key", data_cfg.problem_key), ("answer_key", data_cfg.answer_key),
                          ("images_key", data_cfg.images_key)):
            if key not in names:
                raise ConfigError(f"data.{what}={key!r}: no such column in {label} "
                                  f"(columns: {', '.join(table.column_names)})")
        wanted = [k for k in (data_cfg.problem_key, data_cfg.answer_key, data_cfg.images_key, data_cfg.id_key)
                  if k in names]
        self.table = table.select(list(dict.fromkeys(wanted)))
        self._images_column = self.table.column(data_cfg.images_key)

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self) -> Iterator[tuple[int, dict | _BadRecord]]:
        row = 0
        for batch in self.table.to_batches(max_chunksize=64):
            for record in batch.to_pylist():
                yield row, record
                row += 1

    def keep(self, row: int, record: dict) -> None:
        pass

    def images(self, row: int):
        return self._images_column[row].as_py()


def _open_source(file, data_cfg, split_name: str):
    label = str(file)
    path = Path(file).expanduser()
    if not path.exists():
        raise ConfigError(f"data file {label!r} does not exist")
    if path.is_dir():
        import datasets
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise ConfigError(f"data folder {label!r}: not a datasets.save_to_disk folder ({_one_line(err)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split_name in loaded:
                loaded = loaded[split_name]
            elif len(loaded) == 1:
                loaded = next(iter(loaded.values()))
            else:
                raise ConfigError(f"data folder {label!r}: a DatasetDict with splits {', '.join(loaded)} and none "
                                  f"named {split_name!r}; give the split's folder instead")
        return _ArrowSource(loaded.with_format("arrow")[:], path, label, data_cfg)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _JsonSource(path, label, data_cfg.images_key)
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path, memory_map=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data file {label!r}: not a readable Parquet file ({_one_line(err)})") from None
        return _ArrowSource(table, path, label, data_cfg)
    raise ConfigError(f"data file {label!r}: unknown type {suffix or '(no extension)'!r} (expected .jsonl, .json, "
                      f".parquet, or a datasets.save_to_disk folder)")


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
        self.loaded = len(entries)
        self.split_name = split_name

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self._entries) <= index < len(self._entries):
            raise IndexError(index)
        entry = self._entries[index]
        source = self._sources[entry.source]
        images = [self._geometry.decode(v, source.base_dir) for v in _image_values(source.images(entry.row))]
        return Sample(images=images, question=entry.question, answer=entry.answer, uid=entry.uid)


def load_dataset_files(files: list[str], data_cfg, tokenizer, image_processor, split_name: str) -> LocalDataset:
    """Load, validate and concatenate `files` (in order) into a `LocalDataset`; see the module docstring."""
    from . import distributed

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise ConfigError(f"{split_name}: no data files given")
    geometry = _Geometry(image_processor)
    limit = int(data_cfg.max_prompt_length)
    sources, entries, lengths = [], [], array("l")
    skipped: dict[str, int] = {}
    show = distributed.is_main()

    for index, file in enumerate(files):
        source = _open_source(file, data_cfg, split_name)
        sources.append(source)
        for row, record in tqdm(source.rows(), total=len(source), desc=f"loading {Path(str(file)).name}",
                                disable=not show, leave=False, dynamic_ncols=True):
            uid = f"{source.label}:{row}"
            try:
                if isinstance(record, _BadRecord):
                    raise record
                rid = record.get(data_cfg.id_key)
                if rid is not None and not _is_missing(rid):
                    uid = str(rid)
                question, placeholders = _question(record, data_cfg.problem_key)
                answer = _answer(record, data_cfg.answer_key)
                values = _image_values(record.get(data_cfg.images_key))
                if placeholders and placeholders != len(values):
                    raise _BadRecord("image_placeholder_mismatch",
                                     f"{placeholders} {IMAGE_PLACEHOLDER} placeholders, {len(values)} images")
                sizes = [_probe_image(v, source.base_dir) for v in values]
                length = _prompt_length(question, sizes, tokenizer, geometry)
                if limit and length > limit:
                    raise _BadRecord("prompt_too_long", f"{length} tokens > data.max_prompt_length={limit}")
            except _BadRecord as bad:
                detail = f" ({bad.detail})" if bad.detail else ""
                if data_cfg.strict and bad.reason != "prompt_too_long":
                    raise ConfigError(f"data.strict=true: {source.label}: record {uid}: {bad.reason}{detail}") from None
                skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
                logger.warning("%s: skipped record %s in %s: %s%s", split_name, uid, source.label, bad.reason, detail)
                continue
            source.keep(row, record)
            entries.append(_Entry(index, row, uid, question, answer))
            lengths.append(length)

    total_skipped = sum(skipped.values())
    by_reason = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items())) or "none"
    logger.log(logging.WARNING if total_skipped else logging.INFO,
               "%s: loaded %d samples from %d file(s), skipped %d (%s)", split_name, len(entries), len(files),
               total_skipped, by_reason)
    if not entries:
        raise ConfigError(f"{split_name}: no usable records in {', '.join(map(str, files))} "
                          f"(skipped {total_skipped}: {by_reason})")
    return LocalDataset(sources, entries, lengths, skipped, geometry, split_name)
