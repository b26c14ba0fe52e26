"""Local data files -> rows: JSON lines / a JSON array, Parquet, `datasets.save_to_disk` folders.

`open_source(file, data_cfg, split_name)` gives a source whose `rows()` yields (row number, record dict or
`BadRecord`); row numbers count from 1 (the line of a JSON-lines file, else the row or array element).  A record
that cannot be used is a `BadRecord` with one of the `REASONS`; `datasets.py` counts and logs them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .config import ConfigError

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

REASONS = {
    "bad_json": "the line is not a JSON object",
    "bad_encoding": "the line is not UTF-8 text",
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
    "prompt_too_long": "prompt tokens (incl. image tokens) exceed the prompt limit (data.max_prompt_length; "
                       "0 = the model's maximum positions minus rollout.max_new_tokens)",
}


class BadRecord(Exception):
    """A record skipped for one of the REASONS; `detail` says what exactly."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def one_line(err) -> str:
    """An exception's text on one line, at most 200 characters."""
    return " ".join(str(err).split())[:200] or type(err).__name__


# ----------------------------------------------------------------------------------------------------------
# sources: one per file, each yields (row, record dict or BadRecord) and gives a row's images column again


class JsonSource:
    """JSON lines (or one JSON array).  Only the mapped fields are kept; image values here are paths, so small.

    Rows are numbered from 1: the line number for JSON lines (blank lines count, as in an editor), the element
    number for an array.  Each line is decoded on its own, so a line that is not UTF-8 is one bad record.
    """

    def __init__(self, path: Path, label: str, images_key: str):
        self.path, self.label, self.base_dir, self.images_key = path, label, path.parent, images_key
        self._images: dict[int, Any] = {}
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not JSON
        if path.suffix == ".json" and data.lstrip().startswith(b"["):
            try:
                rows = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as err:
                line = data[:err.start].count(b"\n") + 1
                column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
                raise ConfigError(f"data file {label!r}: not UTF-8 text (line {line}, byte {column}: "
                                  f"{err.reason})") from None
            except json.JSONDecodeError as err:
                raise ConfigError(f"data file {label!r}: not valid JSON ({err.msg} at line {err.lineno}, "
                                  f"column {err.colno})") from None
            self._rows = list(enumerate(rows, 1)) if isinstance(rows, list) else [(1, rows)]
            self._parsed = True
        else:
            # split on "\n" only: str.splitlines would also split inside JSON strings holding U+2028 and friends
            self._rows = [(i, line) for i, line in enumerate(data.split(b"\n"), 1) if line.strip()]
            self._parsed = False

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> Iterator[tuple[int, dict | BadRecord]]:
        for row, raw in self._rows:
            if not self._parsed:
                try:
                    raw = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    yield row, BadRecord("bad_encoding", f"byte {err.start + 1} of the line: {err.reason}")
                    continue
                except json.JSONDecodeError as err:
                    yield row, BadRecord("bad_json", f"{err.msg} at column {err.colno}")
                    continue
            if not isinstance(raw, dict):
                yield row, BadRecord("bad_json", f"a JSON {type(raw).__name__}, not an object")
                continue
            yield row, raw
        self._rows = []  # parsed once; only the kept rows' image values remain (`keep`)

    def keep(self, row: int, record: dict) -> None:
        self._images[row] = record.get(self.images_key)

    def images(self, row: int):
        return self._images[row]


class ArrowSource:
    """A Parquet file or a `save_to_disk` folder as an Arrow table (memory-mapped for `save_to_disk`).

    Images stay in the table as encoded bytes and are fetched per row when a sample is requested.  Rows are
    numbered from 1, like the lines of a JSON-lines file.
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

    def rows(self) -> Iterator[tuple[int, dict | BadRecord]]:
        row = 1
        for batch in self.table.to_batches(max_chunksize=64):
            for record in batch.to_pylist():
                yield row, record
                row += 1

    def keep(self, row: int, record: dict) -> None:
        pass

    def images(self, row: int):
        return self._images_column[row - 1].as_py()


def open_source(file, data_cfg, split_name: str):
    label = str(file)
    path = Path(file).expanduser()
    if not path.exists():
        raise ConfigError(f"data file {label!r} does not exist")
    if path.is_dir():
        import datasets
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise ConfigError(f"data folder {label!r}: not a datasets.save_to_disk folder ({one_line(err)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split_name in loaded:
                loaded = loaded[split_name]
            elif len(loaded) == 1:
                loaded = next(iter(loaded.values()))
            else:
                raise ConfigError(f"data folder {label!r}: a DatasetDict with splits {', '.join(loaded)} and none "
                                  f"named {split_name!r}; give the split's folder instead")
        return ArrowSource(loaded.with_format("arrow")[:], path, label, data_cfg)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return JsonSource(path, label, data_cfg.images_key)
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path, memory_map=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data file {label!r}: not a readable Parquet file ({one_line(err)})") from None
        return ArrowSource(table, path, label, data_cfg)
    raise ConfigError(f"data file {label!r}: unknown type {suffix or '(no extension)'!r} (expected .jsonl, .json, "
                      f".parquet, or a datasets.save_to_disk folder)")
