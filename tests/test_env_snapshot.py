"""Snapshots: exact round trip, atomic replacement, refusal of corrupted or mismatched snapshots."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from verl_search_r3.env import CorpusIndex, EnvConfig, SnapshotError
from verl_search_r3.env.snapshot import atomic_directory, decode_strings, encode_strings


def _built(tmp_path=None, **cfg) -> CorpusIndex:
    rng = np.random.default_rng(0)
    ids = [f"doc-{i}" for i in range(300)] + ["ünï-cödé ✓"]
    index = CorpusIndex(EnvConfig(progress=False, graph_k=4, **cfg))
    index.add_texts(ids + ["text-only"], [f"text of {i}" for i in ids] + ["no vector yet"])
    index.upsert(ids, rng.standard_normal((len(ids), 16)).astype(np.float32), 0, update_graph=False)
    index.upsert(ids[:40], rng.standard_normal((40, 16)).astype(np.float32), 3, update_graph=False)
    index.neighbours(ids[:20])  # some graph rows
    index.remove(ids[100:110])
    return index


def _state(index: CorpusIndex, queries: np.ndarray) -> tuple:
    ids = index.doc_ids()
    return (ids, index.texts(ids), index.get(ids), index.search(queries, 7), index.neighbours(ids[:30]),
            index.staleness(5).to_dict())


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[1] == b[1] and a[4] == b[4] and a[5] == b[5]
    for x, y in zip(a[2], b[2]):
        np.testing.assert_array_equal(x, y)
    assert a[3][0] == b[3][0]
    np.testing.assert_array_equal(a[3][1], b[3][1])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_restores_everything(tmp_path, dtype):
    index = _built(dtype=dtype)
    queries = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    before = _state(index, queries)
    index.save(str(tmp_path / "snap"), meta={"step": 7})
    loaded = CorpusIndex.load(str(tmp_path / "snap"))
    assert loaded.config == index.config
    _assert_same(before, _state(loaded, queries))
    # writes continue with the saved keys: a new document and an update both work after load
    loaded.upsert(["fresh-doc", "doc-0"], np.ones((2, 16), np.float32), 6)
    assert loaded.get(["fresh-doc", "doc-0"])[1].tolist() == [6, 6]
    with open(tmp_path / "snap" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["meta"]["extra"] == {"step": 7} and manifest["format_version"] == 1
    assert all(name.endswith(".npy") for name in manifest["files"])


def test_strings_encoding_round_trip():
    strings = ["", "a", "ünï ✓", "x" * 1000]
    assert decode_strings(*encode_strings(strings)) == strings


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_snapshot(tmp_path):
    index = _built()
    path = str(tmp_path / "snap")
    index.save(path)
    index.upsert(["doc-1"], np.ones((1, 16), np.float32), 9)
    index.save(path)  # replaces the previous one
    assert CorpusIndex.load(path).get(["doc-1"])[1].tolist() == [9]
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(path) as tmp:
            open(os.path.join(tmp, "partial.npy"), "wb").close()
            raise RuntimeError("disk full")
    assert CorpusIndex.load(path).get(["doc-1"])[1].tolist() == [9]
    assert os.listdir(tmp_path) == ["snap"]  # no temporary directories left behind


@pytest.fixture()
def snapshot(tmp_path) -> str:
    path = str(tmp_path / "snap")
    _built().save(path)
    return path


def test_a_flipped_byte_is_refused_naming_the_file(snapshot):
    target = os.path.join(snapshot, "vectors.npy")
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) - 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SnapshotError, match="vectors.npy: checksum mismatch"):
        CorpusIndex.load(snapshot)


def test_truncated_missing_or_unreadable_files_are_refused(snapshot, tmp_path):
    versions = os.path.join(snapshot, "versions.npy")
    with open(versions, "r+b") as f:
        f.truncate(os.path.getsize(versions) - 8)
    with pytest.raises(SnapshotError, match="versions.npy: size"):
        CorpusIndex.load(snapshot)
    os.remove(versions)
    with pytest.raises(SnapshotError, match="versions.npy: file listed in the manifest is missing"):
        CorpusIndex.load(snapshot)
    with pytest.raises(SnapshotError, match="no snapshot manifest"):
        CorpusIndex.load(str(tmp_path))
    with open(os.path.join(snapshot, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(SnapshotError, match="manifest.json: corrupted manifest"):
        CorpusIndex.load(snapshot)


def test_other_format_versions_are_refused(snapshot):
    mpath = os.path.join(snapshot, "manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    manifest["format_version"] = 99
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(SnapshotError, match="format version 99"):
        CorpusIndex.load(snapshot)


@pytest.mark.parametrize("change,message", [
    ({"dim": 32}, "dim=16, this index needs dim=32"),
    ({"dtype": "float16"}, "dtype='float32', this index needs dtype='float16'"),
    ({"graph_k": 8}, "graph_k=4, this index needs graph_k=8"),
])
def test_mismatched_snapshots_are_refused(snapshot, change, message):
    index = CorpusIndex(EnvConfig(graph_k=4).replace(**change))
    with pytest.raises(SnapshotError, match=message):
        index.restore(snapshot)
    assert len(index) == 0  # nothing half-loaded


def test_meta_expectations_are_checked(tmp_path):
    path = str(tmp_path / "snap")
    _built().save(path, meta={"shard": 1, "num_shards": 2})
    with pytest.raises(SnapshotError, match="meta\\['shard'\\]=1, this index needs meta\\['shard'\\]=0"):
        CorpusIndex(EnvConfig(graph_k=4)).restore(path, expect_meta={"shard": 0, "num_shards": 2})
