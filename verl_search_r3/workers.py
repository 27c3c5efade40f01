"""Embedding-aware actor for verl 0.9.1: query embeddings from the log-prob pass, PPO + InfoNCE.

How it plugs into verl's engine workers (``verl/workers/engine_workers.py``):

* :func:`add_embedding_outputs` swaps the class of the actor's FSDP engine for a subclass whose
  ``prepare_model_outputs`` also returns ``model_output[EMBEDDING_KEY]``: the final-norm hidden
  state (captured by a forward hook, see :class:`~verl_search_r3.embedding.FinalNormCapture`)
  at the last ``<|embed_token|>`` of each *response*, L2-normalised, ``(B, H)``; a zero row
  when the response has no embed token. Because verl writes every ``model_output`` field of
  ``compute_log_prob`` into TransferQueue, the old-log-prob pass stores the query embeddings
  with no extra forward pass, for both the packed (remove-padding) and padded layouts.
* During ``update_actor`` the same field carries gradients into :func:`search_r3_ppo_loss`:
  verl's ``ppo_loss`` plus ``λ · InfoNCE`` between the query embedding and the fresh
  positive/negative document vectors the trainer stored per sample (:data:`DOCS_KEY`). With
  ``ContrastiveConfig.doc_grad`` the trainer stores the document prompts instead
  (:data:`DOC_TOKENS_KEY`) and the engine re-encodes them in the training forward, so the
  InfoNCE gradient also flows through the document side (:func:`document_embeddings`).
* :class:`SearchR3ActorRolloutRefWorker` adds two worker-group methods: ``configure_search_r3``
  (install the engine outputs and the loss; called once by the trainer) and
  ``encode_documents`` (the environment's refresh callback: document prompts in, vectors out,
  split over data-parallel ranks by verl's dispatch).

Ulysses sequence parallelism (SP > 1) is refused: the hook sees only the local shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.utils.losses import ppo_loss

from .embedding import FinalNormCapture, gather_embeddings, last_token_positions, last_token_positions_nested, pad_sequences
from .losses import InfoNCELoss, in_batch_accuracy
from .tokens import embed_token_id

__all__ = [
    "EMBEDDING_KEY",
    "DOCS_KEY",
    "DOC_IDS_KEY",
    "DOC_MASK_KEY",
    "DOC_TOKENS_KEY",
    "DOC_TOKEN_LENGTHS_KEY",
    "DOC_EMBEDDING_KEY",
    "document_embeddings",
    "ContrastiveConfig",
    "response_embeddings",
    "add_embedding_outputs",
    "search_r3_ppo_loss",
    "document_batch",
    "SearchR3ActorRolloutRefWorker",
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
"""``model_output`` field: ``(B, 1 + N, H)`` document embeddings with gradient (``doc_grad``)."""


@dataclass
class ContrastiveConfig:
    """The contrastive term added to the policy loss (config block ``search_r3.contrastive``).

    Attributes:
        coef: λ; 0 disables the term (then the loss is exactly verl's ``ppo_loss``).
        temperature: InfoNCE τ.
        in_batch_negatives: also use other samples' positives in the micro-batch as negatives.
            Off by default: GRPO micro-batches are mostly one query's group, and with env hard
            negatives only the loss is exactly invariant to micro-batching.
        doc_grad: re-encode the positive and negative documents in the training forward so
            the gradient also trains the document side (one extra forward per micro-batch over
            its distinct documents, full-vocabulary logits included); off: the environment's
            fresh vectors are constants.
    """

    coef: float = 0.1
    temperature: float = 0.05
    in_batch_negatives: bool = False
    doc_grad: bool = False


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


def document_embeddings(
    module: torch.nn.Module,
    capture: FinalNormCapture,
    token_id: int,
    tokens: Tensor,
    lengths: Tensor,
    doc_keys: Tensor,
) -> Tensor:
    """Embed each sample's documents with ``module`` (gradient kept), each distinct document once.

    Args:
        module: the causal LM (the engine's module; its final norm is hooked by ``capture``).
        capture: the final-norm hook.
        token_id: the embed token id.
        tokens: nested ``(B, j)``: per sample, its document prompts concatenated.
        lengths: ``(B, K)`` prompt lengths (0 = padding row).
        doc_keys: ``(B, K)`` document keys; equal keys are encoded once.

    Returns:
        ``(B, K, H)`` unit embeddings; zero rows for padding.
    """
    lengths = lengths.long().cpu()
    keys = doc_keys.long().cpu()
    index: dict[int, int] = {}  # document key -> row of the unique batch
    prompts: list[list[int]] = []
    slot = torch.zeros_like(keys)
    for i, row in enumerate(tokens.unbind()):
        for k, piece in enumerate(torch.split(row.cpu(), lengths[i].tolist())):
            if lengths[i, k] > 0:
                key = int(keys[i, k])
                if key not in index:
                    index[key] = len(prompts)
                    prompts.append(piece.tolist())
                slot[i, k] = index[key]
    device = tokens.device
    ids, mask = pad_sequences(prompts, pad_id=0, side="right")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    module(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device), use_cache=False)
    hidden = capture.pop()
    pos, found = last_token_positions(ids.to(device), token_id, mask.to(device))
    emb = gather_embeddings(hidden, pos, found)
    valid = (lengths > 0).to(device)
    return emb[slot.to(device)] * valid[..., None].to(emb.dtype)


def _embedding_engine_class(base: type) -> type:
    """A subclass of the engine class ``base`` that adds :data:`EMBEDDING_KEY` to model outputs."""

    class _EmbeddingOutputs(base):  # type: ignore[misc, valid-type]
        search_r3_capture: FinalNormCapture
        search_r3_token_id: int

        def prepare_model_outputs(self, output, output_args, micro_batch: TensorDict, logits_processor_func):
            model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
            hidden = self.search_r3_capture.pop()
            packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
            prompt_lengths = micro_batch["prompts"].offsets().diff() if "prompts" in micro_batch.keys() else None
            model_output[EMBEDDING_KEY] = response_embeddings(
                hidden, micro_batch["input_ids"], self.search_r3_token_id, prompt_lengths, packed=packed
            )
            if torch.is_grad_enabled() and DOC_TOKENS_KEY in micro_batch.keys():
                model_output[DOC_EMBEDDING_KEY] = document_embeddings(
                    self.module, self.search_r3_capture, self.search_r3_token_id, micro_batch[DOC_TOKENS_KEY],
                    _dense(micro_batch[DOC_TOKEN_LENGTHS_KEY]), _dense(micro_batch[DOC_IDS_KEY]),
                )
            return model_output

    _EmbeddingOutputs.__name__ = f"SearchR3{base.__name__}"
    _EmbeddingOutputs.__qualname__ = _EmbeddingOutputs.__name__
    return _EmbeddingOutputs


def add_embedding_outputs(engine: Any, module: torch.nn.Module, token_id: int) -> None:
    """Make ``engine`` (an FSDP LM-head engine, or any with ``prepare_model_outputs``) emit embeddings.

    Installs a forward hook on the final norm of ``module`` and swaps ``engine.__class__`` for
    a subclass; idempotent.
    """
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


def _dense(value: Tensor) -> Tensor:
    return value.to_padded_tensor(0) if value.is_nested else value


def search_r3_ppo_loss(
    config: ActorConfig,
    model_output: dict[str, Tensor],
    data: TensorDict,
    dp_group: Any = None,
    contrastive: ContrastiveConfig | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl's ``ppo_loss`` plus ``coef · InfoNCE(query embedding, fresh env documents)``.

    The contrastive term is a per-sequence sum normalised by the global mini-batch size and
    multiplied by ``dp_size``, like ``ppo_loss``'s own terms, so summing micro-batch gradients
    and FSDP's mean over ranks give the global mean whatever the micro-batch split. Samples
    whose response has no embed token contribute 0.
    """
    loss, metrics = ppo_loss(config, model_output, data, dp_group)
    contrastive = contrastive or ContrastiveConfig()
    if contrastive.coef == 0 or (DOCS_KEY not in data.keys() and DOC_EMBEDDING_KEY not in model_output):
        return loss, metrics

    query = model_output[EMBEDDING_KEY]
    docs = model_output.get(DOC_EMBEDDING_KEY)
    if docs is None:
        docs = _dense(data[DOCS_KEY]).to(device=query.device, dtype=torch.float32)
    doc_ids = _dense(data[DOC_IDS_KEY]).to(query.device)
    doc_mask = _dense(data[DOC_MASK_KEY]).to(query.device).bool()
    found = query.detach().norm(dim=-1) > 0
    nce = InfoNCELoss(temperature=contrastive.temperature, in_batch_negatives=contrastive.in_batch_negatives)
    args = (query, docs[:, 0], docs[:, 1:], doc_mask[:, 1:], doc_ids[:, 0], doc_ids[:, 1:])
    n_valid = found.sum()
    nce_sum = nce(*args, query_mask=found) * n_valid
    scale = data["dp_size"] / data["global_batch_size"]
    loss = loss + contrastive.coef * nce_sum * scale

    with torch.no_grad():
        scores, labels = nce.scores(*args)
        metrics["actor/contrastive_loss"] = (nce_sum / n_valid.clamp(min=1)).item()
        metrics["actor/contrastive_acc"] = in_batch_accuracy(scores, labels, found).item()
        metrics["actor/embed_found_frac"] = found.float().mean().item()
        metrics["actor/embed_norm_pre"] = query.norm(dim=-1)[found].mean().item() if found.any() else 0.0
    return loss, metrics


def document_batch(token_ids: list[list[int]], pad_to_multiple: int = 1) -> TensorDict:
    """A forward-only batch of document prompts for :meth:`SearchR3ActorRolloutRefWorker.encode_documents`.

    Nested ``input_ids`` / ``position_ids`` / ``loss_mask`` ``(B', j)`` in verl's no-padding
    layout; the list is padded (by repeating its last prompt) to a multiple of
    ``pad_to_multiple`` (data-parallel size × fixed micro-batch size) so verl's dispatch and
    micro-batching split it evenly. Callers keep the first ``len(token_ids)`` outputs.
    """
    if not token_ids:
        raise ValueError("document_batch needs at least one document")
    rows = list(token_ids) + [token_ids[-1]] * (-len(token_ids) % pad_to_multiple)

    def nested(make) -> Tensor:
        return torch.nested.as_nested_tensor([make(r) for r in rows], layout=torch.jagged)

    batch = TensorDict(
        {
            "input_ids": nested(lambda r: torch.tensor(r, dtype=torch.long)),
            "position_ids": nested(lambda r: torch.arange(len(r))),
            "loss_mask": nested(lambda r: torch.ones(len(r), dtype=torch.long)),
        },
        batch_size=[len(rows)],
    )
    tu.assign_non_tensor(batch, temperature=1.0)
    return batch


class SearchR3ActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker with Search-R3 embeddings and loss."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def configure_search_r3(self, contrastive: dict | None = None) -> None:
        """Install embedding outputs on the actor engine and the PPO + InfoNCE loss."""
        if self.actor is None:
            return
        engine = self.actor.engine
        token_id = embed_token_id(self.actor.model_config.tokenizer)
        add_embedding_outputs(engine, engine.module, token_id)
        from functools import partial

        from verl.utils.config import omega_conf_to_dataclass

        actor_config: ActorConfig = omega_conf_to_dataclass(self.config.actor)
        actor_config.model_config = self.actor.model_config
        self.loss_fn = partial(
            search_r3_ppo_loss, config=actor_config, contrastive=ContrastiveConfig(**(contrastive or {}))
        )
        self.actor.set_loss_fn(self.loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def encode_documents(self, data: TensorDict) -> TensorDict:
        """Embed document prompts: ``input_ids``/``position_ids`` nested ``(B, j)`` -> ``EMBEDDING_KEY (B, H)``.

        Runs the actor's forward-only path (micro-batching, dynamic batch size and offload as
        configured for the log-prob pass).
        """
        tu.assign_non_tensor(data, compute_loss=False, calculate_entropy=False)
        output = self.actor.infer_batch(data)
        return output.select(EMBEDDING_KEY).cpu() if output is not None else None
