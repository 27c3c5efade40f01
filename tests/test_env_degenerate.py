"""Degenerate vectors at the environment boundary: NaN/inf/all-zero query vectors are masked
(not searched, no re-encodes, counted), and an ``encode`` callback that returns the wrong
dimension or degenerate document vectors gets a clear error naming the documents."""

from __future__ import annotations

import numpy as np
import pytest

from verl_search_r3.env import CorpusIndex, EnvConfig, RefreshPlanner, full_encode


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


RNG = np.random.default_rng(0)
IDS = [f"d{i}" for i in range(40)]
STALE = dict(zip(IDS, _unit(RNG.standard_normal((40, 6)))))
FRESH = dict(zip(IDS, _unit(RNG.standard_normal((40, 6)))))


class Encoder:
    def __init__(self, out: dict[str, np.ndarray]):
        self.out, self.encoded = out, []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.encoded += texts
        return np.stack([self.out[t] for t in texts])


def _index(**cfg) -> CorpusIndex:
    index = CorpusIndex(EnvConfig(progress=False, **cfg))
    index.add_texts(IDS, IDS)
    index.upsert(IDS, np.stack([STALE[d] for d in IDS]), 0, update_graph=False)
    return index


def test_degenerate_queries_neither_search_nor_trigger_encodes():
    good = _unit(RNG.standard_normal((1, 6)))
    queries = np.concatenate([good, np.full((1, 6), np.nan), np.zeros((1, 6)), good * np.inf]).astype(np.float32)
    relevant = [["d1"], ["d2"], ["d3"], ["d4"]]
    planner = RefreshPlanner(EnvConfig(candidates_k=3, expand_top=0, graph_k=0))
    enc = Encoder(FRESH)
    result = planner.refresh(_index(), queries, relevant, 1, enc)
    # the same step with the valid query alone: identical encodes and pool
    enc_alone = Encoder(FRESH)
    alone = planner.refresh(_index(), good, relevant[:1], 1, enc_alone)
    assert enc.encoded == enc_alone.encoded and "d2" not in enc.encoded and "d3" not in enc.encoded
    assert result.doc_ids == alone.doc_ids
    np.testing.assert_array_equal(result.scores[0], alone.scores[0])
    assert result.valid.tolist() == [True, False, False, False]
    assert np.isneginf(result.scores[1:]).all() and np.isfinite(result.scores[0]).all()
    assert result.candidates_field(2) == {"doc_ids": [], "scores": []} and result.ranking(1)[0] == []
    assert result.stats.n_invalid_queries == 3 and result.stats.to_metrics()["env/n_invalid_queries"] == 3.0


def test_a_step_of_only_degenerate_queries_encodes_and_writes_nothing():
    index = _index()
    writes = []
    index.upsert = lambda *a, **k: writes.append(a)
    enc = Encoder(FRESH)
    result = RefreshPlanner(EnvConfig(candidates_k=3, graph_k=0)).refresh(index, np.zeros((2, 6), np.float32), [["d1"], ["d2"]], 1, enc)
    assert enc.encoded == [] and writes == [] and result.doc_ids == []
    assert result.scores.shape == (2, 0) and not result.valid.any() and result.stats.n_invalid_queries == 2


def test_budget_per_query_follows_the_valid_queries():
    queries = _unit(RNG.standard_normal((3, 6)))
    queries[2] = np.nan
    enc = Encoder(FRESH)
    cfg = EnvConfig(candidates_k=10, expand_top=0, graph_k=0, budget_per_query=2)
    result = RefreshPlanner(cfg).refresh(_index(), queries, [["d0"], [], ["d5"]], 1, enc)
    assert len(enc.encoded) == 1 + 2 * 2  # the relevant d0, then 2 candidates per valid query
    assert enc.encoded[0] == "d0" and "d5" not in enc.encoded and result.stats.n_over_budget > 0
    enc = Encoder(FRESH)
    RefreshPlanner(cfg.replace(budget=1)).refresh(_index(), queries, [["d0"], [], ["d5"]], 1, enc)
    assert len(enc.encoded) == 2  # the smaller cap applies


@pytest.mark.parametrize("bad,message", [
    (lambda v: v[:, :4], r"dimension 4; the environment holds dimension 6"),
    (lambda v: np.where(np.arange(len(v))[:, None] == 1, np.nan, v), r"1 degenerate document vector\(s\) \(1 with NaN/inf, 0 all zero\), ids \['d\d+'\]"),
    (lambda v: v * 0, r"degenerate document vector\(s\) \(0 with NaN/inf, \d+ all zero\)"),
])
def test_a_bad_encode_callback_is_refused_and_nothing_is_written(bad, message):
    index = _index()
    good = Encoder(FRESH)
    query = _unit(RNG.standard_normal((1, 6)))
    with pytest.raises(ValueError, match=message):
        RefreshPlanner(EnvConfig(candidates_k=3, expand_top=0, graph_k=0)).refresh(
            index, query, [["d1"]], 1, lambda texts: bad(good(texts)))
    assert index.staleness(1).age_counts == {1: 40}  # nothing written
    with pytest.raises(ValueError, match=message):
        full_encode(index, lambda texts: bad(good(texts)), 2, batch_size=16, progress=False)
