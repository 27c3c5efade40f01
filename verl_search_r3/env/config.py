"""Configuration of the RL environment: one flat dataclass whose fields are hydra keys.

Every knob of the corpus index, the refresh planner and the Ray actors is a field here with a
default and a one-line description, so a recipe sets them as ``search_r3.env.<field>=...`` and
the trainer builds the config with :meth:`EnvConfig.from_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from ..config_utils import dataclass_from_dict

__all__ = ["EnvConfig", "INDEX_TYPES", "DTYPES", "ANN_CODES"]

INDEX_TYPES = ("flat", "ivf", "hnsw")
DTYPES = ("float32", "float16", "bfloat16")
ANN_CODES = ("sq8", "fp16", "flat")


@dataclass(frozen=True)
class EnvConfig:
    """Knobs of the Search-R3 RL environment (index, graph, refresh, snapshots, Ray).

    Index
        dim: vector dimension; 0 = taken from the first upsert (or the snapshot on load).
        dtype: storage type of the vectors: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (both
            halve memory; the policy's forward runs in bfloat16 anyway). bfloat16 is searched by
            torch's bfloat16 matrix product without conversion (fast on CPUs with AVX512-BF16
            or AMX; elsewhere float16 is faster).
        normalize: L2-normalise stored vectors and queries so inner product = cosine.
        index_type: ``"flat"`` (exact inner product, default), ``"ivf"`` or ``"hnsw"`` (approximate).
        ivf_nlist: IVF inverted lists (clusters); needs at least this many vectors to train.
        ivf_nprobe: IVF lists visited per query (recall/speed trade-off).
        hnsw_m: HNSW links per node.
        hnsw_ef_construction: HNSW candidate list size while inserting.
        hnsw_ef_search: HNSW candidate list size while searching (recall/speed trade-off).
        hnsw_update_min_cosine: a replaced vector whose cosine with its previous version is at
            least this is overwritten in place in the HNSW graph (links kept, no insertion
            cost); one that moved more is tombstoned and inserted again.
        ann_codes: the IVF/HNSW structure's own copy of the vectors: ``"sq8"`` (1 byte per
            dimension), ``"fp16"`` or ``"flat"`` (float32). It only finds candidates: the scores
            returned are recomputed from the stored vectors, so they are exact either way.
        rescore_factor: approximate searches (IVF, HNSW, the bfloat16 flat kernel) fetch this
            many times ``k`` candidates and return the ``k`` best by exact score.
        ann_train_size: vectors sampled to train an IVF/HNSW structure (IVF quantiser, SQ8
            value ranges); IVF wants at least ``39 * ivf_nlist``. Build time grows with
            ``ann_train_size * ivf_nlist * dim``.
        ann_rebuild_fraction: rebuild an IVF/HNSW structure from the stored vectors once the
            vectors replaced or removed since its last build exceed this fraction (IVF retrains
            its quantiser on the drifted vectors; HNSW drops its tombstones).
        search_chunk_rows: rows per block of the flat search and of IVF/HNSW builds (float16
            storage is converted into one reused float32 buffer of this many rows).

    Neighbour graph
        graph_k: neighbours kept per document (0, the default, disables the graph and the
            expansion: measured at 100k-1M documents it added about 1% encodes and no reward
            agreement at ``candidates_k=50`` while costing more than the search itself).
        graph_refresh_age: a document's neighbour row is recomputed (when asked for, or when
            the document is upserted) once it is this many policy versions old (0 = always).

    Refresh planner
        candidates_k: top-K candidates per query taken from the current (possibly stale) index.
        expand_top: per query, the graph neighbours of this many best (fresh) candidates and
            of all relevant docs join the pool (0 disables the expansion).
        staleness_tolerance: a vector at most this many versions old counts as fresh.
        budget: most documents encoded per refresh call besides the relevant ones (None = no cap).
        budget_per_query: the same cap per (valid) query vector of the step, so it follows the
            batch size: a refresh encodes at most ``budget_per_query * Q`` besides the relevant
            ones (None = no per-query cap; with ``budget`` too, the smaller cap applies).
        full_refresh_every: re-encode the whole corpus when ``version % N == 0`` (0 = never).
        encode_batch_size: texts per call of the ``encode`` callback.
        progress: show a tqdm progress bar on full encodes.

    Snapshots
        verify_checksums: check SHA-256 of every snapshot file on load.

    Ray actors
        name: base name of the shard actors (``<name>-<i>-of-<n>``).
        namespace: Ray namespace of the actors.
        num_shards: actors the corpus is split across (by a stable hash of the doc id).
        num_cpus: Ray CPUs reserved per shard (verl's placement groups hold the GPUs).
        search_threads: FAISS OpenMP threads per shard; 0 = ``ceil(num_cpus)``.
        max_concurrency: concurrent calls one shard serves (readers run in parallel).
        max_restarts: restarts of a crashed shard; a restarted shard reloads its last snapshot.
        max_task_retries: retries of a call interrupted by a shard crash (all calls are idempotent).
        detached: keep the actors alive after the creating process exits (kill with ``shutdown``);
            False (Ray's default): they end with it.
        state_dir: directory where shards record their last snapshot path, read on restart
            (None = a restarted shard starts empty; the ``search_r3`` trainer sets it to a folder
            under ``trainer.default_local_dir``).
        on_shard_restart: what a client does about a shard that crashed and restarted:
            ``reencode`` (log it, re-add the texts and re-encode the vectors it lost, count it in
            the ``env/`` metrics) or ``refuse`` (stop with an error).
    """

    dim: int = 0
    dtype: str = "float32"
    normalize: bool = True
    index_type: str = "flat"
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 128
    hnsw_update_min_cosine: float = 0.9
    ann_codes: str = "sq8"
    rescore_factor: float = 2.0
    ann_train_size: int = 65536
    ann_rebuild_fraction: float = 0.25
    search_chunk_rows: int = 65536

    graph_k: int = 0
    graph_refresh_age: int = 10

    candidates_k: int = 50
    expand_top: int = 5
    staleness_tolerance: int = 0
    budget: int | None = None
    budget_per_query: int | None = 32
    full_refresh_every: int = 0
    encode_batch_size: int = 256
    progress: bool = True

    verify_checksums: bool = True

    name: str = "search_r3_corpus_index"
    namespace: str = "verl_search_r3"
    num_shards: int = 1
    num_cpus: float = 1.0
    search_threads: int = 0
    max_concurrency: int = 16
    max_restarts: int = 3
    max_task_retries: int = 2
    detached: bool = False
    state_dir: str | None = None
    on_shard_restart: Literal["reencode", "refuse"] = "reencode"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"env dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.ann_codes not in ANN_CODES:
            raise ValueError(f"env ann_codes must be one of {ANN_CODES}, got {self.ann_codes!r}")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"env index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if self.on_shard_restart not in ("reencode", "refuse"):
            raise ValueError(f"env on_shard_restart must be 'reencode' or 'refuse', got {self.on_shard_restart!r}")
        positive = ("ivf_nlist", "ivf_nprobe", "ann_train_size", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                    "search_chunk_rows", "candidates_k", "encode_batch_size", "num_shards", "max_concurrency")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"env {name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("dim", "graph_k", "graph_refresh_age", "expand_top", "staleness_tolerance",
                        "full_refresh_every", "search_threads", "max_restarts", "max_task_retries")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"env {name} must be >= 0, got {getattr(self, name)}")
        for name in ("budget", "budget_per_query"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"env {name} must be None or >= 0, got {getattr(self, name)}")
        if self.rescore_factor < 1.0:
            raise ValueError(f"env rescore_factor must be >= 1, got {self.rescore_factor}")
        if self.ann_rebuild_fraction <= 0.0:
            raise ValueError(f"env ann_rebuild_fraction must be > 0, got {self.ann_rebuild_fraction}")
        if self.num_cpus <= 0:
            raise ValueError(f"env num_cpus must be > 0, got {self.num_cpus}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> EnvConfig:
        """Build from a (hydra/OmegaConf or plain) mapping; unknown keys are an error naming them."""
        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True)
        if values is not None and not isinstance(values, Mapping):
            raise TypeError(f"search_r3.env must be a mapping, got {type(values).__name__}")
        return dataclass_from_dict(cls, {**dict(values or {}), **overrides}, "search_r3.env")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every field."""
        return asdict(self)

    def replace(self, **changes: Any) -> EnvConfig:
        """A copy with some fields changed (validated again)."""
        return EnvConfig.from_dict(self.to_dict(), **changes)
