"""Dense encoders of the search index: a sentence-transformers folder or a Search-R3 model.

Both wrap the project's encoders (:class:`~verl_search_r3.retrieval.dense.SentenceTransformerEncoder`,
:class:`~verl_search_r3.retrieval.encoder.SearchR3Encoder`) behind one interface, :class:`DenseModel`:
``encode_documents`` (at index build time and when a ``policy`` index is re-encoded) and
``encode_queries`` (at search time), both returning unit vectors. Documents are embedded from
``format_document(title, text)``; Search-R3 queries reason first (``reasoning=True``).

:func:`weights_fingerprint` identifies the weights so that an index is never searched with
vectors of another model; it is computed on values rounded to bfloat16, so the same checkpoint
loaded in float32 or bfloat16 has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

__all__ = ["DenseKind", "DENSE_KINDS", "DenseModel", "DenseModelOptions", "load_dense_model", "weights_fingerprint"]

DenseKind = Literal["sentence_transformers", "search_r3"]
DENSE_KINDS: tuple[str, ...] = ("sentence_transformers", "search_r3")


class DenseModel(Protocol):
    """A document and query encoder with unit-norm float32 outputs."""

    fingerprint: str

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...


def weights_fingerprint(module: nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 over every state-dict entry's name, shape and ``samples_per_tensor`` evenly spaced
    values rounded to bfloat16 (dtype-independent between float32 and bfloat16 copies)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].cpu()
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).float()
        h.update(f"{name}|{tuple(tensor.shape)}|".encode())
        h.update(sample.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DenseModelOptions:
    """How a dense model is loaded and run.

    Attributes:
        device: torch device (None = CUDA if available, else CPU).
        dtype: Search-R3 model dtype (None = bfloat16 on CUDA, float32 on CPU).
        backend: Search-R3 reasoning generation backend (``auto``, ``transformers``, ``vllm``).
        batch_size: texts per forward.
        max_length: token budget of a document (and of a direct query); None = the model's.
        reasoning: Search-R3 queries are embedded after a generated analysis.
        max_new_tokens: Search-R3 analysis budget per query.
        query_prefix, document_prefix: sentence-transformers text prefixes (e.g. ``"query: "``,
            ``"passage: "`` for E5); the model's own prompts apply when it defines them.
        show_progress: progress bars.
    """

    device: str | None = None
    dtype: str | None = None
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    batch_size: int = 64
    max_length: int | None = None
    reasoning: bool = True
    max_new_tokens: int = 256
    query_prefix: str = ""
    document_prefix: str = ""
    show_progress: bool = False


class SentenceTransformerModel:
    """A sentence-transformers model folder (e.g. E5, MiniLM) as a :class:`DenseModel`."""

    def __init__(self, path: str, options: DenseModelOptions):
        from ..retrieval.dense import SentenceTransformerEncoder

        self.options = options
        self.encoder = SentenceTransformerEncoder(
            path, device=options.device, batch_size=options.batch_size, max_length=options.max_length, show_progress=options.show_progress
        )
        self.fingerprint = weights_fingerprint(self.encoder.model)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_documents([self.options.document_prefix + t for t in texts])

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_queries([self.options.query_prefix + t for t in texts])


class SearchR3Model:
    """A Search-R3 checkpoint as a :class:`DenseModel`: documents embedded directly, queries
    after a generated analysis (or directly with ``reasoning=False``)."""

    def __init__(self, path: str, options: DenseModelOptions):
        from ..retrieval.encoder import SearchR3Encoder

        self.options = options
        self.encoder = SearchR3Encoder.from_pretrained(
            path, device=options.device, dtype=options.dtype, backend=options.backend, show_progress=options.show_progress
        )
        self.fingerprint = weights_fingerprint(self.encoder.model)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        o = self.options
        return self.encoder.encode_documents(texts, batch_size=o.batch_size, max_length=o.max_length)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        o = self.options
        return self.encoder.encode_queries(
            texts, reasoning=o.reasoning, max_new_tokens=o.max_new_tokens, batch_size=o.batch_size, max_length=o.max_length
        ).vectors


def load_dense_model(kind: str, path: str | os.PathLike, options: DenseModelOptions) -> DenseModel:
    """Load ``path`` as a ``sentence_transformers`` or ``search_r3`` model."""
    path = os.fspath(path)
    if kind == "sentence_transformers":
        return SentenceTransformerModel(path, options)
    if kind == "search_r3":
        return SearchR3Model(path, options)
    raise ValueError(f"unknown dense retriever kind {kind!r}; use one of {DENSE_KINDS}")
