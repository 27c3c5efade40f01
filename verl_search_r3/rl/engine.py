"""Query and document embeddings as outputs of verl's FSDP engine (both training stages).

:func:`add_embedding_outputs` swaps the class of an FSDP LM-head engine
(``verl/workers/engine/fsdp/transformer_impl.py``) for a subclass whose ``prepare_model_outputs``
also returns ``model_output[EMBEDDING_KEY]``: the final-norm hidden state (captured by a forward
hook, see :class:`~verl_search_r3.embedding.FinalNormCapture`) at the last ``<|embed_token|>`` of
each *response*, L2-normalised, ``(B, H)``; a zero row when the response has no embed token.
Because verl writes every ``model_output`` field of ``compute_log_prob`` into TransferQueue, the
old-log-prob pass of Stage 2 stores the query embeddings with no extra forward pass, for both the
packed (remove-padding) and padded layouts; Stage 1's loss reads the same field.

With the document prompts in the micro-batch (:data:`DOC_TOKENS_KEY`) and gradients enabled, the
engine also re-encodes the documents in the training forward (:data:`DOC_EMBEDDING_KEY`,
:func:`document_embeddings`), so a contrastive gradient flows through the document side.

Document forwards run the decoder only (:func:`decoder_only`): no ``lm_head``, no
full-vocabulary logits, no fused log-prob kernel. A batch flagged :data:`EMBED_ONLY_KEY` (the
environment's document encoding) returns only :data:`EMBEDDING_KEY`; the ``doc_grad`` forward
encodes at most ``doc_grad_max_docs`` distinct documents per micro-batch, and with dynamic batch
size only as many as fit the micro-batch's token budget next to its own tokens.

Ulysses sequence parallelism (SP > 1) is refused: the hook sees only the local shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor
from transformers import PreTrainedModel
from verl.utils import tensordict_utils as tu

from ..embedding import FinalNormCapture, gather_embeddings, last_token_positions, last_token_positions_nested, pad_sequences

__all__ = [
    "EMBEDDING_KEY",
    "DOCS_KEY",
    "DOC_IDS_KEY",
    "DOC_MASK_KEY",
    "DOC_TOKENS_KEY",
    "DOC_TOKEN_LENGTHS_KEY",
    "DOC_EMBEDDING_KEY",
    "DOC_GRAD_MASK_KEY",
    "EMBED_ONLY_KEY",
    "response_embeddings",
    "decoder_only",
    "document_embeddings",
    "add_embedding_outputs",
    "dense",
]

EMBEDDING_KEY = "search_r3_embedding"
"""``model_output`` / TransferQueue field: ``(B, H)`` unit query embeddings, zero rows where missing."""
DOCS_KEY = "search_r3_docs"
"""Per-sample fresh document vectors ``(B, 1 + N, H)``: row 0 the positive, then N hard negatives."""
DOC_IDS_KEY = "search_r3_doc_ids"
"""``(B, 1 + N)`` int64 document keys aligned with :data:`DOCS_KEY` (equal keys = same document)."""
DOC_MASK_KEY = "search_r3_doc_mask"
"""``(B, 1 + N)`` bool, False for padding rows of :data:`DOCS_KEY`."""
DOC_TOKENS_KEY = "search_r3_doc_tokens"
"""Nested ``(B, j)`` int64: the document prompts of a sample's 1 + N documents, concatenated
(only with ``ContrastiveConfig.doc_grad``)."""
DOC_TOKEN_LENGTHS_KEY = "search_r3_doc_token_lengths"
"""``(B, 1 + N)`` int64 lengths of the prompts in :data:`DOC_TOKENS_KEY` (0 for padding rows)."""
DOC_EMBEDDING_KEY = "search_r3_doc_embedding"
"""``model_output`` field: ``(B, 1 + N, H)`` document embeddings with gradient (``doc_grad``);
zero rows where :data:`DOC_GRAD_MASK_KEY` is False."""
DOC_GRAD_MASK_KEY = "search_r3_doc_grad_mask"
"""``model_output`` field: ``(B, 1 + N)`` bool, True where :data:`DOC_EMBEDDING_KEY` was encoded
(the rest did not fit ``doc_grad_max_docs`` or the token budget: the loss uses :data:`DOCS_KEY` there)."""
EMBED_ONLY_KEY = "search_r3_embed_only"
"""Non-tensor batch flag: run the decoder only and return just :data:`EMBEDDING_KEY` (document encoding)."""

_HEAD_KWARGS = frozenset({"labels", "shift_labels", "logits_to_keep", "temperature", "return_dict"})
"""Keyword arguments of a causal LM's (or verl's fused) forward that belong to the head, not the decoder."""


def response_embeddings(
    hidden: Tensor,
    input_ids: Tensor,
    token_id: int,
    prompt_lengths: Tensor | None = None,
    packed: bool = True,
) -> Tensor:
    """Unit embeddings at the last embed token of each response.

    Args:
        hidden: final-norm output; packed ``(1, T', H)`` with ``T' >= T`` (trailing pad is
            ignored) or padded ``(B, L, H)`` right-padded as verl's no-remove-padding path does.
        input_ids: jagged nested ``(B, j)`` token ids (prompt + response, no padding).
        token_id: the embed token id.
        prompt_lengths: ``(B,)``; tokens before it are not searched (the reasoning prompt quotes
            the token). None searches the whole sequence (document prompts).
        packed: layout of ``hidden``.

    Returns:
        ``(B, H)``; zero rows where no embed token was found.
    """
    pos, found = last_token_positions_nested(input_ids, token_id, start=prompt_lengths)
    if packed:
        return gather_embeddings(hidden.reshape(-1, hidden.shape[-1]), pos, found)
    local = pos - input_ids.offsets()[:-1].to(pos.device)
    return gather_embeddings(hidden, local.clamp(min=0), found)


def _causal_lm(module: torch.nn.Module) -> PreTrainedModel:
    """The outermost Hugging Face causal LM inside ``module`` (through FSDP / PEFT / checkpoint wrappers)."""
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel) and sub.get_output_embeddings() is not None:
            return sub
    raise ValueError(f"no Hugging Face causal LM (a model with an lm_head) inside {type(module).__name__}")


@contextmanager
def decoder_only(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, calling ``module`` runs the causal LM's decoder only (embeddings, layers,
    final norm): no ``lm_head``, no logits, no fused log-prob kernel; it returns the decoder's output.

    ``module`` is called as usual, so FSDP's hooks on it still gather and release the parameters;
    only the wrapped causal LM's ``forward`` is replaced on the instance, and restored on exit.
    Head-only keyword arguments (``temperature``, ``return_dict``, ``shift_labels`` of verl's fused
    forward; ``labels``, ``logits_to_keep``) are dropped.
    """
    lm = _causal_lm(module)
    decoder = lm.get_decoder()
    previous = lm.__dict__.get("forward")

    def forward(*args: Any, **kwargs: Any) -> Any:
        return decoder(*args, **{k: v for k, v in kwargs.items() if k not in _HEAD_KWARGS})

    lm.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del lm.forward
        else:
            lm.forward = previous


def document_embeddings(
    module: torch.nn.Module,
    capture: FinalNormCapture,
    token_id: int,
    tokens: Tensor,
    lengths: Tensor,
    doc_keys: Tensor,
    max_docs: int | None = None,
    max_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Embed each sample's documents with ``module``'s decoder (gradient kept), each distinct document once.

    Distinct documents are taken positives first, then the negatives slot by slot (hardest
    first), while there are at most ``max_docs`` of them and their padded forward (count ×
    longest prompt) fits ``max_tokens`` tokens; the others are left out (zero rows, mask False).
    When nothing is left, a one-token forward still runs (and stays in the graph, times 0), so
    every FSDP rank runs the same forwards and backwards.

    Args:
        module: the causal LM (the engine's module; its final norm is hooked by ``capture``).
        capture: the final-norm hook.
        token_id: the embed token id.
        tokens: nested ``(B, j)``: per sample, its document prompts concatenated.
        lengths: ``(B, K)`` prompt lengths (0 = padding row).
        doc_keys: ``(B, K)`` document keys; equal keys are encoded once.
        max_docs, max_tokens: the caps (None = no cap).

    Returns:
        ``(B, K, H)`` unit embeddings (zero rows where not encoded) and the ``(B, K)`` bool mask of
        the encoded rows.
    """
    lengths = lengths.long().cpu()
    keys = doc_keys.long().cpu()
    pieces = [torch.split(row.cpu(), lengths[i].tolist()) for i, row in enumerate(tokens.unbind())]
    index: dict[int, int] = {}  # document key -> row of the unique batch
    prompts: list[list[int]] = []
    slot = torch.full_like(keys, -1)
    longest = 0
    for k in range(keys.shape[1]):  # positives first, then negatives by rank
        for i in range(keys.shape[0]):
            n = int(lengths[i, k])
            key = int(keys[i, k])
            if n == 0:
                continue
            if key not in index:
                fits = (max_docs is None or len(prompts) < max_docs) and (
                    max_tokens is None or (len(prompts) + 1) * max(longest, n) <= max_tokens
                )
                if not fits:
                    continue
                index[key] = len(prompts)
                prompts.append(pieces[i][k].tolist())
                longest = max(longest, n)
            slot[i, k] = index[key]
    device = tokens.device
    encoded = (slot >= 0).to(device)
    ids, mask = pad_sequences(prompts or [[token_id]], pad_id=0, side="right")
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with decoder_only(module):
        module(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    hidden = capture.pop()
    emb = gather_embeddings(hidden, *last_token_positions(ids, token_id, mask))
    return emb[slot.clamp(min=0).to(device)] * encoded[..., None].to(emb.dtype), encoded


def _embedding_engine_class(base: type) -> type:
    """A subclass of the engine class ``base`` that adds :data:`EMBEDDING_KEY` to model outputs."""

    class _EmbeddingOutputs(base):  # type: ignore[misc, valid-type]
        search_r3_capture: FinalNormCapture
        search_r3_token_id: int
        search_r3_doc_grad_max_docs: int

        def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
            embed_only = tu.get_non_tensor_data(data=micro_batch, key=EMBED_ONLY_KEY, default=False)
            with decoder_only(self.module) if embed_only else nullcontext():
                return super().forward_step(micro_batch, loss_function, forward_only)

        def prepare_model_outputs(self, output, output_args, micro_batch: TensorDict, logits_processor_func):
            packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
            if tu.get_non_tensor_data(data=micro_batch, key=EMBED_ONLY_KEY, default=False):
                hidden = self.search_r3_capture.pop()
                return {EMBEDDING_KEY: response_embeddings(hidden, micro_batch["input_ids"], self.search_r3_token_id, packed=packed)}
            model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
            hidden = self.search_r3_capture.pop()
            prompt_lengths = micro_batch["prompts"].offsets().diff() if "prompts" in micro_batch.keys() else None
            model_output[EMBEDDING_KEY] = response_embeddings(
                hidden, micro_batch["input_ids"], self.search_r3_token_id, prompt_lengths, packed=packed
            )
            if torch.is_grad_enabled() and DOC_TOKENS_KEY in micro_batch.keys():
                budget = None
                if tu.get_non_tensor_data(data=micro_batch, key="use_dynamic_bsz", default=False):
                    own_tokens = int(micro_batch["input_ids"].offsets()[-1])
                    budget = int(tu.get_non_tensor_data(data=micro_batch, key="max_token_len_per_gpu", default=0)) - own_tokens
                model_output[DOC_EMBEDDING_KEY], model_output[DOC_GRAD_MASK_KEY] = document_embeddings(
                    self.module, self.search_r3_capture, self.search_r3_token_id, micro_batch[DOC_TOKENS_KEY],
                    dense(micro_batch[DOC_TOKEN_LENGTHS_KEY]), dense(micro_batch[DOC_IDS_KEY]),
                    max_docs=self.search_r3_doc_grad_max_docs, max_tokens=budget,
                )
            return model_output

    _EmbeddingOutputs.__name__ = f"SearchR3{base.__name__}"
    _EmbeddingOutputs.__qualname__ = _EmbeddingOutputs.__name__
    return _EmbeddingOutputs


def add_embedding_outputs(engine: Any, module: torch.nn.Module, token_id: int, doc_grad_max_docs: int = 16) -> None:
    """Make ``engine`` (an FSDP LM-head engine, or any with ``prepare_model_outputs``) emit embeddings.

    Installs a forward hook on the final norm of ``module`` and swaps ``engine.__class__`` for
    a subclass; idempotent. ``doc_grad_max_docs`` caps the distinct documents of the ``doc_grad``
    forward per micro-batch (see :func:`document_embeddings`).
    """
    if doc_grad_max_docs < 1:
        raise ValueError(f"doc_grad_max_docs must be >= 1, got {doc_grad_max_docs}")
    sp = getattr(engine, "ulysses_sequence_parallel_size", 1)
    if sp > 1:
        raise ValueError(
            f"search_r3 reads hidden states at the embed token and supports ulysses_sequence_parallel_size=1 "
            f"only (got {sp}); set actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"
        )
    if getattr(engine, "search_r3_capture", None) is None:
        engine.search_r3_capture = FinalNormCapture(module).attach()
        engine.__class__ = _embedding_engine_class(type(engine))
    engine.search_r3_token_id = token_id
    engine.search_r3_doc_grad_max_docs = doc_grad_max_docs


def dense(value: Tensor) -> Tensor:
    """A jagged nested tensor as a zero-padded dense one, row by row; dense tensors pass through.

    Padding each row (not ``to_padded_tensor``) matters for 3-D fields such as :data:`DOCS_KEY`
    ``(B, 1 + N, H)``: after verl splits a batch into mini/micro-batches
    (``tu.chunk_tensordict``), ``to_padded_tensor`` of a chunk sizes the ragged dimension by the
    whole batch's rows, e.g. ``(2, 6, H)`` for a 2-row chunk of ``(B, 3, H)``.
    """
    if not value.is_nested:
        return value
    return torch.nn.utils.rnn.pad_sequence(list(value.unbind()), batch_first=True)
