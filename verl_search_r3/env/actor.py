"""The corpus index on Ray: named shard actors and a client that hides the sharding.

* :class:`CorpusIndexShard` — one :class:`~verl_search_r3.env.index.CorpusIndex` in a threaded
  Ray actor named ``<name>-<i>-of-<n>`` in namespace ``config.namespace`` (default
  ``verl_search_r3``), created with ``get_if_exists=True`` so any process may create-or-get it.
  Calls run concurrently (``max_concurrency``); the index's readers-writer lock makes every
  write (one ``upsert`` = one refresh's vectors for this shard) visible whole or not at all.
  It reserves ``num_cpus`` CPUs and no GPU (verl's placement groups hold the GPUs). On a crash
  Ray restarts it (``max_restarts``) and it reloads the last snapshot recorded in
  ``state_dir``; writes after that snapshot are lost.
* :class:`CorpusIndexClient` — routes each doc id to shard ``crc32(id) % n``; ``search`` fans
  out to every shard and merges the top-k; it implements the planner's index interface, so
  :meth:`CorpusIndexClient.refresh` runs the selective refresh against the shards, calling the
  ``encode`` callback in the caller's process (e.g. the trainer, which owns the actor workers).

Consistency across shards: a refresh writes each shard atomically, one shard after the other.
A search that runs during a multi-shard refresh may see shard A after and shard B before the
refresh; every document it returns is still consistent (vector, version and graph row from one
write). That mixed-version state is the normal state of the environment anyway.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np
import ray

from ..atomic import atomic_write_text
from .backends import topk_merge
from .config import EnvConfig
from .index import CorpusIndex
from .planner import EncodeFn, RefreshPlanner, RefreshResult, full_encode
from .snapshot import SnapshotError, atomic_directory, read_manifest, write_snapshot_files
from .store import StalenessStats

__all__ = ["CorpusIndexShard", "CorpusIndexClient", "shard_of", "shard_name", "SHARD_KEYS"]

SHARD_KEYS = ("dim", "dtype", "normalize", "index_type", "ivf_nlist", "ivf_nprobe", "hnsw_m", "hnsw_ef_construction",
              "hnsw_ef_search", "ann_rebuild_fraction", "search_chunk_rows", "graph_k", "graph_refresh_age",
              "staleness_tolerance", "verify_checksums", "search_threads", "state_dir")
"""Config keys the shard actors act on: a client must agree with existing actors on all of them."""


def shard_of(ids: Sequence[str], num_shards: int) -> np.ndarray:
    """``(n,)`` shard of each doc id: a stable hash (CRC-32 of the UTF-8 id) modulo ``num_shards``."""
    return np.fromiter((zlib.crc32(i.encode("utf-8")) % num_shards for i in ids), dtype=np.int64, count=len(ids))


def shard_name(config: EnvConfig, shard: int) -> str:
    """Ray actor name of shard ``shard``."""
    return f"{config.name}-{shard}-of-{config.num_shards}"


def _shard_dir(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


class CorpusIndexShard:
    """One shard of the corpus index (wrapped with ``ray.remote`` by :class:`CorpusIndexClient`).

    Args:
        config: :meth:`EnvConfig.to_dict` of the environment config.
        shard: this shard's number.
        num_shards: how many shards the corpus is split across.
    """

    def __init__(self, config: dict[str, Any], shard: int, num_shards: int) -> None:
        self.config = EnvConfig.from_dict(config)
        self.shard, self.num_shards = shard, num_shards
        faiss.omp_set_num_threads(self.config.search_threads or max(1, math.ceil(self.config.num_cpus)))
        self.index = CorpusIndex(self.config)
        self.restored_from: str | None = None
        with warnings.catch_warnings():  # Ray's own property implementation warns about a deprecated call
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        if reconstructed:
            path = self._restore_point()
            if path is not None:
                self.index.restore(path, expect_meta=self._meta())
                self.restored_from = path

    def _meta(self) -> dict[str, int]:
        return {"shard": self.shard, "num_shards": self.num_shards}

    def _pointer(self) -> str | None:
        if self.config.state_dir is None:
            return None
        return os.path.join(self.config.state_dir, f"{shard_name(self.config, self.shard)}.json")

    def _restore_point(self) -> str | None:
        pointer = self._pointer()
        if pointer is None or not os.path.isfile(pointer):
            return None
        with open(pointer, encoding="utf-8") as f:
            return json.load(f)["snapshot"]

    def info(self) -> dict[str, Any]:
        """Shard number, sizes (vectors, texts), dimension, the snapshot it was restored from after a
        restart, process id and config."""
        return {"shard": self.shard, "num_shards": self.num_shards, "n_vectors": len(self.index),
                "n_texts": self.index.num_texts, "dim": self.index.dim, "restored_from": self.restored_from,
                "pid": os.getpid(), "config": self.config.to_dict()}

    def search(self, query_vecs: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        return self.index.search(query_vecs, k)

    def get(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.index.get(ids)

    def upsert(self, ids: list[str], vecs: np.ndarray, version: int, update_graph: bool = True) -> None:
        self.index.upsert(ids, vecs, version, update_graph)

    def remove(self, ids: list[str]) -> int:
        return self.index.remove(ids)

    def neighbours(self, ids: list[str], vecs: np.ndarray | None = None, version: int | None = None) -> list[list[str]]:
        return self.index.neighbours(ids, vecs, version)

    def add_texts(self, ids: list[str], texts: list[str]) -> None:
        self.index.add_texts(ids, texts)

    def texts(self, ids: list[str]) -> list[str]:
        return self.index.texts(ids)

    def doc_ids(self) -> list[str]:
        return self.index.doc_ids()

    def staleness(self, version: int, tolerance: int | None = None) -> StalenessStats:
        return self.index.staleness(version, tolerance)

    def save(self, path: str) -> None:
        """Snapshot this shard to ``path`` (atomic)."""
        self.index.save(path, meta=self._meta())

    def restore(self, path: str) -> None:
        """Load the snapshot at ``path`` (refused unless written by this shard number of the
        same shard count) and record it as the restart point."""
        self.index.restore(path, expect_meta=self._meta())
        self.record_restore_point(path)

    def record_restore_point(self, path: str) -> None:
        """Remember ``path`` in ``state_dir`` as the snapshot to reload after a restart."""
        pointer = self._pointer()
        if pointer is not None:
            atomic_write_text(pointer, json.dumps({"snapshot": os.path.abspath(path)}))


class CorpusIndexClient:
    """The sharded corpus index, usable from any Ray worker: same read/write methods as
    :class:`CorpusIndex` plus :meth:`refresh`, :meth:`full_encode`, :meth:`snapshot` and
    :meth:`restore`. Picklable (it holds actor handles), so it can be passed to Ray tasks.

    Detached actors (the default) outlive the job that created them, state included: a later
    client with the same ``name`` and ``namespace`` attaches to them. The client refuses actors
    whose index settings (:data:`SHARD_KEYS`) differ from its config; call :meth:`shutdown` when
    done, or give each run its own ``name``.

    Args:
        config: the environment config (or a mapping for :meth:`EnvConfig.from_dict`).
        create: create missing shard actors (``get_if_exists``); False only connects and raises
            if a shard does not exist.
    """

    def __init__(self, config: EnvConfig | Mapping[str, Any], create: bool = True) -> None:
        self.config = config if isinstance(config, EnvConfig) else EnvConfig.from_dict(config)
        if not ray.is_initialized():
            raise RuntimeError("CorpusIndexClient needs a Ray session: call ray.init() first")
        cfg = self.config
        self.shards = []
        for i in range(cfg.num_shards):
            name = shard_name(cfg, i)
            if create:
                options = dict(name=name, namespace=cfg.namespace, get_if_exists=True, num_cpus=cfg.num_cpus,
                               max_concurrency=cfg.max_concurrency, max_restarts=cfg.max_restarts,
                               max_task_retries=cfg.max_task_retries)
                if cfg.detached:
                    options["lifetime"] = "detached"
                handle = ray.remote(CorpusIndexShard).options(**options).remote(cfg.to_dict(), i, cfg.num_shards)
            else:
                try:
                    handle = ray.get_actor(name, namespace=cfg.namespace)
                except ValueError:
                    raise ValueError(f"no corpus index shard {name!r} in Ray namespace {cfg.namespace!r}; "
                                     "create the index first (CorpusIndexClient(config, create=True))") from None
            self.shards.append(handle)
        for info in self.info():
            theirs = info["config"]
            differ = [k for k in SHARD_KEYS if theirs[k] != getattr(cfg, k)]
            if differ:
                raise ValueError(
                    f"shard actor {shard_name(cfg, info['shard'])!r} runs with "
                    f"{ {k: theirs[k] for k in differ} }, this client's config has "
                    f"{ {k: getattr(cfg, k) for k in differ} }; use another name or shut the old actors down"
                )

    @classmethod
    def connect(cls, config: EnvConfig | Mapping[str, Any]) -> CorpusIndexClient:
        """Attach to shards another process created."""
        return cls(config, create=False)

    # ------------------------------------------------------------------ routing
    def _route(self, ids: Sequence[str]) -> list[np.ndarray]:
        """Positions of ``ids`` owned by each shard."""
        owner = shard_of(ids, len(self.shards))
        return [np.flatnonzero(owner == s) for s in range(len(self.shards))]

    def _scatter(self, method: str, ids: Sequence[str], *per_id: np.ndarray | None, **kwargs: Any) -> list[tuple[np.ndarray, Any]]:
        """Call ``method`` on every shard owning some of ``ids`` (with the matching rows of each
        ``per_id`` array); returns ``(positions, result)`` per called shard."""
        calls = []
        for shard, pos in zip(self.shards, self._route(ids)):
            if len(pos):
                args = [[ids[j] for j in pos]] + [None if a is None else np.asarray(a)[pos] for a in per_id]
                calls.append((pos, getattr(shard, method).remote(*args, **kwargs)))
        results = ray.get([ref for _, ref in calls])
        return [(pos, res) for (pos, _), res in zip(calls, results)]

    # ------------------------------------------------------------------ reads
    def search(self, query_vecs: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-k over all shards (see :meth:`CorpusIndex.search`)."""
        q = np.ascontiguousarray(query_vecs, dtype=np.float32)
        parts = ray.get([s.search.remote(q, k) for s in self.shards])
        if len(parts) == 1:
            return parts[0]
        scores = np.concatenate([p[1] for p in parts], axis=1)  # (Q, shards * k), -inf padded
        ids = np.full(scores.shape, None, dtype=object)
        for j, (shard_ids, _) in enumerate(parts):
            for i, row in enumerate(shard_ids):
                ids[i, j * k : j * k + len(row)] = row
        best = topk_merge(scores, k)
        return ([[d for d in ids[i, row] if d is not None] for i, row in enumerate(best)],
                np.take_along_axis(scores, best, axis=1))

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """See :meth:`CorpusIndex.get`."""
        parts = self._scatter("get", ids)
        dim = next((res[0].shape[1] for _, res in parts), 0)
        vecs = np.zeros((len(ids), dim), np.float32)
        versions = np.full(len(ids), -1, np.int64)
        found = np.zeros(len(ids), bool)
        for pos, (v, ver, f) in parts:
            vecs[pos], versions[pos], found[pos] = v, ver, f
        return vecs, versions, found

    def neighbours(self, ids: Sequence[str], vecs: np.ndarray | None = None, version: int | None = None) -> list[list[str]]:
        """See :meth:`CorpusIndex.neighbours`; each shard's graph links documents of that shard."""
        out: list[list[str]] = [[] for _ in ids]
        for pos, res in self._scatter("neighbours", ids, vecs, version=version):
            for j, nb in zip(pos, res):
                out[j] = nb
        return out

    def texts(self, ids: Sequence[str]) -> list[str]:
        out: list[str] = [""] * len(ids)
        for pos, res in self._scatter("texts", ids):
            for j, t in zip(pos, res):
                out[j] = t
        return out

    def doc_ids(self) -> list[str]:
        """Ids of all documents with a text, shard by shard."""
        return [i for part in ray.get([s.doc_ids.remote() for s in self.shards]) for i in part]

    def staleness(self, version: int, tolerance: int | None = None) -> StalenessStats:
        return StalenessStats.merge(ray.get([s.staleness.remote(version, tolerance) for s in self.shards]))

    def info(self) -> list[dict[str, Any]]:
        """Per-shard :meth:`CorpusIndexShard.info` (sizes, dimension, restart restore point, config)."""
        return ray.get([s.info.remote() for s in self.shards])

    # ------------------------------------------------------------------ writes
    def add_texts(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        self._scatter("add_texts", ids, np.asarray(texts, dtype=object))

    def upsert(self, ids: Sequence[str], vecs: np.ndarray, version: int, update_graph: bool = True) -> None:
        """See :meth:`CorpusIndex.upsert` (each shard applies its part atomically)."""
        vecs = np.asarray(vecs, dtype=np.float32)
        if len(vecs) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(vecs)} vectors")
        self._scatter("upsert", ids, vecs, version=version, update_graph=update_graph)

    def remove(self, ids: Sequence[str]) -> int:
        return sum(res for _, res in self._scatter("remove", ids))

    # ------------------------------------------------------------------ environment
    def refresh(self, query_vecs: np.ndarray, relevant_ids: Sequence[Sequence[str]], version: int, encode: EncodeFn) -> RefreshResult:
        """One step's selective refresh over the shards (see :meth:`RefreshPlanner.refresh`)."""
        return RefreshPlanner(self.config).refresh(self, query_vecs, relevant_ids, version, encode)

    def full_encode(self, encode: EncodeFn, version: int) -> int:
        """Encode the whole corpus (see :func:`verl_search_r3.env.planner.full_encode`)."""
        return full_encode(self, encode, version, self.config.encode_batch_size, self.config.progress)

    def snapshot(self, path: str) -> None:
        """Atomically snapshot every shard into ``path/shard-XXXXX-of-XXXXX`` plus a manifest, and
        make it the snapshot each shard reloads after a restart. ``path`` must be on a file
        system every shard can reach."""
        n = len(self.shards)
        with atomic_directory(path) as tmp:
            ray.get([s.save.remote(os.path.join(tmp, _shard_dir(i, n))) for i, s in enumerate(self.shards)])
            write_snapshot_files(tmp, {}, {"num_shards": n, "shards": [_shard_dir(i, n) for i in range(n)]})
        ray.get([s.record_restore_point.remote(os.path.join(path, _shard_dir(i, n))) for i, s in enumerate(self.shards)])

    def restore(self, path: str) -> None:
        """Load a snapshot written by :meth:`snapshot` with the same number of shards."""
        meta = read_manifest(path)["meta"]
        n = len(self.shards)
        if meta.get("num_shards") != n:
            raise SnapshotError(f"{os.path.join(path, 'manifest.json')}: snapshot has {meta.get('num_shards')} shards, "
                                f"this index has {n}")
        ray.get([s.restore.remote(os.path.join(path, _shard_dir(i, n))) for i, s in enumerate(self.shards)])

    def shutdown(self) -> None:
        """Kill the shard actors (they are detached by default and outlive their creator)."""
        for s in self.shards:
            ray.kill(s, no_restart=True)
