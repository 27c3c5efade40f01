"""Concurrent readers during refresh writes see every write whole or not at all."""

from __future__ import annotations

import threading

import numpy as np

from verl_search_r3.env import CorpusIndex, EnvConfig
from verl_search_r3.env.locking import RWLock

N, D, VERSIONS = 3000, 32, 12


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def versioned_vectors(seed: int = 0):
    """Vectors whose content encodes the version that wrote them."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((N, D)).astype(np.float32)
    direction = rng.standard_normal(D).astype(np.float32)
    return lambda v: _unit(base + 0.5 * v * direction).astype(np.float32)


def check_reads(get, search, vectors, stop: threading.Event, errors: list, seen: set, seed: int) -> None:
    """Reader loop: every read must come from exactly one complete write."""
    rng = np.random.default_rng(seed)
    ids = [f"doc-{i}" for i in range(N)]
    expected = {v: vectors(v) for v in range(VERSIONS + 1)}
    query = _unit(rng.standard_normal((1, D)).astype(np.float32))
    while not stop.is_set():
        rows = rng.choice(N, 200, replace=False)
        vecs, versions, found = get([ids[r] for r in rows])
        if not found.all() or len(set(versions.tolist())) != 1:
            errors.append(f"one read saw versions {sorted(set(versions.tolist()))}")
            return
        v = int(versions[0])
        seen.add(v)
        if not np.allclose(vecs, expected[v][rows], atol=1e-6):
            errors.append(f"vectors do not match their version {v}")
            return
        hit_ids, scores = search(query, 5)
        hit_rows = [int(h.split("-")[1]) for h in hit_ids[0]]
        if not any(np.allclose(scores[0], expected[u][hit_rows] @ query[0], atol=1e-5) for u in expected):
            errors.append("search scores match no single version")
            return


def run_readers_during_writes(get, search, upsert, n_readers: int = 3) -> set:
    """Start readers, apply VERSIONS whole-corpus writes, return the versions the readers saw."""
    vectors = versioned_vectors()
    stop, errors, seen = threading.Event(), [], set()
    readers = [threading.Thread(target=check_reads, args=(get, search, vectors, stop, errors, seen, s)) for s in range(n_readers)]
    for r in readers:
        r.start()
    try:
        for v in range(1, VERSIONS + 1):
            upsert([f"doc-{i}" for i in range(N)], vectors(v), v)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert not errors, errors[0]
    return seen


def test_concurrent_readers_never_see_a_half_applied_write():
    index = CorpusIndex(EnvConfig(graph_k=4, graph_refresh_age=0))
    vectors = versioned_vectors()
    ids = [f"doc-{i}" for i in range(N)]
    index.upsert(ids, vectors(0), 0)
    index.neighbours(ids[:500])  # rows that every later upsert recomputes: slower writes
    seen = run_readers_during_writes(index.get, index.search, index.upsert)
    assert len(seen) >= 3  # the readers really interleaved with the writes


def test_rwlock_excludes_writers_and_shares_readers():
    lock = RWLock()
    inside, peak, log = [0], [0], []
    gate = threading.Barrier(3)

    def reader():
        gate.wait()
        with lock.read():
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            threading.Event().wait(0.05)
            inside[0] -= 1

    def writer():
        gate.wait()
        threading.Event().wait(0.01)
        with lock.write():
            log.append(inside[0])

    threads = [threading.Thread(target=reader), threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2 and log == [0]


def test_concurrent_first_searches_build_an_approximate_index_once():
    rng = np.random.default_rng(0)
    index = CorpusIndex(EnvConfig(index_type="hnsw", hnsw_m=8, graph_k=0))
    index.upsert([f"doc-{i}" for i in range(2000)], rng.standard_normal((2000, D)).astype(np.float32), 0)
    queries = rng.standard_normal((20, D)).astype(np.float32)
    results, built = [None] * 4, []
    build = index._store._backend.build

    def counting_build(*args):
        built.append(1)
        build(*args)

    index._store._backend.build = counting_build

    def search(i: int) -> None:
        results[i] = index.search(queries, 5)[0]

    threads = [threading.Thread(target=search, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and all(r == results[0] for r in results)
