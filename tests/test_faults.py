"""Faults: corpus-index shards killed under the recipe's default config (SIGTERM during a build and
the temporary folders of killed runs are rows of ``test_bad_input_catalogue.py``)."""

from __future__ import annotations

import logging
import os
import time
import uuid
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from verl_search_r3.env import EnvConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "config", "search_r3_grpo.yaml")
DIM = 16


@pytest.fixture(scope="module")
def ray_session(ray_cluster):
    """The test run's Ray cluster (``tests/conftest.py``)."""
    import ray

    return ray


def recipe_env(**overrides) -> EnvConfig:
    """``search_r3.env`` exactly as the shipped recipe sets it (state_dir null, not detached,
    max_restarts 3, 2 CPUs per shard on the test cluster's logical CPUs, ...), with a run-unique
    name, no progress bars and 2 shards."""
    values = OmegaConf.to_container(OmegaConf.load(RECIPE).search_r3.env)
    assert values["state_dir"] is None and values["on_shard_restart"] == "reencode"
    values.update(name=f"faults-{uuid.uuid4().hex[:8]}", progress=False, num_shards=2, **overrides)
    return EnvConfig.from_dict(values)


def _encoder(calls: list[int]):
    """Deterministic document vectors (a function of the text), counting encoded texts."""

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIM) for t in texts]).astype(np.float32)

    return encode


def _kill(ray, client, shard: int) -> dict:
    """Kill a shard (Ray restarts it) and wait for the new process; returns its info."""
    before = client.info()[shard]["pid"]
    ray.kill(client.shards[shard], no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            info = client.info()[shard]
            if info["pid"] != before:
                return info
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"shard {shard} did not restart")


def test_killed_shard_under_the_recipe_config_is_repaired(ray_session, tmp_path, caplog):
    from verl_search_r3.env.actor import ShardLostError, shard_of, training_client

    ray = ray_session
    n_docs = 240
    ids = [f"doc-{i}" for i in range(n_docs)]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"doc_id": ids, "title": [""] * n_docs, "text": [f"text of document {i}" for i in range(n_docs)]}), corpus)
    owner = shard_of(ids, 2)
    calls: list[int] = []
    encode = _encoder(calls)
    checkpoints = tmp_path / "checkpoints"
    client = training_client(recipe_env(), str(checkpoints), str(corpus), encode)  # what the trainer builds
    try:
        assert client.config.state_dir == str(checkpoints / "search_r3_env_state")
        from verl_search_r3.env import load_corpus_texts

        client.add_texts(*load_corpus_texts(str(corpus)))
        client.full_encode(encode, version=0)
        queries = encode([f"text of document {i}" for i in (3, 7, 11)])
        relevant = [["doc-3"], ["doc-7"], ["doc-11"]]

        # 1. a crash before any checkpoint: the shard comes back empty
        info = _kill(ray, client, 0)
        assert info["n_texts"] == 0 and "no snapshot was recorded yet" in info["restart"]["error"]
        calls.clear()
        with caplog.at_level(logging.ERROR, logger="verl_search_r3.env.actor"):
            client.refresh(queries, relevant, version=1, encode=encode)
        lost = int((owner == 0).sum())
        assert "crashed and restarted" in caplog.text and "started EMPTY" in caplog.text
        assert client.recovery_metrics() == {"env/shard_restarts": 1.0, "env/restarts_empty": 1.0,
                                             "env/texts_reloaded": float(lost), "env/vectors_reencoded": float(lost)}
        assert set(client.recovery_metrics().values()) == {0.0}  # per call: the next step repaired nothing
        assert sorted(client.doc_ids()) == sorted(ids)
        _, versions, found = client.get(ids)
        assert found.all() and (versions[owner == 0] >= 1).all()  # re-encoded by the current policy
        top, _ = client.search(encode([f"text of document {i}" for i in range(n_docs)]), 1)
        assert [t[0] for t in top] == ids  # every document is findable again, on both shards
        assert client.info()[0]["restart"] is None

        # 2. a crash after a checkpoint: the shard reloads the checkpoint's environment (default state dir)
        client.snapshot(str(checkpoints / "global_step_1" / "search_r3_env"))
        client.upsert(ids, encode([f"v2 {i}" for i in ids]), version=2)
        info = _kill(ray, client, 1)
        assert info["restart"]["restored_from"].startswith(str(checkpoints / "global_step_1")) and info["n_texts"] == (owner == 1).sum()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="verl_search_r3.env.actor"):
            client.refresh(queries, relevant, version=3, encode=encode)
        assert "reloaded" in caplog.text and "later writes are lost" in caplog.text
        assert client.recovery_metrics() == {"env/shard_restarts": 1.0, "env/restarts_empty": 0.0, "env/texts_reloaded": 0.0,
                                             "env/vectors_reencoded": 0.0}  # reloaded: nothing was missing
        _, versions, found = client.get(ids)
        assert found.all() and (versions[owner == 1] <= 3).all() and (versions[owner == 0] == 2).sum() > 0

        # 3. a corrupt pointer file does not stop the restart: the shard starts empty; a client
        # with on_shard_restart=refuse stops with a clear error, the default one repairs it
        pointer = checkpoints / "search_r3_env_state" / f"{client.config.name}-0-of-2.json"
        pointer.write_text("{not json")
        info = _kill(ray, client, 0)
        assert "cannot reload the snapshot named by" in info["restart"]["error"]
        refusing = training_client(client.config.replace(on_shard_restart="refuse"), str(checkpoints), str(corpus), encode)
        with pytest.raises(ShardLostError, match="crashed and restarted.*on_shard_restart=refuse"):
            refusing.refresh(queries, relevant, version=4, encode=encode)
        client.refresh(queries, relevant, version=4, encode=encode)
        assert sorted(client.doc_ids()) == sorted(ids) and client.get(ids)[2].all()
        assert client.recovery.shard_restarts == 3 and client.recovery.restarts_empty == 2
    finally:
        client.shutdown()
