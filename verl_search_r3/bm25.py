"""BM25 retrieval with ``bm25s`` (English stemming and stop words by default).

One small class shared by hard-negative mining (``data_prep``), the evaluation baseline and the
Search-R1 retriever, so every component tokenizes and scores the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np

__all__ = ["BM25Retriever"]


class BM25Retriever:
    """Lexical BM25 index over a corpus of ``(id, text)``.

    Args:
        ids: document ids, one per text.
        texts: document texts (for BEIR corpora, ``format_document(title, text)``).
        stemmer: Snowball stemmer language (PyStemmer), or None for no stemming.
        stopwords: ``bm25s`` stop-word list name (e.g. ``"en"``), or None.
        k1, b: BM25 parameters.
        method: ``bm25s`` scoring variant (``"lucene"``, ``"robertson"``, ``"atire"``, ``"bm25l"``, ``"bm25+"``).
        show_progress: show ``bm25s`` progress bars while indexing.
    """

    def __init__(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        stemmer: str | None = "english",
        stopwords: str | None = "en",
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        show_progress: bool = False,
    ):
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        if not ids:
            raise ValueError("cannot index an empty corpus")
        self.ids = list(ids)
        self._stopwords = stopwords
        self._stemmer = None
        if stemmer is not None:
            import Stemmer

            self._stemmer = Stemmer.Stemmer(stemmer)
        self._show_progress = show_progress
        self._bm25 = bm25s.BM25(k1=k1, b=b, method=method)
        self._bm25.index(self._tokenize(texts), show_progress=show_progress)

    def _tokenize(self, texts: Sequence[str]) -> bm25s.tokenization.Tokenized:
        return bm25s.tokenize(list(texts), stopwords=self._stopwords, stemmer=self._stemmer, show_progress=self._show_progress)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` documents per query: ``(ids (Q, k') lists, scores (Q, k'))``, ``k' = min(k, corpus size)``."""
        k = min(k, len(self.ids))
        docs, scores = self._bm25.retrieve(self._tokenize(queries), k=k, show_progress=self._show_progress)
        return [[self.ids[i] for i in row] for row in docs], np.asarray(scores, dtype=np.float32)
