"""The Ray layer on a local cluster: sharding, named actors, snapshots, restarts, concurrency."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from test_env_concurrency import N, run_readers_during_writes, versioned_vectors  # noqa: E402

from verl_search_r3.env import CorpusIndex, EnvConfig, RefreshPlanner, SnapshotError  # noqa: E402
from verl_search_r3.env.actor import CorpusIndexClient, shard_of  # noqa: E402


pytestmark = pytest.mark.usefixtures("ray_cluster")  # the test run's Ray cluster (tests/conftest.py)


def _config(name: str, **kw) -> EnvConfig:
    return EnvConfig(name=name, num_cpus=0.5, progress=False, **kw)


def _corpus(n: int = 2000, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"doc-{i}" for i in range(n)]
    return ids, rng.standard_normal((n, d)).astype(np.float32), rng


@pytest.fixture()
def client_factory():
    made = []

    def make(config: EnvConfig) -> CorpusIndexClient:
        made.append(CorpusIndexClient(config))
        return made[-1]

    yield make
    for c in made:
        c.shutdown()


SHARED = _config("shared", num_shards=3, graph_k=3, candidates_k=12, expand_top=0)


@pytest.fixture(scope="module")
def sharded():
    """One 3-shard index for several tests (actor start-up is the slow part); emptied by each."""
    client = CorpusIndexClient(SHARED)
    yield client
    client.shutdown()


def _fill(index, ids, vecs, versions) -> None:
    index.remove(index.doc_ids())
    index.add_texts(ids, [f"text {i}" for i in ids])
    for v in sorted(set(versions)):
        sel = [j for j, x in enumerate(versions) if x == v]
        index.upsert([ids[j] for j in sel], vecs[sel], v, update_graph=False)


def test_shard_fan_out_equals_one_big_index(sharded):
    ids, vecs, rng = _corpus()
    versions = rng.integers(0, 4, len(ids)).tolist()
    cfg = SHARED
    single = CorpusIndex(cfg)
    for index in (sharded, single):
        _fill(index, ids, vecs, versions)
    owners = shard_of(ids, 3)
    sizes = [int((owners == s).sum()) for s in range(3)]
    assert [(i["n_vectors"], i["n_texts"]) for i in sharded.info()] == list(zip(sizes, sizes))
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    (a_ids, a_scores), (b_ids, b_scores) = sharded.search(queries, 25), single.search(queries, 25)
    assert a_ids == b_ids
    np.testing.assert_array_equal(a_scores, b_scores)
    probe = ids[::7] + ["missing"]
    for x, y in zip(sharded.get(probe), single.get(probe)):
        np.testing.assert_array_equal(x, y)
    assert sharded.texts(probe[:-1]) == single.texts(probe[:-1])
    assert sorted(sharded.doc_ids()) == sorted(single.doc_ids())
    assert sharded.staleness(5).to_dict() == single.staleness(5).to_dict()
    # the same selective refresh on both gives the same pool, vectors and scores
    fresh = {f"text {i}": v for i, v in zip(ids, rng.standard_normal((len(ids), 16)).astype(np.float32))}
    encode = lambda texts: np.stack([fresh[t] for t in texts])  # noqa: E731
    relevant = [[ids[j] for j in rng.choice(len(ids), 2)] for _ in queries]
    ra = sharded.refresh(queries, relevant, 6, encode)
    rb = RefreshPlanner(cfg).refresh(single, queries, relevant, 6, encode)
    assert sorted(ra.doc_ids) == sorted(rb.doc_ids) and ra.stats.n_encoded == rb.stats.n_encoded
    for i in range(len(queries)):
        assert ra.ranking(i)[0] == rb.ranking(i)[0]
    assert sharded.staleness(6).to_dict() == single.staleness(6).to_dict()
    assert sharded.remove(ids[:10] + ["missing"]) == single.remove(ids[:10] + ["missing"]) == 10
    assert sharded.search(queries, 25)[0] == single.search(queries, 25)[0]


def test_named_actors_are_shared_by_every_worker(sharded):
    ids, vecs, rng = _corpus(n=300)
    cfg, client = SHARED, sharded
    _fill(client, ids, vecs, [1] * len(ids))
    again = CorpusIndexClient(cfg)  # get_if_exists: the same actors, not new ones
    assert [i["pid"] for i in again.info()] == [i["pid"] for i in client.info()]
    queries = rng.standard_normal((4, 16)).astype(np.float32)

    @ray.remote
    def search_from_a_worker(config: dict, q: np.ndarray):
        return CorpusIndexClient.connect(config).search(q, 5)

    remote_ids, remote_scores = ray.get(search_from_a_worker.remote(cfg.to_dict(), queries))
    local_ids, local_scores = client.search(queries, 5)
    assert remote_ids == local_ids
    np.testing.assert_array_equal(remote_scores, local_scores)
    assert ray.get(ray.remote(lambda c, q: c.search(q, 5)[0]).remote(client, queries)) == local_ids  # picklable
    with pytest.raises(ValueError, match="no corpus index shard"):
        CorpusIndexClient.connect(_config("never-created"))
    with pytest.raises(ValueError, match="runs with {'graph_k': 3}, this client's config has {'graph_k': 5}"):
        CorpusIndexClient(cfg.replace(graph_k=5))  # existing actors with other index settings


def test_sharded_snapshot_round_trip_and_refusals(sharded, client_factory, tmp_path):
    ids, vecs, rng = _corpus(n=600)
    client = sharded
    _fill(client, ids, vecs, [2] * len(ids))
    client.neighbours(ids[:30])
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    before = (client.search(queries, 10), client.get(ids), client.neighbours(ids[:30]))
    path = str(tmp_path / "snap")
    client.snapshot(path)
    assert sorted(os.listdir(path)) == ["manifest.json"] + [f"shard-0000{i}-of-00003" for i in range(3)]
    client.upsert(ids, rng.standard_normal((len(ids), 16)).astype(np.float32), 3)
    client.remove(ids[:50])
    client.restore(path)
    after = (client.search(queries, 10), client.get(ids), client.neighbours(ids[:30]))
    assert after[0][0] == before[0][0] and after[2] == before[2]
    for x, y in zip(after[1], before[1]):
        np.testing.assert_array_equal(x, y)
    other = client_factory(_config("snap1", graph_k=3))
    with pytest.raises(SnapshotError, match="snapshot has 3 shards, this index has 1"):
        other.restore(path)
    with pytest.raises(SnapshotError, match="num_shards"):  # a shard refuses another layout's snapshot
        ray.get(other.shards[0].restore.remote(os.path.join(path, "shard-00000-of-00003")))


def test_restarted_actor_restores_its_last_snapshot(client_factory, tmp_path):
    ids, vecs, rng = _corpus(n=400)
    client = client_factory(_config("restart", num_shards=2, state_dir=str(tmp_path / "state")))
    _fill(client, ids, vecs, [1] * len(ids))
    client.snapshot(str(tmp_path / "snap"))
    client.upsert(ids, rng.standard_normal((len(ids), 16)).astype(np.float32), 2)  # after the snapshot
    owners = shard_of(ids, 2)
    killed = client.info()[0]
    ray.kill(client.shards[0], no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            info = client.info()[0]
            if info["pid"] != killed["pid"]:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "shard 0 did not restart"
        time.sleep(0.2)
    assert info["restored_from"] == str(tmp_path / "snap" / "shard-00000-of-00002")
    assert info["n_vectors"] == killed["n_vectors"]
    stored, versions, found = client.get(ids)
    assert found.all()
    # shard 0 is back at the snapshot (version 1, the original vectors); shard 1 kept version 2
    assert (versions[owners == 0] == 1).all() and (versions[owners == 1] == 2).all()
    unit = vecs[owners == 0] / np.linalg.norm(vecs[owners == 0], axis=1, keepdims=True)
    np.testing.assert_allclose(stored[owners == 0], unit, atol=1e-6)
    assert client.texts(ids[:3]) == [f"text {i}" for i in ids[:3]]


def test_concurrent_readers_through_the_actor_see_whole_writes(client_factory):
    client = client_factory(_config("concurrent", graph_k=0, max_concurrency=8))
    ids = [f"doc-{i}" for i in range(N)]
    client.upsert(ids, versioned_vectors()(0), 0)
    seen = run_readers_during_writes(client.get, client.search, client.upsert)
    assert len(seen) >= 2
