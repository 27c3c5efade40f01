"""The Search-R3 RL environment: a versioned corpus index with selective refresh.

Plain-Python core (FAISS + numpy, no Ray):

* :class:`EnvConfig` — every knob, buildable from a hydra dict.
* :class:`CorpusIndex` — texts, vectors with a policy version each, exact/IVF/HNSW search,
  incrementally maintained neighbour graph, staleness statistics, atomic pickle-free snapshots.
* :class:`RefreshPlanner` — per step, re-encodes only what the rewards depend on and returns a
  :class:`RefreshResult` (fresh candidate pool + cosine scores) for the reward manager;
  :func:`full_encode` for the first encode and periodic full refreshes.

The Ray wrapper (named shard actors and the :class:`~verl_search_r3.env.actor.CorpusIndexClient`)
is in :mod:`verl_search_r3.env.actor`, imported on demand so the core does not need Ray.
"""

from .config import EnvConfig
from .corpus import load_corpus_texts
from .index import CorpusIndex
from .planner import EncodeFn, IndexLike, RefreshPlanner, RefreshResult, RefreshStats, encode_texts, full_encode
from .snapshot import SnapshotError
from .store import StalenessStats

__all__ = [
    "EnvConfig",
    "CorpusIndex",
    "RefreshPlanner",
    "RefreshResult",
    "RefreshStats",
    "StalenessStats",
    "SnapshotError",
    "EncodeFn",
    "IndexLike",
    "encode_texts",
    "full_encode",
    "load_corpus_texts",
]
