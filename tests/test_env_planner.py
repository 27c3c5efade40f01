"""RefreshPlanner decisions on hand-built cases, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from verl_search_r3.env import CorpusIndex, EnvConfig, RefreshPlanner, full_encode


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Encoder:
    """Returns the given fresh vector of each text (texts are doc ids) and records the calls."""

    def __init__(self, fresh: dict[str, np.ndarray]):
        self.fresh = fresh
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([self.fresh[t] for t in texts])

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]


def _index(stale: dict[str, np.ndarray], versions: dict[str, int] | None = None, **cfg) -> CorpusIndex:
    index = CorpusIndex(EnvConfig(progress=False, **cfg))
    index.add_texts(list(stale), list(stale))
    for doc, vec in stale.items():
        index.upsert([doc], vec[None], (versions or {}).get(doc, 0), update_graph=False)
    return index


Q = _unit([[1.0, 0.0, 0.0]])
# stale (version 0) and fresh vectors; stale scores with Q: a .99  b .97  c .6  d .55  h .5
STALE = {"a": _unit([0.9, 0.1, 0.0]), "b": _unit([0.8, -0.2, 0.0]), "c": _unit([0.6, 0.0, 0.8]),
         "d": _unit([0.55, 0.0, -0.83]), "h": _unit([0.5, 0.86, 0.0])}
FRESH = {"a": _unit([0.8, 0.6, 0.0]), "b": _unit([0.7, -0.7, 0.0]), "c": _unit([0.5, 0.1, 0.8]),
         "d": _unit([0.4, 0.0, -0.9]), "h": _unit([1.0, 0.02, 0.0])}


def test_relevant_and_top_candidates_are_refreshed_fresh_ones_skipped():
    index = _index(STALE, versions={"b": 2})  # b already carries a version-2 vector
    enc = Encoder(FRESH)
    planner = RefreshPlanner(EnvConfig(candidates_k=2, expand_top=0))
    result = planner.refresh(index, Q, [["d"]], version=2, encode=enc)
    # top-2 of the stale index are a and b; b is fresh; d is relevant
    assert sorted(enc.encoded) == ["a", "d"]
    assert sorted(result.doc_ids) == ["a", "b", "d"]
    s = result.stats
    assert (s.n_requested, s.n_encoded, s.n_skipped_fresh, s.n_over_budget, s.budget_hit) == (3, 2, 1, 0, False)
    assert s.requested_max_age == 2 and s.requested_mean_age == pytest.approx(4 / 3)
    # the pool vectors are what the index now stores, and the scores are cosines with them
    want = {"a": FRESH["a"], "b": STALE["b"], "d": FRESH["d"]}
    for j, doc in enumerate(result.doc_ids):
        np.testing.assert_allclose(result.doc_vecs[j], want[doc], atol=1e-6)
        assert result.scores[0, j] == pytest.approx(float(Q[0] @ want[doc]), abs=1e-6)
    assert result.doc_versions.tolist() == [2, 2, 2] and result.fresh.all()
    _, versions, _ = index.get(["a", "c", "d"])
    assert versions.tolist() == [2, 0, 2]
    assert s.index.age_counts == {0: 3, 2: 2}
    ids, scores = result.ranking(0)
    assert ids == ["b", "a", "d"] and list(scores) == sorted(scores, reverse=True)
    field = result.candidates_field(0)
    assert field["doc_ids"] == result.doc_ids and field["scores"] == pytest.approx(result.scores[0].tolist())


@pytest.mark.parametrize("tolerance,expected", [(0, ["a", "b"]), (1, ["a"]), (2, [])])
def test_staleness_tolerance_decides_what_counts_as_fresh(tolerance, expected):
    index = _index(STALE, versions={"a": 1, "b": 2})
    enc = Encoder(FRESH)
    RefreshPlanner(EnvConfig(candidates_k=2, expand_top=0, staleness_tolerance=tolerance)).refresh(index, Q, [[]], 3, enc)
    assert sorted(enc.encoded) == expected


def test_budget_spends_on_best_ranks_and_never_starves_relevant_docs():
    index = _index(STALE)
    enc = Encoder(FRESH)
    result = RefreshPlanner(EnvConfig(candidates_k=4, expand_top=0, budget=1)).refresh(index, Q, [["h", "d"]], 1, enc)
    # relevant h, d are exempt; of the candidates a, b, c (d is relevant) only the best (a) fits;
    # b and c stay in the pool with their stale vectors, flagged not fresh
    assert enc.encoded == ["h", "d", "a"]
    pool = dict(zip(result.doc_ids, zip(result.fresh.tolist(), result.doc_vecs)))
    assert sorted(pool) == ["a", "b", "c", "d", "h"]
    assert {d for d, (fresh, _) in pool.items() if not fresh} == {"b", "c"}
    np.testing.assert_allclose(pool["b"][1], STALE["b"], atol=1e-6)
    assert result.stats.n_over_budget == 2 and result.stats.budget_hit
    assert index.get(["b", "c"])[1].tolist() == [0, 0]  # not written
    enc0 = Encoder(FRESH)
    result0 = RefreshPlanner(EnvConfig(candidates_k=4, expand_top=0, budget=0)).refresh(_index(STALE), Q, [["c"]], 1, enc0)
    assert enc0.encoded == ["c"] and result0.fresh.tolist() == [d == "c" for d in result0.doc_ids]


def test_graph_neighbours_catch_a_document_the_stale_index_ranks_too_low():
    # h's fresh vector is the best match of Q, but its stale one ranks last; h's stale vector
    # is the nearest document to a's *fresh* vector, so h is a's graph neighbour
    full_ranking = sorted(FRESH, key=lambda d: -float(Q[0] @ FRESH[d]))
    assert full_ranking[0] == "h"
    without = RefreshPlanner(EnvConfig(candidates_k=2, expand_top=0, graph_k=1))
    with_graph = RefreshPlanner(EnvConfig(candidates_k=2, expand_top=1, graph_k=1))
    r0 = without.refresh(_index(STALE, graph_k=1), Q, [["a"]], 1, Encoder(FRESH))
    index = _index(STALE, graph_k=1)
    enc = Encoder(FRESH)
    r1 = with_graph.refresh(index, Q, [["a"]], 1, enc)
    assert "h" not in r0.doc_ids and r0.ranking(0)[0][0] == "a"
    assert r1.stats.n_neighbours == 1 and "h" in enc.encoded
    assert r1.ranking(0)[0] == full_ranking[: len(r1.doc_ids)]
    # the row of the seed a was computed from its fresh vector and kept in the graph
    assert index.neighbours(["a"]) == [["h"]]


def test_one_write_per_refresh_and_none_when_everything_is_fresh():
    index = _index(STALE)
    writes = []
    upsert = index.upsert
    index.upsert = lambda ids, vecs, version, update_graph=True: (writes.append(list(ids)), upsert(ids, vecs, version, update_graph))
    planner = RefreshPlanner(EnvConfig(candidates_k=3, expand_top=2, graph_k=2))
    planner.refresh(index, Q, [["d"]], 1, Encoder(FRESH))
    assert len(writes) == 1 and len(writes[0]) >= 4
    enc = Encoder(FRESH)
    result = planner.refresh(index, Q, [["d"]], 1, enc)
    assert len(writes) == 1 and enc.calls == [] and result.stats.n_skipped_fresh == result.stats.n_requested


def test_relevant_docs_without_vectors_are_inserted():
    index = _index(STALE)
    index.add_texts(["new"], ["new"])
    enc = Encoder({**FRESH, "new": _unit([0.0, 1.0, 0.0])})
    result = RefreshPlanner(EnvConfig(candidates_k=1, expand_top=0)).refresh(index, Q, [["new"]], 4, enc)
    assert result.stats.n_inserted == 1 and "new" in result.doc_ids
    assert index.get(["new"])[1].tolist() == [4]
    with pytest.raises(KeyError, match="no text"):
        RefreshPlanner(EnvConfig(candidates_k=1, expand_top=0)).refresh(index, Q, [["ghost"]], 4, enc)


def test_periodic_full_refresh_and_full_encode():
    index = _index(STALE)
    enc = Encoder(FRESH)
    planner = RefreshPlanner(EnvConfig(candidates_k=1, expand_top=0, full_refresh_every=2, encode_batch_size=2, progress=False))
    r1 = planner.refresh(index, Q, [[]], 1, enc)
    assert not r1.stats.full_refresh and r1.stats.index.n_stale == 4
    r2 = planner.refresh(index, Q, [[]], 2, enc)
    assert r2.stats.full_refresh and r2.stats.index.n_stale == 0
    assert max(len(c) for c in enc.calls) == 2  # batched
    assert full_encode(index, Encoder(FRESH), 5, batch_size=3, progress=False) == 5
    assert index.staleness(5).age_counts == {0: 5}


def test_pool_ranking_equals_full_corpus_ranking_when_everything_is_a_candidate():
    rng = np.random.default_rng(0)
    ids = [f"d{i}" for i in range(60)]
    stale = dict(zip(ids, _unit(rng.standard_normal((60, 8)))))
    fresh = dict(zip(ids, _unit(rng.standard_normal((60, 8)))))
    queries = _unit(rng.standard_normal((5, 8)))
    result = RefreshPlanner(EnvConfig(candidates_k=60, expand_top=0)).refresh(_index(stale), queries, [[]] * 5, 1, Encoder(fresh))
    matrix = np.stack([fresh[d] for d in ids])
    for i, q in enumerate(queries):
        assert result.ranking(i)[0] == [ids[j] for j in np.argsort(-(matrix @ q))]


def test_a_step_without_queries_changes_nothing():
    index = _index(STALE)
    enc = Encoder(FRESH)
    result = RefreshPlanner(EnvConfig(candidates_k=2)).refresh(index, np.zeros((0, 3), np.float32), [], 1, enc)
    assert result.doc_ids == [] and result.scores.shape == (0, 0) and enc.calls == []
    assert result.stats.index.n_stale == 5


def test_bad_inputs_are_reported():
    planner = RefreshPlanner(EnvConfig(candidates_k=2, expand_top=0))
    with pytest.raises(ValueError, match="relevant-id lists"):
        planner.refresh(_index(STALE), Q, [[], []], 1, Encoder(FRESH))
    with pytest.raises(ValueError, match="encode returned shape"):
        planner.refresh(_index(STALE), Q, [[]], 1, lambda texts: np.zeros((1, 3), np.float32))
