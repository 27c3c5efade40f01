"""CorpusIndex core: exact search against brute force, ANN recall, versions, staleness, graph."""

from __future__ import annotations

import numpy as np
import pytest

from verl_search_r3.env import CorpusIndex, EnvConfig, StalenessStats


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(n: int = 3000, d: int = 24, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"doc-{i}" for i in range(n)], rng.standard_normal((n, d)).astype(np.float32)


def _clustered(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Embedding-like data: cluster centres plus noise (IVF is pointless on isotropic noise)."""
    return (centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, centres.shape[1]))).astype(np.float32)


def _brute_force(queries: np.ndarray, vecs: np.ndarray, ids: list[str], k: int,
                 normalize_docs: bool = True) -> tuple[list[list[str]], np.ndarray]:
    scores = _unit(queries) @ (_unit(vecs) if normalize_docs else vecs).T
    order = np.argsort(-scores, axis=1)[:, :k]
    return [[ids[j] for j in row] for row in order], np.take_along_axis(scores, order, axis=1)


def _index(ids, vecs, version=0, **cfg) -> CorpusIndex:
    index = CorpusIndex(EnvConfig(progress=False, **cfg))
    index.upsert(ids, vecs, version, update_graph=False)
    return index


def test_flat_search_equals_brute_force():
    ids, vecs = _data()
    queries = np.random.default_rng(1).standard_normal((37, vecs.shape[1])).astype(np.float32)
    got_ids, got_scores = _index(ids, vecs).search(queries, 15)
    want_ids, want_scores = _brute_force(queries, vecs, ids, 15)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-5)


def test_float16_storage_search_is_exact_on_the_rounded_vectors():
    ids, vecs = _data(n=2500)
    index = _index(ids, vecs, dtype="float16", search_chunk_rows=700)  # several chunks merged
    stored, _, found = index.get(ids)
    assert found.all()
    np.testing.assert_array_equal(stored, _unit(vecs).astype(np.float16).astype(np.float32))
    queries = np.random.default_rng(2).standard_normal((20, vecs.shape[1])).astype(np.float32)
    got_ids, got_scores = index.search(queries, 10)
    want_ids, want_scores = _brute_force(queries, stored, ids, 10, normalize_docs=False)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


def test_search_pads_when_k_exceeds_the_corpus():
    ids, vecs = _data(n=5)
    got_ids, scores = _index(ids, vecs).search(vecs[:2], 8)
    assert [len(r) for r in got_ids] == [5, 5]
    assert got_ids[0][0] == ids[0]
    assert np.isinf(scores[:, 5:]).all() and np.isfinite(scores[:, :5]).all()


@pytest.mark.parametrize("index_type,extra,min_recall", [
    ("ivf", {"ivf_nlist": 32, "ivf_nprobe": 8}, 0.9),
    ("hnsw", {"hnsw_m": 16}, 0.97),
    ("hnsw", {"hnsw_m": 16, "dtype": "float16"}, 0.97),
])
def test_approximate_indexes_recall_and_stay_correct_after_updates(index_type, extra, min_recall):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 24))
    ids, vecs = [f"doc-{i}" for i in range(4000)], _clustered(4000, centres, rng)
    index = _index(ids, vecs, index_type=index_type, ann_rebuild_fraction=0.5, **extra)
    queries = _clustered(100, centres, rng)

    def recall() -> float:
        stored, _, _ = index.get(index_ids)
        got, _ = index.search(queries, 10)
        want, _ = _brute_force(queries, stored, index_ids, 10)
        return np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])

    index_ids = list(ids)
    assert recall() >= min_recall
    structure = index._store._backend.index  # the FAISS object, to see when it is rebuilt
    # replace 30% of the vectors and delete 10% of the docs (no rebuild yet): the structure follows
    index.upsert(ids[:1200], _clustered(1200, centres, rng), 1, update_graph=False)
    index.remove(ids[-400:])
    index_ids = ids[:-400]
    assert recall() >= min_recall
    got, _ = index.search(queries, 10)
    assert not set(ids[-400:]) & {d for row in got for d in row}
    assert index._store._backend.index is structure  # 1600 changes < 0.5 * 4000: updated in place
    # the policy drifts to a new geometry: once over half the vectors changed, the index is
    # rebuilt from the drifted vectors (IVF retrains), so recall holds on the new distribution
    centres = rng.standard_normal((40, 24))
    index.upsert(index_ids, _clustered(len(index_ids), centres, rng), 2, update_graph=False)
    queries = _clustered(100, centres, rng)
    assert recall() >= min_recall
    rebuilt = index._store._backend.index
    assert rebuilt is not structure and rebuilt.ntotal == len(index_ids)  # no tombstones left


def test_versions_get_and_staleness_bookkeeping():
    ids, vecs = _data(n=10)
    index = _index(ids[:6], vecs[:6], version=0)
    index.upsert(ids[2:4], vecs[2:4] * 2, version=3, update_graph=False)
    index.upsert(ids[6:8], vecs[6:8], version=5, update_graph=False)
    got, versions, found = index.get(ids[:9] + ["nope"])
    assert versions.tolist() == [0, 0, 3, 3, 0, 0, 5, 5, -1, -1]
    assert found.tolist() == [True] * 8 + [False, False]
    np.testing.assert_allclose(got[2], _unit(vecs[2:3])[0], atol=1e-6)  # normalised on upsert
    assert not got[8].any()
    stats = index.staleness(6, tolerance=1)
    assert stats.age_counts == {1: 2, 3: 2, 6: 4}
    assert (stats.n_vectors, stats.n_stale) == (8, 6)
    assert stats.fraction_stale == pytest.approx(6 / 8)
    assert stats.mean_age == pytest.approx((2 + 6 + 24) / 8)
    assert stats.max_age == 6
    merged = StalenessStats.merge([stats, index.staleness(6, tolerance=1)])
    assert merged.age_counts == {1: 4, 3: 4, 6: 8} and merged.n_stale == 12
    assert index.remove(ids[2:3] + ["nope"]) == 1
    assert not index.get(ids[2:3])[2][0]
    assert index.staleness(6, tolerance=1).n_vectors == 7


def test_upsert_rejects_bad_input():
    ids, vecs = _data(n=4)
    index = _index(ids, vecs)
    with pytest.raises(ValueError, match="dimension"):
        index.upsert(["x"], np.ones((1, vecs.shape[1] + 1), np.float32), 1)
    with pytest.raises(ValueError, match="duplicates"):
        index.upsert(["x", "x"], vecs[:2], 1)
    with pytest.raises(ValueError, match="NaN"):
        index.upsert(["x"], np.full((1, vecs.shape[1]), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="shape"):
        index.upsert(["x", "y"], vecs[:1], 1)
    with pytest.raises(KeyError, match="no text"):
        index.texts(["doc-0"])
    with pytest.raises(ValueError, match=r"unknown search_r3\.env keys \[.candidates.\]"):
        EnvConfig.from_dict({"candidates": 3})


def test_config_from_hydra_dict():
    from omegaconf import OmegaConf

    cfg = EnvConfig.from_dict(OmegaConf.create({"candidates_k": 7, "dtype": "float16", "budget": None}))
    assert (cfg.candidates_k, cfg.dtype, cfg.budget) == (7, "float16", None)
    with pytest.raises(ValueError, match="index_type"):
        EnvConfig(index_type="annoy")


def _knn_rows(vecs: np.ndarray, k: int) -> list[set[int]]:
    sims = _unit(vecs) @ _unit(vecs).T
    np.fill_diagonal(sims, -np.inf)
    return [set(np.argsort(-row)[:k].tolist()) for row in sims]


def test_neighbour_graph_rows_equal_brute_force_knn_and_follow_upserts():
    ids, vecs = _data(n=400, d=8)
    index = _index(ids, vecs, graph_k=5, graph_refresh_age=1)
    truth = _knn_rows(vecs, 5)
    got = index.neighbours(ids[:50])
    assert [{int(d.split("-")[1]) for d in row} for row in got] == truth[:50]
    # move doc 0 next to doc 399: an upsert at a newer version recomputes its row...
    moved = vecs.copy()
    moved[0] = vecs[399] + 1e-3
    index.upsert(ids[:1], moved[:1], version=1)
    assert index.neighbours(ids[:1])[0][0] == "doc-399"
    # ... and doc 0 is offered to its new neighbours that have a row (reverse edge)
    index.neighbours(["doc-399"])  # computed now (row version 0), from the stored vectors
    assert index.neighbours(["doc-399"])[0][0] == "doc-0"


def test_neighbours_from_given_vectors_and_row_age():
    ids, vecs = _data(n=300, d=8)
    index = _index(ids, vecs, graph_k=3, graph_refresh_age=2)
    target = vecs[123:124] + 1e-4
    # rows can be computed from caller-supplied (fresh, unwritten) vectors
    assert index.neighbours(["doc-7"], target, version=1)[0][0] == "doc-123"
    # a row younger than graph_refresh_age is reused, an older one recomputed
    assert index.neighbours(["doc-7"], vecs[200:201], version=2)[0][0] == "doc-123"
    assert index.neighbours(["doc-7"], vecs[200:201] + 1e-4, version=3)[0][0] == "doc-200"
    with pytest.raises(ValueError, match="version"):
        index.neighbours(["doc-7"], target)
    assert index.neighbours(["unknown"]) == [[]]
