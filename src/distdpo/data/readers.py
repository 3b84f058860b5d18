"""Reading preference records from files and Hugging Face datasets: each record with its location (file:line).

A record that cannot be read (invalid JSON, bytes that are not UTF-8) comes out as
a :class:`Malformed` in its place, so the loader can raise it with the location
or skip and count it; a file that cannot be read at all raises
:class:`DataFormatError`.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataFormatError(ValueError):
    """A record or file that cannot be read as preference data; the message names file and line."""


class Malformed(Exception):
    """A record that cannot be used; turned into DataFormatError (or a skip) with the record's location."""


_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")
_TABLE_SUFFIXES = (".parquet", ".csv")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataFormatError(f"{path}: cannot read the file ({e})") from None


def _not_utf8(raw: bytes, e: UnicodeDecodeError) -> str:
    col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {col} (save the file as UTF-8)"


def _read_json_file(path: Path) -> Iterator[tuple[str, Any]]:
    raw = _read_bytes(path)
    start = len(raw) - len(raw.lstrip())
    # only .json may hold one top-level list; a .jsonl line that is a list is a malformed record
    if raw[start : start + 1] == b"[" and path.name.lower().endswith((".json", ".json.gz")):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # one JSON document: no record to skip, the file is refused
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataFormatError(f"{path}:{line}: {_not_utf8(raw, e)}") from None
        yield from _read_json_list(path, text, len(text) - len(text.lstrip()))
        return
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield f"{path}:{lineno}", Malformed(_not_utf8(line, e))
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", Malformed(f"invalid JSON: {e.msg} (column {e.colno})")


def _read_json_list(path: Path, text: str, start: int) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON list, each with the line it starts on.

    A syntax error inside a list cannot be resynchronised, so it is always raised.
    """
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, msg: str) -> DataFormatError:
        return DataFormatError(f"{path}:{text.count(chr(10), 0, p) + 1}: invalid JSON: {msg}")

    pos = skip_ws(pos)
    if text[pos : pos + 1] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        yield f"{path}:{line}", obj
        pos = skip_ws(end)
        sep = text[pos : pos + 1]
        if sep == "]":
            if text[skip_ws(pos + 1) :].strip():
                raise fail(pos + 1, "extra data after the closing ']'")
            return
        if sep != ",":
            raise fail(pos, "expected ',' or ']' between list elements")
        pos = skip_ws(pos + 1)


def _rows_with_location(rows: Iterator[dict], where: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows, 1):
        yield f"{where}: row {i}", row


def _read_table(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        if path.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()  # nested message lists stay Python lists
        else:
            import pandas as pd

            # keep "" as "" (an empty response), not NaN
            rows = pd.read_csv(path, keep_default_na=False, encoding="utf-8").to_dict("records")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except (ValueError, OSError) as e:  # pyarrow's and pandas' parse errors are ValueError subclasses
        raise DataFormatError(f"{path}: cannot read the table ({type(e).__name__}: {e})") from None
    return _rows_with_location(iter(rows), str(path))


def _read_hub(source: str, split: str | None, max_records: int | None) -> Iterator[tuple[str, Any]]:
    import datasets

    from distdpo.hub import check_hub_id, offline

    split = split or "train"
    folder = Path(source).is_dir()
    if not folder and not offline():
        check_hub_id("data.source", source, "dataset")  # one quick request: no minute of retries when offline
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many kinds for a folder or id it cannot read
        if folder:
            raise DataFormatError(
                f"{source} is a directory that `datasets` cannot load ({type(e).__name__}: {e}); "
                "give a preference file (.jsonl, .json, .parquet, .csv) or a dataset folder"
            ) from None
        if offline():
            check_hub_id("data.source", source, "dataset")  # says why: offline and not in the local cache
        raise DataFormatError(
            f"{source}[{split}]: cannot load from the Hugging Face hub ({type(e).__name__}: {e})"
        ) from None
    if max_records is not None and max_records < len(ds):
        ds = ds.select(range(max_records))
    return _rows_with_location(iter(ds), f"{source}[{split}]")


def records(source: str | os.PathLike, split: str | None, max_records: int | None) -> Iterator[tuple[str, Any]]:
    path = Path(source)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(_JSON_SUFFIXES):
            return _read_json_file(path)
        if name.endswith(_TABLE_SUFFIXES):
            return _read_table(path)
        raise DataFormatError(
            f"{path}: unsupported file type; expected one of {', '.join(_JSON_SUFFIXES + _TABLE_SUFFIXES)}"
        )
    if not path.exists() and path.name.lower().endswith(_JSON_SUFFIXES + _TABLE_SUFFIXES):
        raise FileNotFoundError(f"{path}: no such file")  # a typo'd path, not a hub id
    # not a file: a Hugging Face dataset id, or a local dataset folder load_dataset understands
    return _read_hub(os.fspath(source), split, max_records)


__all__ = ["DataFormatError", "Malformed", "records"]
