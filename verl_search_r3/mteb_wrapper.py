"""Run MTEB tasks with a Search-R3 model: an adapter implementing mteb's ``EncoderProtocol``.

    import mteb
    from verl_search_r3.retrieval.encoder import SearchR3Encoder
    from verl_search_r3.mteb_wrapper import SearchR3MTEBModel

    model = SearchR3MTEBModel(SearchR3Encoder.from_pretrained(path), reasoning=True)
    results = mteb.evaluate(model, tasks=mteb.get_tasks(tasks=["SciFact"]))

mteb (``pip install 'verl-search-r3[mteb]'``) is imported lazily, only for the model metadata
and the similarity functions it calls back; this module itself imports without it.
Queries (``prompt_type="query"``) are embedded with :meth:`SearchR3Encoder.encode_queries`
(with or without reasoning), everything else (documents, and texts of non-retrieval tasks,
which come without a prompt type) with :meth:`SearchR3Encoder.encode_documents`. mteb hands
corpus rows over as ``title + " " + text`` already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .retrieval.dense import module_fingerprint
from .retrieval.encoder import MissingPolicy, QueryEncoding, SearchR3Encoder

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.model_meta import ModelMeta
    from mteb.types import Array, BatchedInput, PromptType
    from torch.utils.data import DataLoader

__all__ = ["SearchR3MTEBModel"]


class SearchR3MTEBModel:
    """mteb ``EncoderProtocol`` adapter around a :class:`SearchR3Encoder`.

    Args:
        encoder: the Search-R3 encoder.
        name: model name in mteb results (``organization/model`` form).
        reasoning, max_new_tokens, max_length, on_missing: query settings of
            :meth:`SearchR3Encoder.encode_queries` (``max_length`` also budgets documents).
        batch_size: texts per batch unless mteb's ``encode_kwargs`` set ``batch_size``.

    ``last_queries`` keeps the most recent :class:`QueryEncoding` (analyses, forced count).
    """

    def __init__(
        self,
        encoder: SearchR3Encoder,
        name: str = "verl-search-r3/search-r3",
        reasoning: bool = True,
        max_new_tokens: int = 256,
        batch_size: int = 16,
        max_length: int | None = 512,
        on_missing: MissingPolicy = "append",
    ):
        self.encoder = encoder
        self.name = name
        self.reasoning = reasoning
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_length = max_length
        self.on_missing = on_missing
        self.last_queries: QueryEncoding | None = None
        self._meta: ModelMeta | None = None

    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """``(N, H)`` float32 unit vectors for all texts of ``inputs`` (batches with a ``"text"`` field)."""
        texts = [text for batch in inputs for text in batch["text"]]
        batch_size = kwargs.get("batch_size", self.batch_size)
        if prompt_type == "query":
            self.last_queries = self.encoder.encode_queries(
                texts, self.reasoning, self.max_new_tokens, batch_size, self.max_length, self.on_missing
            )
            return self.last_queries.vectors
        return self.encoder.encode_documents(texts, batch_size, self.max_length)

    def similarity(self, embeddings1: Array, embeddings2: Array) -> Array:
        """Cosine similarity matrix ``(N1, N2)``."""
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Array, embeddings2: Array) -> Array:
        """Cosine similarity of corresponding rows ``(N,)``."""
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)

    @property
    def mteb_model_meta(self) -> ModelMeta:
        """Metadata for mteb's result files; the revision is the weights' fingerprint."""
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta, ScoringFunction

            model = self.encoder.model
            self._meta = ModelMeta.create_empty(
                overwrites={
                    "name": self.name,
                    "revision": module_fingerprint(model)[:16],
                    "n_parameters": sum(p.numel() for p in model.parameters()),
                    "embed_dim": int(model.config.hidden_size),
                    "max_tokens": self.max_length,
                    "similarity_fn_name": ScoringFunction.COSINE,
                    "framework": ["PyTorch"],
                    "use_instructions": True,
                    "experiment_kwargs": {"reasoning": self.reasoning, "max_new_tokens": self.max_new_tokens},
                }
            )
        return self._meta
