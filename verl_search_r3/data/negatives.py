"""Hard negatives for (query, positive) pairs: BM25 (``bm25s`` via :class:`BM25Retriever`) or a
dense sentence-transformers model, plus negatives the input names itself.

For each query the retriever's ranked list is cut to a depth window (1-based ranks
``min_rank..max_rank``, counted in the retriever's own list); every document relevant to the
query (grade > 0) is removed. With a false-negative margin ``m`` a candidate is kept for a pair
only if ``score < s_pos - m * |s_pos|`` where ``s_pos`` is the positive's score (NV-Retriever's
"TopK-PercPos" with ``m = 0.05``); a positive outside the retrieved list scores at most as high as
every candidate, so it keeps none. Given negatives come first, mined ones fill up to
``num_negatives``; ``sampling`` picks the highest-ranked (``top``) or a seeded random subset
(``random``, kept in rank order).

Memory: BM25 needs every text once while it indexes (:class:`BM25Retriever` takes a list); the
dense searcher streams the corpus parquet in chunks through
:func:`~verl_search_r3.retrieval.dense.stream_search`, which keeps only a running top-k per query,
so its memory does not grow with the corpus.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..prompts import format_document
from .collection import Collection

__all__ = ["NegativeOptions", "MinedNegatives", "mine_negatives", "read_corpus_texts"]

Sampling = Literal["top", "random"]


@dataclass(frozen=True)
class NegativeOptions:
    """How hard negatives are found and chosen.

    Attributes:
        method: ``none`` (only negatives the input names), ``bm25``, or ``dense:<folder>`` with
            any sentence-transformers model folder.
        num_negatives: negatives per (query, positive) pair, at most.
        min_rank, max_rank: the depth window in the retriever's ranking, 1-based, inclusive.
        sampling: ``top`` (highest-ranked candidates) or ``random`` (seeded, per pair).
        false_negative_margin: drop candidates within this fraction of the positive's score; None = off.
        search_batch_size: queries per retrieval call (one progress step).
        dense_batch_size: texts per encoder forward pass.
        dense_corpus_chunk: documents encoded and searched at a time (bounds dense memory).
        dense_device: torch device for the encoder; None picks CUDA when available.
        dense_query_prefix, dense_document_prefix: prepended to texts (e.g. ``"query: "`` for E5).
    """

    method: str = "none"
    num_negatives: int = 7
    min_rank: int = 10
    max_rank: int = 100
    sampling: Sampling = "top"
    false_negative_margin: float | None = None
    search_batch_size: int = 256
    dense_batch_size: int = 64
    dense_corpus_chunk: int = 16_384
    dense_device: str | None = None
    dense_query_prefix: str = ""
    dense_document_prefix: str = ""

    def __post_init__(self) -> None:
        if self.method not in ("none", "bm25") and not (self.method.startswith("dense:") and len(self.method) > len("dense:")):
            raise ValueError(f"negatives method {self.method!r}: use none, bm25 or dense:<model folder>")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if not 1 <= self.min_rank <= self.max_rank:
            raise ValueError(f"need 1 <= min_rank <= max_rank, got {self.min_rank}..{self.max_rank}")
        if self.sampling not in ("top", "random"):
            raise ValueError(f"sampling must be 'top' or 'random', got {self.sampling!r}")
        if self.false_negative_margin is not None and not 0 <= self.false_negative_margin < 1:
            raise ValueError(f"false_negative_margin must be in [0, 1), got {self.false_negative_margin}")
        for name in ("search_batch_size", "dense_batch_size", "dense_corpus_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def dense_model(self) -> str | None:
        """The model folder of ``dense:<folder>``, else None."""
        return self.method.split(":", 1)[1] if self.method.startswith("dense:") else None


@dataclass
class MinedNegatives:
    """Chosen negatives per ``(query id, positive id)`` and counts for the summary."""

    by_pair: dict[tuple[str, str], list[str]]
    stats: dict[str, int]


def read_corpus_texts(corpus_path: str, batch_rows: int) -> Iterator[tuple[pa.Array, list[str]]]:
    """``(doc ids, texts)`` per batch of a corpus parquet, texts as ``format_document(title, text)``."""
    for batch in pq.ParquetFile(corpus_path).iter_batches(batch_size=batch_rows, columns=["doc_id", "title", "text"]):
        titles, texts = batch.column("title").to_pylist(), batch.column("text").to_pylist()
        yield batch.column("doc_id"), [format_document(t, x) for t, x in zip(titles, texts)]


def _bm25_search(
    corpus_path: str, queries: list[str], k: int, opts: NegativeOptions, batch_rows: int, progress: bool
) -> Iterator[tuple[list[list[str]], np.ndarray]]:
    """BM25 rankings, one ``(ids, scores)`` per batch of queries."""
    from ..retrieval.bm25 import BM25Retriever

    ids: list[str] = []
    texts: list[str] = []
    for doc_ids, batch_texts in read_corpus_texts(corpus_path, batch_rows):
        ids.extend(doc_ids.to_pylist())
        texts.extend(batch_texts)
    retriever = BM25Retriever(ids, texts, show_progress=progress)
    del texts  # the index keeps token ids only
    for start in tqdm(range(0, len(queries), opts.search_batch_size), desc="bm25 search", disable=not progress, leave=False):
        yield retriever.search(queries[start : start + opts.search_batch_size], k)


def _dense_search(
    corpus_path: str, queries: list[str], k: int, opts: NegativeOptions, progress: bool
) -> Iterator[tuple[list[list[str]], np.ndarray]]:
    """Exact cosine rankings with a sentence-transformers model, streaming the corpus in chunks."""
    import torch

    from ..retrieval.dense import SentenceTransformerEncoder, stream_search

    model = SentenceTransformerEncoder(
        opts.dense_model,
        device=opts.dense_device or ("cuda" if torch.cuda.is_available() else "cpu"),
        batch_size=opts.dense_batch_size,
        show_progress=False,
        query_prefix=opts.dense_query_prefix,
        document_prefix=opts.dense_document_prefix,
    )
    id_chunks: list[pa.Array] = []
    total = pq.ParquetFile(corpus_path).metadata.num_rows

    def chunks() -> Iterator[np.ndarray]:
        with tqdm(total=total, unit="doc", desc="dense encode+search", disable=not progress, leave=False) as bar:
            for doc_ids, texts in read_corpus_texts(corpus_path, opts.dense_corpus_chunk):
                id_chunks.append(doc_ids)
                yield model.encode_documents(texts)
                bar.update(len(texts))

    scores, positions = stream_search(model.encode_queries(queries), chunks(), k)
    all_ids = pa.chunked_array(id_chunks)
    width = positions.shape[1]
    for start in range(0, len(queries), opts.search_batch_size):
        idx = positions[start : start + opts.search_batch_size]
        flat = all_ids.take(pa.array(idx.ravel())).to_pylist()
        yield [flat[i * width : (i + 1) * width] for i in range(len(idx))], scores[start : start + opts.search_batch_size]


def _pick(pool: list[str], n: int, sampling: Sampling, rng: np.random.Generator) -> list[str]:
    """``n`` items of ``pool``: the first ones, or a random subset kept in pool order."""
    if n <= 0:
        return []
    if len(pool) <= n or sampling == "top":
        return pool[:n]
    return [pool[i] for i in np.sort(rng.choice(len(pool), size=n, replace=False))]


def _pair_rng(seed: int, qid: str, pos_id: str) -> np.random.Generator:
    """A generator that depends only on the seed and the pair, not on processing order."""
    return np.random.default_rng([seed, zlib.crc32(qid.encode("utf-8")), zlib.crc32(pos_id.encode("utf-8"))])


def mine_negatives(
    collection: Collection, opts: NegativeOptions, seed: int, batch_rows: int = 50_000, progress: bool = False
) -> MinedNegatives:
    """Choose up to ``opts.num_negatives`` negatives for every (query, relevant document) pair."""
    qids = list(collection.queries)
    texts = [collection.queries[q] for q in qids]
    k = opts.max_rank
    if opts.method == "bm25" and opts.num_negatives:
        rankings: Iterator[tuple[list[list[str]], np.ndarray]] | None = _bm25_search(collection.corpus_path, texts, k, opts, batch_rows, progress)
    elif opts.dense_model and opts.num_negatives:
        rankings = _dense_search(collection.corpus_path, texts, k, opts, progress)
    else:
        rankings = None

    def ranked() -> Iterator[tuple[list[str], np.ndarray]]:
        if rankings is None:
            for _ in qids:
                yield [], np.zeros(0, np.float32)
            return
        for hits, scores in rankings:
            yield from zip(hits, scores)

    by_pair: dict[tuple[str, str], list[str]] = {}
    given_used = mined_used = short = 0
    lo, hi, margin = opts.min_rank - 1, opts.max_rank, opts.false_negative_margin
    for qid, (hits, scores) in zip(qids, ranked()):
        relevant = collection.qrels[qid]
        given = [d for d in collection.negatives.get(qid, []) if d not in relevant]
        taken = set(given)
        window = [(d, float(s)) for d, s in zip(hits[lo:hi], scores[lo:hi]) if d not in relevant and d not in taken]
        pos_score = {d: float(s) for d, s in zip(hits, scores) if d in relevant}
        for pos in relevant:
            if margin is None:
                pool = [d for d, _ in window]
            elif pos in pos_score:
                limit = pos_score[pos] - margin * abs(pos_score[pos])
                pool = [d for d, s in window if s < limit]
            else:
                pool = []
            rng = _pair_rng(seed, qid, pos)
            chosen = _pick(given, opts.num_negatives, opts.sampling, rng)
            mined = _pick(pool, opts.num_negatives - len(chosen), opts.sampling, rng)
            given_used += len(chosen)
            mined_used += len(mined)
            short += len(chosen) + len(mined) < opts.num_negatives
            by_pair[(qid, pos)] = chosen + mined
    return MinedNegatives(
        by_pair=by_pair,
        stats={"negatives_given": given_used, "negatives_mined": mined_used, "pairs_with_fewer_negatives": short},
    )
