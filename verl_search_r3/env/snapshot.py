"""Pickle-free snapshots: a directory of ``.npy`` arrays plus ``manifest.json``.

The manifest records the format name and version, free-form metadata, and per file its
SHA-256, byte size, dtype and shape. Strings (document ids, texts) are stored as one UTF-8
byte blob plus int64 offsets. A snapshot is written into a temporary sibling directory and
renamed into place, so a crash never leaves a half-written snapshot under the final name; an
existing snapshot at that path is replaced only after the new one is complete.

:func:`read_snapshot` refuses — with :class:`SnapshotError` naming the file — a missing or
unparsable manifest, an unknown format or version, a missing file, a size/checksum mismatch,
or an array whose dtype or shape differs from the manifest. ``np.load`` always runs with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..atomic import atomic_write_text, remove_stale_siblings, temp_sibling

__all__ = [
    "SnapshotError",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_FORMAT_VERSION",
    "MANIFEST",
    "atomic_directory",
    "write_snapshot",
    "write_snapshot_files",
    "read_snapshot",
    "read_manifest",
    "encode_strings",
    "decode_strings",
]

SNAPSHOT_FORMAT = "verl_search_r3.env.snapshot"
SNAPSHOT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_HASH_BLOCK = 1 << 22
_FILE_KEYS = ("sha256", "bytes", "dtype", "shape")


class SnapshotError(ValueError):
    """A snapshot that cannot be trusted or does not fit; the message names the file."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``.

    On an exception (SIGTERM under :func:`~verl_search_r3.atomic.sigterm_as_interrupt`
    included) the temporary directory is deleted and ``path`` is left untouched. Temporary
    directories of ``path`` left by a killed process of this machine are removed first (see
    :func:`~verl_search_r3.atomic.remove_stale_siblings`).
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_siblings(path)
    tmp = temp_sibling(path)
    os.makedirs(tmp)
    try:
        yield tmp
        _fsync_dir(tmp)
        old = None
        if os.path.exists(path):
            old = temp_sibling(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def encode_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(blob uint8, offsets int64 (n+1,))`` holding ``strings`` as UTF-8."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Inverse of :func:`encode_strings`."""
    data = blob.tobytes()
    bounds = offsets.tolist()
    return [data[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]


def write_snapshot(path: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Atomically write ``arrays`` (name -> array, saved as ``<name>.npy``) and ``meta`` to ``path``."""
    with atomic_directory(path) as tmp:
        write_snapshot_files(tmp, arrays, meta)


def write_snapshot_files(folder: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write the arrays and the manifest into an existing (temporary) directory, manifest last."""
    files = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype == object:
            raise TypeError(f"snapshot array {name!r} has dtype object; encode strings with encode_strings")
        fname = f"{name}.npy"
        fpath = os.path.join(folder, fname)
        with open(fpath, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        files[fname] = {"sha256": _sha256(fpath), "bytes": os.path.getsize(fpath),
                        "dtype": array.dtype.str, "shape": list(array.shape)}
    manifest = {"format": SNAPSHOT_FORMAT, "format_version": SNAPSHOT_FORMAT_VERSION, "meta": meta, "files": files}
    atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(path: str) -> dict[str, Any]:
    """The parsed and format-checked manifest of the snapshot at ``path``."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise SnapshotError(f"{mpath}: no snapshot manifest (not a snapshot directory, or an incomplete one)")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{mpath}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{mpath}: not a {SNAPSHOT_FORMAT} manifest")
    if manifest.get("format_version") != SNAPSHOT_FORMAT_VERSION:
        raise SnapshotError(
            f"{mpath}: snapshot format version {manifest.get('format_version')!r}, this code reads {SNAPSHOT_FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("meta"), dict):
        raise SnapshotError(f"{mpath}: manifest lacks 'files' or 'meta'")
    return manifest


def read_snapshot(path: str, verify: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load and check a snapshot written by :func:`write_snapshot`; returns ``(arrays, meta)``.

    Args:
        path: the snapshot directory.
        verify: also check each file's SHA-256 (size, dtype and shape are always checked).
    """
    manifest = read_manifest(path)
    arrays = {}
    for fname, info in manifest["files"].items():
        fpath = os.path.join(path, fname)
        lacking = [k for k in _FILE_KEYS if not isinstance(info, dict) or k not in info]
        if lacking:
            raise SnapshotError(f"{os.path.join(path, MANIFEST)}: the entry of {fname!r} lacks {lacking}")
        if not os.path.isfile(fpath):
            raise SnapshotError(f"{fpath}: file listed in the manifest is missing")
        if os.path.getsize(fpath) != info["bytes"]:
            raise SnapshotError(f"{fpath}: size {os.path.getsize(fpath)} bytes, the manifest says {info['bytes']}")
        if verify and _sha256(fpath) != info["sha256"]:
            raise SnapshotError(f"{fpath}: checksum mismatch (the file is corrupted)")
        try:
            array = np.load(fpath, allow_pickle=False)
        except ValueError as e:
            raise SnapshotError(f"{fpath}: unreadable array ({e})") from None
        if array.dtype.str != info["dtype"] or list(array.shape) != info["shape"]:
            raise SnapshotError(
                f"{fpath}: array {array.dtype.str}{list(array.shape)} does not match the manifest {info['dtype']}{info['shape']}"
            )
        arrays[fname[: -len(".npy")]] = array
    return arrays, manifest["meta"]
