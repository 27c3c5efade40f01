"""Streaming readers for text (JSON lines, TSV) and table (parquet, ``datasets`` folder) inputs.

Nothing here holds a whole file in memory: every reader is a generator of ``(place, record)``
where ``place`` is ``file:line`` or ``file:row N`` for messages. Text files are read as bytes and
decoded per line with ``surrogateescape``, so a line with bytes that are not UTF-8 is still
parsed and the check in :func:`text_field` can name the *field* that holds them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any, Literal

from tqdm.auto import tqdm

from .issues import DataFormatError, IssueLog, where

__all__ = [
    "TableKind",
    "iter_lines",
    "iter_jsonl",
    "iter_tsv",
    "iter_table",
    "iter_records",
    "text_field",
    "is_utf8",
    "sha256_path",
    "require_file",
    "open_parquet",
]

TableKind = Literal["jsonl", "parquet", "hf-disk"]

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"
_HASH_CHUNK = 1 << 20
_SNIFF_BYTES = 4096


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file, else a :class:`FileNotFoundError` naming ``what`` it should hold."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    return path


def is_utf8(s: str) -> bool:
    """Whether ``s`` encodes to UTF-8 (no lone surrogates from undecodable bytes or ``\\udcxx`` escapes)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_lines(path: str, progress: bool = False, desc: str | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` of a UTF-8 file; undecodable bytes become lone surrogates.

    A UTF-8 byte-order mark is dropped; a UTF-16 one is an error (the whole file is in the wrong
    encoding, not a few lines).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=desc or os.path.basename(path), disable=not progress, leave=False
    ) as bar:
        for n, raw in enumerate(f, 1):
            bar.update(len(raw))
            if n == 1:
                if raw.startswith(_UTF16_BOMS):
                    raise DataFormatError(f"{where(path, 1)}: the file is UTF-16 (byte-order mark); convert it to UTF-8")
                if b"\x00" in raw[:_SNIFF_BYTES]:
                    raise DataFormatError(f"{where(path, 1)}: the file holds NUL bytes: UTF-16 or UTF-32 without a byte-order "
                                          "mark, or not a text file; convert it to UTF-8")
                if raw.startswith(_UTF8_BOM):
                    raw = raw[len(_UTF8_BOM) :]
            yield n, raw.decode("utf-8", "surrogateescape").rstrip("\r\n")


def iter_jsonl(
    path: str, issues: IssueLog, progress: bool = False, desc: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(place, object)`` per non-blank line; lines that are not JSON objects are skipped."""
    for n, line in iter_lines(path, progress, desc):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            issues.skip("invalid_json", f"{where(path, n)}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(rec, dict):
            issues.skip("invalid_json", f"{where(path, n)}: expected a JSON object, got {type(rec).__name__}")
            continue
        yield where(path, n), rec


def iter_tsv(
    path: str,
    columns: tuple[str, ...],
    issues: IssueLog,
    sep: str | None = "\t",
    header: tuple[str, ...] | None = None,
    progress: bool = False,
    desc: str | None = None,
    skipped: dict[str, str] | None = None,
) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ``(place, {column: value})`` per non-blank line of a separated-values file.

    ``sep=None`` splits on any whitespace (TREC qrels). With ``sep`` given, the last column takes
    the rest of the line, so a stray separator inside a passage does not lose text. ``header``:
    the first line must name these columns (an error otherwise, as the file is not what we think).
    ``skipped`` (if given) receives ``first column value -> place`` of lines skipped for bytes that
    are not UTF-8 in another column, so a later message about that id can say where it went.
    """
    split = len(columns) - 1
    for n, line in iter_lines(path, progress, desc):
        if n == 1 and header is not None:
            got = tuple(h.strip() for h in line.split(sep)[: len(header)])
            if got != header:
                raise DataFormatError(f"{where(path, 1)}: expected header {' '.join(header)!r}, got {line!r}")
            continue
        if not line.strip():
            continue
        parts = line.split(sep, split) if sep is not None else line.split()
        place = where(path, n)
        if len(parts) < len(columns):
            issues.skip("missing_field", f"{place}: missing field {columns[len(parts)]!r} (expected {len(columns)} columns, got {len(parts)})")
            continue
        rec = dict(zip(columns, parts))
        bad = next((c for c in columns if not is_utf8(rec[c])), None)
        if bad is not None:
            issues.skip("bad_encoding", f"{place}: field {bad!r} is not valid UTF-8")
            if skipped is not None and bad != columns[0]:
                skipped.setdefault(rec[columns[0]], place)
            continue
        yield place, rec


def iter_table(
    path: str, kind: Literal["parquet", "hf-disk"], split: str | None, batch_rows: int, progress: bool = False
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(place, row)`` of a parquet file or a ``datasets`` folder, reading ``batch_rows`` at a time.

    For a folder holding a ``DatasetDict``, ``split`` picks the dataset (needed when it has several).
    """
    if kind == "parquet":
        require_file(path, "parquet")
        pf = open_parquet(path)
        total = pf.metadata.num_rows
        batches = (b.to_pylist() for b in _checked_batches(path, pf.iter_batches(batch_size=batch_rows)))
    elif kind == "hf-disk":
        import datasets

        if not os.path.isdir(path):
            raise FileNotFoundError(f"datasets folder {path!r} does not exist")
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, OSError) as e:  # no dataset_info.json, a corrupted arrow file, ...
            raise DataFormatError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            if split is None and len(names) == 1:
                split = names[0]
            if split not in ds:
                raise DataFormatError(f"{path}: no split {split!r} in the saved DatasetDict; it has {names} (use --split)")
            ds = ds[split]
        total = len(ds)
        batches = ([dict(zip(b, vals)) for vals in zip(*b.values())] for b in ds.iter(batch_size=batch_rows))
    else:
        raise ValueError(f"unknown table kind {kind!r}")
    n = 0
    with tqdm(total=total, unit="row", desc=os.path.basename(os.path.normpath(path)), disable=not progress, leave=False) as bar:
        for rows in batches:
            for row in rows:
                n += 1
                yield where(path, n, row=True), row
            bar.update(len(rows))


def open_parquet(path: str) -> Any:
    """``pyarrow.parquet.ParquetFile`` of ``path``; a file that is not parquet (truncated, another
    format under a .parquet name) is a :class:`DataFormatError` naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataFormatError(f"{path}: not a readable parquet file ({e})") from None


def _checked_batches(path: str, batches: Iterator[Any]) -> Iterator[Any]:
    """``batches`` with a corrupted page reported as a :class:`DataFormatError` naming the file."""
    import pyarrow as pa

    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise DataFormatError(f"{path}: corrupted parquet data ({e})") from None
        yield batch


def iter_records(
    path: str, kind: TableKind, issues: IssueLog, split: str | None = None, batch_rows: int = 10_000, progress: bool = False
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(place, record)`` of a JSON-lines file, a parquet file or a ``datasets`` folder."""
    if kind == "jsonl":
        yield from iter_jsonl(require_file(path, "JSON-lines"), issues, progress)
    else:
        yield from iter_table(path, kind, split, batch_rows, progress)


def text_field(
    rec: dict[str, Any], field: str, place: str, issues: IssueLog, is_id: bool = False, required: bool = True
) -> str | None:
    """The string in ``rec[field]``, or None after reporting why the row is skipped.

    Ids may be numbers (turned into strings) and must not be empty; a text may be null (read as
    ``""``; empty texts are judged by the caller, which knows whether e.g. a title can stand in).
    A field that is absent and not ``required`` reads as ``""``.
    """
    if field not in rec or (is_id and rec[field] is None):
        if not required and not is_id:
            return ""
        issues.skip("missing_field", f"{place}: missing field {field!r}")
        return None
    value = rec[field]
    if value is None:
        return ""
    if is_id and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        issues.skip("invalid_field", f"{place}: field {field!r} should be a string, got {type(value).__name__}")
        return None
    if not is_utf8(value):
        issues.skip("bad_encoding", f"{place}: field {field!r} is not valid UTF-8")
        return None
    if is_id and not value.strip():
        issues.skip("invalid_field", f"{place}: field {field!r} is an empty id")
        return None
    if is_id and ("\n" in value or "\r" in value):
        issues.skip("invalid_field", f"{place}: field {field!r} is an id with a line break: {value!r}")
        return None
    return value


def sha256_path(path: str) -> str:
    """Hex SHA-256 of a file, or of a folder (its files' relative paths and contents, sorted)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(
            os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names
        )
        for rel in files:
            h.update(rel.encode("utf-8") + b"\0" + sha256_path(os.path.join(path, rel)).encode("ascii"))
        return h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
