"""Retrievers over an in-memory corpus: BM25, a sentence-transformers folder, a Search-R3 encoder.

Every retriever answers ``search(queries, k) -> (ids, scores)``: ``ids`` is a list of Q lists of
at most ``k`` document ids, best first, ``scores`` a ``(Q, k')`` float32 array. The evaluation
(:mod:`verl_search_r3.evaluate`) and the Search-R1 search tool use them alike.

* BM25: :class:`verl_search_r3.retrieval.bm25.BM25Retriever` (already has that interface).
* Dense: :class:`DenseRetriever` = a :class:`DenseIndex` (exact inner product, FAISS ``IndexFlatIP``;
  vectors are unit norm, so this is cosine) + a query-encoding function; :func:`stream_search` for
  corpora streamed in chunks (memory independent of the corpus size). The corpus side is built
  by :func:`build_dense_index`, optionally through a :class:`VectorCache` on disk keyed by
  (encoder fingerprint, corpus hash, prompt, max length).

Corpus texts are the caller's: for BEIR folders, ``format_document(title, text)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import faiss
import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write
from ..prompts import embed_prompt_ids, render_embed_prompt
from .encoder import MissingPolicy, QueryEncoding, SearchR3Encoder

__all__ = [
    "Retriever",
    "DenseIndex",
    "DenseRetriever",
    "VectorCache",
    "SearchR3Queries",
    "SentenceTransformerEncoder",
    "build_dense_index",
    "corpus_hash",
    "module_fingerprint",
    "search_r3_document_key",
    "search_r3_index",
    "sentence_transformer_retriever",
    "stream_search",
]

EncodeFn = Callable[[Sequence[str]], np.ndarray]


class Retriever(Protocol):
    """Anything that ranks corpus documents for text queries."""

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[str]], np.ndarray]: ...


# ---------------------------------------------------------------------- identities and cache


def module_fingerprint(module: nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 over every state-dict entry's name, shape, dtype and ``samples_per_tensor`` evenly
    spaced values. Cheap for any model size, and changes whenever training changed the weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].contiguous().cpu()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def corpus_hash(ids: Sequence[str], texts: Sequence[str]) -> str:
    """sha256 of the ordered ``(id, text)`` pairs."""
    h = hashlib.sha256()
    for doc_id, text in zip(ids, texts, strict=True):
        h.update(json.dumps([doc_id, text], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


class VectorCache:
    """Corpus vectors on disk, one ``.npz`` (no pickles) per key, written atomically.

    A file holds ``vectors (N, H) float32``, ``ids (N,)`` unicode and ``key`` (the JSON of the key);
    both are checked on load, so a stale or colliding file is ignored, never used.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def path(self, key: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return os.path.join(self.folder, f"{digest}.npz")

    def load(self, key: dict[str, Any], ids: Sequence[str]) -> np.ndarray | None:
        """The cached vectors for ``key`` and exactly these ``ids``, or ``None``."""
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != json.dumps(key, sort_keys=True) or f["ids"].tolist() != list(ids):
                return None
            return f["vectors"].astype(np.float32, copy=False)

    def save(self, key: dict[str, Any], ids: Sequence[str], vectors: np.ndarray) -> str:
        """Write atomically (see :func:`atomic_write`); returns the path."""
        path = self.path(key)
        arrays = {
            "vectors": np.asarray(vectors, dtype=np.float32),
            "ids": np.asarray(list(ids), dtype=str),
            "key": np.asarray(json.dumps(key, sort_keys=True)),
        }
        atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")
        return path


# ---------------------------------------------------------------------- dense search


class DenseIndex:
    """Exact maximum-inner-product search over ``vectors (N, H)`` (FAISS ``IndexFlatIP``)."""

    def __init__(self, ids: Sequence[str], vectors: np.ndarray):
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
        if not len(ids):
            raise ValueError("cannot index an empty corpus")
        self.ids = list(ids)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index = faiss.IndexFlatIP(self.vectors.shape[1])
        self._index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` per row of ``query_vectors (Q, H)``: ``(ids, scores (Q, k'))``, ``k' = min(k, N)``."""
        k = min(k, len(self.ids))
        scores, idx = self._index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
        return [[self.ids[j] for j in row] for row in idx], scores


def stream_search(query_vectors: np.ndarray, chunks: Iterable[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner product over a corpus that arrives in chunks of vectors.

    Memory is ``O(Q·k)`` plus one chunk (FAISS ``ResultHeap``), whatever the corpus size.

    Args:
        query_vectors: ``(Q, H)``.
        chunks: ``(n_i, H)`` arrays, in corpus order.
        k: results per query.

    Returns:
        ``scores (Q, k')`` best first and ``positions (Q, k')`` int64 corpus positions (row of
        the concatenated chunks), ``k' = min(k, N)``.
    """
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    offset = 0
    for vectors in chunks:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not len(vectors):
            continue
        scores, idx = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, idx + offset)
        offset += len(vectors)
    heap.finalize()
    width = min(k, offset)  # rows are padded with -1 past the corpus size
    return heap.D[:, :width], heap.I[:, :width].astype(np.int64)


def build_dense_index(
    ids: Sequence[str],
    texts: Sequence[str],
    encode_documents: EncodeFn,
    cache: VectorCache | None = None,
    key: dict[str, Any] | None = None,
) -> DenseIndex:
    """Encode the corpus (or load it from ``cache`` under ``key`` + the corpus hash) and index it."""
    full_key = {**(key or {}), "corpus": corpus_hash(ids, texts)}
    vectors = cache.load(full_key, ids) if cache is not None and key is not None else None
    if vectors is None:
        vectors = encode_documents(texts)
        if cache is not None and key is not None:
            cache.save(full_key, ids, vectors)
    return DenseIndex(ids, vectors)


class DenseRetriever:
    """A :class:`DenseIndex` searched with ``encode_queries(texts) -> (Q, H)`` vectors."""

    def __init__(self, index: DenseIndex, encode_queries: EncodeFn):
        self.index = index
        self.encode_queries = encode_queries

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        return self.index.search(self.encode_queries(queries), k)


# ---------------------------------------------------------------------- sentence-transformers


class SentenceTransformerEncoder:
    """A sentence-transformers model folder; vectors are L2-normalised float32.

    Queries and documents use the model's ``"query"``/``"document"`` prompts when it defines them,
    or the given prefixes instead (e.g. ``"query: "`` / ``"passage: "`` for E5).

    Args:
        path: model folder (``modules.json`` or ``config.json``).
        device: torch device; default CUDA if available, else CPU.
        batch_size: texts per forward.
        max_length: override the model's ``max_seq_length``.
        show_progress: progress bars.
        query_prefix, document_prefix: text prepended to queries / documents; when set, it
            replaces the model's own prompt of that kind.
    """

    def __init__(
        self,
        path: str,
        device: str | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        show_progress: bool = True,
        query_prefix: str = "",
        document_prefix: str = "",
    ):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"sentence-transformers folder {path!r} does not exist")
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("modules.json", "config.json")):
            raise ValueError(f"{path!r} is not a sentence-transformers model folder (no modules.json or config.json)")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=device, local_files_only=True)
        if max_length is not None:
            self.model.max_seq_length = max_length
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.prefixes = {"query": query_prefix, "document": document_prefix}

    def _encode(self, texts: Sequence[str], prompt_name: str) -> np.ndarray:
        prefix = self.prefixes[prompt_name]
        return self.model.encode(
            list(texts),
            prompt=prefix or None,
            prompt_name=prompt_name if not prefix and prompt_name in self.model.prompts else None,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=self.show_progress,
        ).astype(np.float32, copy=False)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """``(Q, H)`` unit vectors."""
        return self._encode(texts, "query")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, H)`` unit vectors."""
        return self._encode(texts, "document")

    def cache_key(self) -> dict[str, Any]:
        """What the document vectors depend on besides the corpus."""
        return {
            "kind": "sentence-transformers",
            "model": module_fingerprint(self.model),
            "max_length": self.model.max_seq_length,
            "prompt": self.prefixes["document"] or self.model.prompts.get("document", ""),
        }


def sentence_transformer_retriever(
    path: str, ids: Sequence[str], texts: Sequence[str], cache: VectorCache | None = None, **encoder_kwargs: Any
) -> DenseRetriever:
    """Encode (or load from ``cache``) the corpus with a sentence-transformers folder and return its retriever."""
    st = SentenceTransformerEncoder(path, **encoder_kwargs)
    return DenseRetriever(build_dense_index(ids, texts, st.encode_documents, cache, st.cache_key()), st.encode_queries)


# ---------------------------------------------------------------------- Search-R3


def search_r3_document_key(encoder: SearchR3Encoder, max_length: int | None) -> dict[str, Any]:
    """What Search-R3 document vectors depend on besides the corpus: weights (incl. dtype; the
    embed token's input row in full, since the sampled fingerprint may miss one row), tokenizer
    behaviour, document prompt and length budget."""
    probe = "Probe title. Probe text with numbers 1.5 and symbols <>&"
    embed_row = encoder.model.get_input_embeddings().weight[encoder.embed_id].detach().contiguous().cpu()
    return {
        "kind": "search-r3",
        "model": module_fingerprint(encoder.model),
        "embed_row": hashlib.sha256(embed_row.view(torch.uint8).numpy().tobytes()).hexdigest(),
        "prompt": render_embed_prompt(encoder.tokenizer, "{document}", "document", encoder.templates),
        "probe_ids": embed_prompt_ids(encoder.tokenizer, probe, "document", None, encoder.templates),
        "max_length": max_length,
    }


def search_r3_index(
    encoder: SearchR3Encoder,
    ids: Sequence[str],
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int | None = 512,
    cache: VectorCache | None = None,
) -> DenseIndex:
    """Corpus index of a Search-R3 encoder (documents embedded directly), shared by its query modes."""
    return build_dense_index(
        ids,
        texts,
        lambda docs: encoder.encode_documents(docs, batch_size=batch_size, max_length=max_length),
        cache,
        search_r3_document_key(encoder, max_length),
    )


class SearchR3Queries:
    """Query side of a Search-R3 :class:`DenseRetriever`: ``encode_queries`` with fixed settings.

    ``last`` keeps the most recent :class:`~verl_search_r3.retrieval.encoder.QueryEncoding` (analyses,
    forced count) for reporting.
    """

    def __init__(
        self,
        encoder: SearchR3Encoder,
        reasoning: bool = True,
        max_new_tokens: int = 256,
        batch_size: int = 16,
        max_length: int | None = 512,
        on_missing: MissingPolicy = "append",
    ):
        self.encoder = encoder
        self.kwargs = dict(reasoning=reasoning, max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length, on_missing=on_missing)
        self.last: QueryEncoding | None = None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.last = self.encoder.encode_queries(texts, **self.kwargs)
        return self.last.vectors
