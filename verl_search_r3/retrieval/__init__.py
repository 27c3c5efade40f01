"""Reason-then-embed inference and the retrievers built on it (no verl).

* :mod:`.encoder` — :class:`~.encoder.SearchR3Encoder`: a Search-R3 checkpoint as an embedder
  (queries with or without an analysis, documents directly).
* :mod:`.dense` — exact dense search (:class:`~.dense.DenseIndex`, :func:`~.dense.stream_search`),
  sentence-transformers and Search-R3 retrievers, the on-disk vector cache.
* :mod:`.bm25` — :class:`~.bm25.BM25Retriever` (bm25s).

Every retriever answers ``search(queries, k) -> (ids, scores)``; evaluation, data preparation
(hard negatives) and the Search-R1 search tool use them alike.
"""
