"""The search index folder written by ``build_index`` and read by the retriever.

```
<index_dir>/
  search_r1_index.json   IndexManifest: retriever kind, model + fingerprint, prefixes, counts, shards
  corpus.parquet         doc_id, title, text: every indexed document
  index/                 corpus-index snapshot (verl_search_r3.env), one sub-folder per shard:
                         texts in ``contents`` form ("title\\ntext"), plus vectors for dense kinds
  bm25/                  bm25s index (kind bm25)
```

The snapshot is the one :meth:`~verl_search_r3.env.actor.CorpusIndexClient.restore` loads into
the shard actors (or :meth:`~verl_search_r3.env.CorpusIndex.load` in-process for one shard).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..atomic import atomic_write_text
from ..env import EnvConfig

__all__ = ["IndexManifest", "KINDS", "INDEX_MANIFEST", "CORPUS_FILE", "SNAPSHOT_DIR", "BM25_DIR", "MANIFEST_VERSION"]

INDEX_MANIFEST = "search_r1_index.json"
CORPUS_FILE = "corpus.parquet"
SNAPSHOT_DIR = "index"
BM25_DIR = "bm25"
MANIFEST_VERSION = 1
KINDS: tuple[str, ...] = ("bm25", "sentence_transformers", "search_r3")


@dataclass(frozen=True)
class IndexManifest:
    """What an index folder holds and how its queries must be encoded.

    Attributes:
        index_id: random id of this build; names the Ray actors that serve it.
        kind: ``bm25``, ``sentence_transformers`` or ``search_r3``.
        num_docs: documents indexed.
        num_shards: shards of the corpus-index snapshot.
        env: the :class:`~verl_search_r3.env.EnvConfig` fields of the shards (dtype, index type, ...).
        model: the document encoder folder (dense kinds).
        model_fingerprint: :func:`~verl_search_r3.search_r1.models.weights_fingerprint` of it.
        query_prefix, document_prefix: sentence-transformers text prefixes used.
        max_length: document token budget used.
        build: the build's options, inputs (SHA-256), skipped rows and timing (informational).
    """

    index_id: str
    kind: str
    num_docs: int
    num_shards: int
    env: dict[str, Any]
    model: str | None = None
    model_fingerprint: str | None = None
    query_prefix: str = ""
    document_prefix: str = ""
    max_length: int | None = None
    build: dict[str, Any] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def dense(self) -> bool:
        return self.kind != "bm25"

    def env_config(self, namespace: str, num_cpus: float, detached: bool) -> EnvConfig:
        """The config of the shard actors serving this index (named after :attr:`index_id`)."""
        return EnvConfig.from_dict(
            self.env, name=f"search_r1_index_{self.index_id[:12]}", namespace=namespace, num_cpus=num_cpus, detached=detached, progress=False
        )

    def save(self, folder: str) -> None:
        atomic_write_text(os.path.join(folder, INDEX_MANIFEST), json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, folder: str) -> IndexManifest:
        path = os.path.join(folder, INDEX_MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder!r} is not a search index (no {INDEX_MANIFEST}); build one with "
                                    "python -m verl_search_r3.search_r1.build_index")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable index manifest ({e}); rebuild the index") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: not an index manifest (a JSON {type(values).__name__}, expected an object)")
        if values.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: manifest version {values.get('manifest_version')!r}, this code reads {MANIFEST_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown manifest fields {unknown}")
        required = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"{path}: the manifest lacks {missing}; rebuild the index")
        return cls(**values)
