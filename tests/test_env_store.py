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


def test_bfloat16_storage_rounds_like_torch_and_search_finds_the_exact_top_k():
    import torch

    ids, vecs = _data(n=2500)
    index = _index(ids, vecs, dtype="bfloat16", search_chunk_rows=700)
    stored, _, _ = index.get(ids)
    np.testing.assert_array_equal(stored, torch.from_numpy(_unit(vecs)).bfloat16().float().numpy())
    assert index.memory_bytes()["vectors"] == 2500 * vecs.shape[1] * 2
    # the bfloat16 product only proposes candidates; they are re-scored with the stored vectors
    queries = np.random.default_rng(2).standard_normal((20, vecs.shape[1])).astype(np.float32)
    got_ids, got_scores = index.search(queries, 10)
    want_ids, want_scores = _brute_force(queries, stored, ids, 10, normalize_docs=False)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert index.search(queries, 10, exact=True)[0] == want_ids


def test_search_pads_when_k_exceeds_the_corpus():
    ids, vecs = _data(n=5)
    got_ids, scores = _index(ids, vecs).search(vecs[:2], 8)
    assert [len(r) for r in got_ids] == [5, 5]
    assert got_ids[0][0] == ids[0]
    assert np.isinf(scores[:, 5:]).all() and np.isfinite(scores[:, :5]).all()


@pytest.mark.parametrize("index_type,extra,min_recall", [
    ("ivf", {"ivf_nlist": 32, "ivf_nprobe": 8}, 0.9),
    ("hnsw", {"hnsw_m": 16, "ann_codes": "flat"}, 0.97),
    ("hnsw", {"hnsw_m": 16, "dtype": "float16", "ann_codes": "fp16"}, 0.97),
    ("hnsw", {"hnsw_m": 16, "dtype": "float16"}, 0.95),  # SQ8 codes (1 byte per dimension)
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


@pytest.mark.parametrize("index_type,extra", [
    ("ivf", {"ivf_nlist": 16, "ivf_nprobe": 2}), ("hnsw", {"hnsw_m": 4, "hnsw_ef_search": 8}),
])
def test_exact_search_is_brute_force_whatever_the_index_type(index_type, extra):
    ids, vecs = _data(n=2000, d=16)
    index = _index(ids, vecs, index_type=index_type, dtype="float16", search_chunk_rows=300, **extra)
    queries = np.random.default_rng(5).standard_normal((30, 16)).astype(np.float32)
    stored, _, _ = index.get(ids)
    want_ids, want_scores = _brute_force(queries, stored, ids, 10, normalize_docs=False)
    got_ids, got_scores = index.search(queries, 10, exact=True)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_candidates_carry_exact_scores_of_the_stored_vectors(index_type):
    ids, vecs = _data(n=1500, d=16)
    index = _index(ids, vecs, index_type=index_type, dtype="float16", ivf_nlist=16, ivf_nprobe=4, hnsw_m=8)
    queries = np.random.default_rng(6).standard_normal((20, 16)).astype(np.float32)
    got_ids, got_scores = index.search(queries, 10)
    stored, _, _ = index.get(ids)
    row = {d: i for i, d in enumerate(ids)}
    for q, found, scores in zip(_unit(queries), got_ids, got_scores):
        np.testing.assert_allclose(scores, stored[[row[d] for d in found]] @ q, rtol=0, atol=1e-5)
        assert (np.diff(scores) <= 0).all()


def test_hnsw_overwrites_small_moves_in_place_and_reinserts_large_ones():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((30, 24))
    ids, vecs = [f"doc-{i}" for i in range(3000)], _clustered(3000, centres, rng)
    index = _index(ids, vecs, index_type="hnsw", hnsw_m=16, ann_rebuild_fraction=10.0, hnsw_update_min_cosine=0.9)
    queries = _clustered(100, centres, rng)
    index.search(queries, 1)
    backend = index._store._backend
    # a policy step: every vector moves a little (cosine with its old version > 0.9)
    moved = vecs + 0.1 * np.linalg.norm(vecs, axis=1, keepdims=True) * _unit(rng.standard_normal(vecs.shape))
    assert (np.sum(_unit(moved) * _unit(vecs), axis=1) > 0.9).all()
    index.upsert(ids, moved, 1, update_graph=False)
    assert backend.index.ntotal == 3000 and backend._alive.all()  # no insertion, no tombstone
    got, scores = index.search(queries, 10)
    want, want_scores = _brute_force(queries, index.get(ids)[0], ids, 10, normalize_docs=False)
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]) >= 0.95
    np.testing.assert_allclose(scores[:, 0], want_scores[:, 0], atol=2e-3)  # scores of the new vectors
    # a document that jumps elsewhere is tombstoned and inserted again, and found where it went
    target = _unit(rng.standard_normal((1, 24)))
    index.upsert(["doc-0"], target, 2, update_graph=False)
    assert backend.index.ntotal == 3001 and (~backend._alive).sum() == 1
    assert index.search(target, 1)[0] == [["doc-0"]]


def test_ivf_update_reassigns_a_moved_vector_and_build_trains_on_a_sample():
    rng = np.random.default_rng(8)
    centres = rng.standard_normal((20, 16)) * 3
    ids, vecs = [f"doc-{i}" for i in range(4000)], _clustered(4000, centres, rng)
    index = _index(ids, vecs, index_type="ivf", ivf_nlist=20, ivf_nprobe=1, ann_train_size=800,
                   search_chunk_rows=512, ann_rebuild_fraction=10.0)
    index.search(vecs[:1], 1)
    ivf = index._store._backend.index
    assert ivf.ntotal == 4000 and ivf.nprobe == 1
    # moved into another cluster: with one probed list it is only found if it was re-assigned
    index.upsert(["doc-0"], centres[7:8] * 1.0, 1, update_graph=False)
    assert index.search(centres[7:8], 1)[0] == [["doc-0"]] and ivf.ntotal == 4000


def test_memory_bytes_and_capacity_follow_the_corpus_size():
    ids, vecs = _data(n=1000, d=32)
    index = CorpusIndex(EnvConfig(dtype="float16", index_type="hnsw", hnsw_m=8))
    index.add_texts(ids, ids)  # the corpus size is known: vectors are allocated once, not by doubling
    for start in range(0, 1000, 300):
        index.upsert(ids[start : start + 300], vecs[start : start + 300], 0, update_graph=False)
    index.search(vecs[:1], 1)
    mem = index.memory_bytes()
    assert mem["vectors"] == 1000 * 32 * 2
    assert mem["ann"] >= 1000 * (32 * 2 + 2 * 8 * 4)  # fp16 codes + level-0 links
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    flat = _index(ids, vecs, dtype="float16")
    assert flat.memory_bytes()["ann"] == 0 and flat.memory_bytes()["graph"] == 0


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_degenerate_queries_get_no_results_and_leave_the_others_alone(index_type):
    ids, vecs = _data(n=600, d=8)
    index = _index(ids, vecs, index_type=index_type, ivf_nlist=8, ivf_nprobe=8, hnsw_m=8)
    queries = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    bad = queries.copy()
    bad[1] = np.nan
    bad[2] = 0.0
    bad[3, 0] = np.inf
    got, scores = index.search(bad, 5)
    assert got[1:] == [[], [], []] and np.isneginf(scores[1:]).all()
    want, want_scores = index.search(queries[:1], 5)
    assert got[0] == want[0]
    np.testing.assert_array_equal(scores[0], want_scores[0])


def test_upsert_refuses_degenerate_vectors_naming_them():
    ids, vecs = _data(n=6, d=4)
    index = _index(ids, vecs)
    bad = vecs.copy()
    bad[1], bad[4] = 0.0, np.inf
    with pytest.raises(ValueError, match=r"2 degenerate document vector\(s\) \(1 with NaN/inf, 1 all zero\), ids \['doc-1', 'doc-4'\]"):
        index.upsert(ids, bad, 1)
    assert index.get(ids)[1].tolist() == [0] * 6  # nothing written
    raw = _index(ids[:1], vecs[:1], normalize=False)
    raw.upsert(["zero"], np.zeros((1, 4), np.float32), 1)  # without normalisation a zero vector is a vector
    assert raw.get(["zero"])[2].all()
