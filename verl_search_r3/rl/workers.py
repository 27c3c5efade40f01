"""Embedding-aware actor for verl 0.9.1: query embeddings from the log-prob pass, PPO + InfoNCE.

How it plugs into verl's engine workers (``verl/workers/engine_workers.py``):

* :func:`~verl_search_r3.rl.engine.add_embedding_outputs` makes the actor's FSDP engine return
  the query embedding at the embed token (``model_output[EMBEDDING_KEY]``) from the same forward
  as the log-probs, so the old-log-prob pass stores the query embeddings with no extra pass.
* During ``update_actor`` the same field carries gradients into :func:`search_r3_ppo_loss`:
  verl's ``ppo_loss`` plus ``λ · InfoNCE`` between the query embedding and the fresh
  positive/negative document vectors the trainer stored per sample (:data:`DOCS_KEY`). With
  ``ContrastiveConfig.doc_grad`` the trainer also stores the document prompts
  (:data:`DOC_TOKENS_KEY`) and the engine re-encodes them (decoder only, capped per
  micro-batch) in the training forward, so the InfoNCE gradient also flows through the
  document side.
* :class:`SearchR3ActorRolloutRefWorker` adds two worker-group methods: ``configure_search_r3``
  (install the engine outputs and the loss; called once by the trainer) and
  ``encode_documents`` (the environment's refresh callback: document prompts in, vectors out,
  split over data-parallel ranks by verl's dispatch).
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

from ..losses import InfoNCELoss, in_batch_accuracy
from ..tokens import embed_token_id
from .engine import (
    DOC_EMBEDDING_KEY,
    DOC_GRAD_MASK_KEY,
    DOC_IDS_KEY,
    DOC_MASK_KEY,
    DOCS_KEY,
    EMBED_ONLY_KEY,
    EMBEDDING_KEY,
    add_embedding_outputs,
    dense,
)

__all__ = [
    "ContrastiveConfig",
    "search_r3_ppo_loss",
    "document_batch",
    "SearchR3ActorRolloutRefWorker",
]


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
            the gradient also trains the document side (one extra decoder-only forward per
            micro-batch over its distinct documents); off: the environment's fresh vectors are
            constants.
        doc_grad_max_docs: most distinct documents one micro-batch re-encodes with gradient
            (positives first, then the hardest negatives); with dynamic batch size they must also
            fit ``ppo_max_token_len_per_gpu`` next to the micro-batch's own tokens. The others keep
            their environment vectors (no gradient); ``actor/doc_grad_frac`` reports the share.
    """

    coef: float = 0.1
    temperature: float = 0.05
    in_batch_negatives: bool = False
    doc_grad: bool = False
    doc_grad_max_docs: int = 16

    def __post_init__(self) -> None:
        if self.doc_grad_max_docs < 1:
            raise ValueError(f"search_r3.contrastive.doc_grad_max_docs must be >= 1, got {self.doc_grad_max_docs}")


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
    if contrastive.coef == 0 or DOCS_KEY not in data.keys():
        return loss, metrics

    query = model_output[EMBEDDING_KEY]
    docs = dense(data[DOCS_KEY]).to(device=query.device, dtype=torch.float32)
    doc_ids = dense(data[DOC_IDS_KEY]).to(query.device)
    doc_mask = dense(data[DOC_MASK_KEY]).to(query.device).bool()
    if DOC_EMBEDDING_KEY in model_output:  # doc_grad: re-encoded documents, env vectors for the rest
        encoded = model_output[DOC_GRAD_MASK_KEY].to(query.device)
        docs = torch.where(encoded[..., None], model_output[DOC_EMBEDDING_KEY].float(), docs)
        metrics["actor/doc_grad_frac"] = encoded[doc_mask].float().mean().item() if doc_mask.any() else 0.0
    found = query.detach().norm(dim=-1) > 0
    # a row without a positive (no embed token, verl's padding) offers no in-batch negative either
    n_rows, n_cols = len(query), len(query) * doc_mask.shape[1]
    exclude = (~doc_mask[:, 0])[None, :].expand(n_rows, -1)
    exclude = torch.cat([exclude, exclude.new_zeros(n_rows, n_cols - n_rows)], dim=1)
    nce = InfoNCELoss(temperature=contrastive.temperature, in_batch_negatives=contrastive.in_batch_negatives)
    args = (query, docs[:, 0], docs[:, 1:], doc_mask[:, 1:], doc_ids[:, 0], doc_ids[:, 1:])
    n_valid = found.sum()
    nce_sum = nce(*args, query_mask=found, exclude=exclude) * n_valid
    scale = data["dp_size"] / data["global_batch_size"]
    loss = loss + contrastive.coef * nce_sum * scale

    with torch.no_grad():
        scores, labels = nce.scores(*args, exclude=exclude)
        metrics["actor/contrastive_loss"] = (nce_sum / n_valid.clamp(min=1)).item()
        metrics["actor/contrastive_acc"] = in_batch_accuracy(scores, labels, found).item()
        metrics["actor/embed_found_frac"] = found.float().mean().item()
        metrics["actor/embed_norm_pre"] = query.norm(dim=-1)[found].mean().item() if found.any() else 0.0
    return loss, metrics


def document_batch(token_ids: list[list[int]], pad_to_multiple: int = 1) -> TensorDict:
    """A forward-only batch of document prompts for :meth:`SearchR3ActorRolloutRefWorker.encode_documents`.

    Nested ``input_ids`` / ``position_ids`` / ``loss_mask`` ``(B', j)`` in verl's no-padding
    layout, flagged :data:`~verl_search_r3.rl.engine.EMBED_ONLY_KEY` (decoder only, no
    log-probs); the list is padded (by repeating its last prompt) to a multiple of
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
    tu.assign_non_tensor(batch, temperature=1.0, **{EMBED_ONLY_KEY: True})
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
        settings = ContrastiveConfig(**(contrastive or {}))
        add_embedding_outputs(engine, engine.module, token_id, doc_grad_max_docs=settings.doc_grad_max_docs)
        from functools import partial

        from verl.utils.config import omega_conf_to_dataclass

        actor_config: ActorConfig = omega_conf_to_dataclass(self.config.actor)
        actor_config.model_config = self.actor.model_config
        self.loss_fn = partial(search_r3_ppo_loss, config=actor_config, contrastive=settings)
        self.actor.set_loss_fn(self.loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def encode_documents(self, data: TensorDict) -> TensorDict:
        """Embed document prompts: ``input_ids``/``position_ids`` nested ``(B, j)`` -> ``EMBEDDING_KEY (B, H)``.

        Runs the actor's forward-only path (micro-batching, dynamic batch size and offload as
        configured for the log-prob pass) through the decoder only (see :func:`document_batch`).
        """
        tu.assign_non_tensor(data, compute_loss=False, calculate_entropy=False)
        output = self.actor.infer_batch(data)
        return output.select(EMBEDDING_KEY).cpu() if output is not None else None
