"""BM25 retrieval with ``bm25s`` (English stemming and stop words by default).

One small class shared by hard-negative mining (``data_prep``), the evaluation baseline and the
Search-R1 retriever, so every component tokenizes and scores the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import bm25s
import numpy as np

__all__ = ["BM25Retriever"]

_IDS_FILE = "ids.txt"
_TOKENIZER_FILE = "tokenizer.json"


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
        self._set_tokenizer(stemmer, stopwords, show_progress)
        self._bm25 = bm25s.BM25(k1=k1, b=b, method=method)
        self._bm25.index(self._tokenize(texts), show_progress=show_progress)

    def _set_tokenizer(self, stemmer: str | None, stopwords: str | None, show_progress: bool) -> None:
        self._stemmer_language, self._stopwords, self._show_progress = stemmer, stopwords, show_progress
        self._stemmer = None
        if stemmer is not None:
            import Stemmer

            self._stemmer = Stemmer.Stemmer(stemmer)

    def save(self, folder: str) -> None:
        """Write the index to ``folder``: bm25s's own files, ``ids.txt`` (one id per line) and
        ``tokenizer.json`` (stemmer and stop words), so :meth:`load` searches identically."""
        bad = next((i for i in self.ids if "\n" in i or "\r" in i), None)
        if bad is not None:
            raise ValueError(f"document id {bad!r} contains a line break; it cannot be saved")
        os.makedirs(folder, exist_ok=True)
        self._bm25.save(folder, show_progress=self._show_progress)
        with open(os.path.join(folder, _IDS_FILE), "w", encoding="utf-8") as f:
            f.writelines(f"{i}\n" for i in self.ids)
        with open(os.path.join(folder, _TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump({"stemmer": self._stemmer_language, "stopwords": self._stopwords}, f)

    @classmethod
    def load(cls, folder: str, show_progress: bool = False) -> BM25Retriever:
        """An index written by :meth:`save`."""
        for name in (_IDS_FILE, _TOKENIZER_FILE):
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"{folder!r} is not a saved BM25 index (no {name})")
        self = cls.__new__(cls)
        with open(os.path.join(folder, _TOKENIZER_FILE), encoding="utf-8") as f:
            settings = json.load(f)
        self._set_tokenizer(settings["stemmer"], settings["stopwords"], show_progress)
        with open(os.path.join(folder, _IDS_FILE), encoding="utf-8") as f:
            self.ids = [line.rstrip("\n") for line in f]
        self._bm25 = bm25s.BM25.load(folder, show_progress=show_progress)
        return self

    def _tokenize(self, texts: Sequence[str]) -> bm25s.tokenization.Tokenized:
        return bm25s.tokenize(list(texts), stopwords=self._stopwords, stemmer=self._stemmer, show_progress=self._show_progress)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` documents per query: ``(ids (Q, k') lists, scores (Q, k'))``, ``k' = min(k, corpus size)``."""
        k = min(k, len(self.ids))
        docs, scores = self._bm25.retrieve(self._tokenize(queries), k=k, show_progress=self._show_progress)
        return [[self.ids[i] for i in row] for row in docs], np.asarray(scores, dtype=np.float32)
