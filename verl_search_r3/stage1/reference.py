"""A single-process reference run of Stage 1: same data path, same loss, plain PyTorch, no FSDP.

:func:`run_reference` trains a Hugging Face causal LM for a few optimizer steps on
``pairs.parquet`` groups exactly as ``python -m verl_search_r3.stage1`` does on GPUs —
:class:`~verl_search_r3.stage1.data.PairsGroupDataset` and
:class:`~verl_search_r3.stage1.data.GroupCollator` for the data, the Stage-1 objective for the loss —
with two differences that do not change the maths: the whole batch is one micro-batch, and the
KL term is the exact full-vocabulary :func:`~verl_search_r3.losses.token_kl` (the engine keeps
the reference's top ``kl_topk`` tokens) against a frozen copy of the starting model. It runs on
CPU with the tiny model of :mod:`verl_search_r3.tiny`, for tests, the quickstart and
``benchmarks/sft_cranfield.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..embedding import gather_embeddings, last_token_positions, pad_sequences
from ..tokens import embed_token_id
from .data import (
    DOC_KEY,
    RELEVANT_KEY,
    VALID_KEY,
    GroupCollator,
    GroupDataConfig,
    PairsGroupDataset,
    relevance_exclusion,
    split_groups,
)
from .loss import Stage1LossConfig

__all__ = ["PairsLike", "stage1_forward", "reference_loss", "run_reference"]

PairsLike = str | Sequence[str] | pa.Table | Sequence[dict[str, Any]]
"""``pairs.parquet`` path(s), a ``pyarrow.Table`` or row dicts with its columns."""


def _as_pairs(pairs: PairsLike) -> str | Sequence[str] | pa.Table:
    if isinstance(pairs, (str, pa.Table)):
        return pairs
    pairs = list(pairs)
    if pairs and isinstance(pairs[0], dict):
        return pa.Table.from_pylist(pairs)
    return pairs


def stage1_forward(model: nn.Module, batch: dict[str, Tensor], pad_id: int, token_id: int) -> dict[str, Tensor]:
    """One forward over a collated batch of groups (``S`` sequences, left-padded to ``L``).

    Returns:
        ``embeddings (S, H)`` unit final-norm states at the last embed token (zero if missing),
        ``found (S,)``, and over the last ``W`` positions — enough to hold every assistant turn
        and the position predicting its first token — ``logits (S, W, V)``, ``input_ids (S, W)``
        and ``loss_mask (S, W)``.
    """
    seqs = [t.tolist() for t in batch["input_ids"].unbind()]
    input_ids, attention_mask = pad_sequences(seqs, pad_id, side="left")
    loss_mask, _ = pad_sequences([t.tolist() for t in batch["loss_mask"].unbind()], 0, side="left")
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    input_ids, attention_mask, loss_mask, position_ids = (
        t.to(device) for t in (input_ids, attention_mask, loss_mask, position_ids)
    )
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    positions, found = last_token_positions(input_ids, token_id, attention_mask)
    window = min(int(loss_mask.sum(-1).max()) + 1, input_ids.shape[1])
    return {
        "embeddings": gather_embeddings(hidden, positions, found),
        "found": found,
        "logits": model.get_output_embeddings()(hidden[:, -window:]),
        "input_ids": input_ids[:, -window:],
        "loss_mask": loss_mask[:, -window:],
    }


def reference_loss(
    out: dict[str, Tensor], batch: dict[str, Tensor], group_size: int, loss: nn.Module, ref_logits: Tensor | None
) -> Any:
    """:class:`~verl_search_r3.losses.Stage1Loss` on :func:`stage1_forward`'s output for a batch of groups."""
    query, positive, negatives = split_groups(out["embeddings"], group_size)
    found_q, found_p, found_n = split_groups(out["found"], group_size)
    device = query.device
    _, positive_keys, negative_keys = (t.to(device) for t in split_groups(batch[DOC_KEY], group_size))
    _, _, negatives_valid = split_groups(batch[VALID_KEY].to(device), group_size)
    relevant = split_groups(batch[RELEVANT_KEY], group_size)[0].to(device)
    return loss(
        query=query,
        positive=positive,
        negatives=negatives,
        negatives_mask=negatives_valid & found_n,
        positive_ids=positive_keys,
        negative_ids=negative_keys,
        query_mask=found_q & found_p,
        logits=out["logits"],
        input_ids=out["input_ids"],
        loss_mask=out["loss_mask"],
        ref_logits=ref_logits,
        exclude=relevance_exclusion(positive_keys, negative_keys, relevant),
    )


def _batches(loader: DataLoader) -> Iterator[dict[str, Tensor]]:
    while True:
        yield from loader


def run_reference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: PairsLike,
    steps: int = 20,
    batch_size: int = 8,
    lr: float = 1e-3,
    loss_config: Stage1LossConfig | None = None,
    data_config: GroupDataConfig | None = None,
    eval_groups: int = 32,
    eval_split: str | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``steps`` AdamW steps on Stage-1 groups; return per-step metrics.

    Training batches are ``batch_size`` groups of the ``data_config.train_split`` rows, shuffled
    with ``seed``. Evaluation uses the first ``eval_groups`` groups of ``eval_split`` as one
    in-batch retrieval problem: held-out queries by default, the training rows to check the fit.

    Args:
        model: a causal LM whose tokenizer has ``<|embed_token|>`` (see
            :func:`~verl_search_r3.tokens.add_embed_token`); it is the KL reference's starting point.
        tokenizer: its tokenizer.
        pairs: ``pairs.parquet`` path(s), a table or row dicts.
        steps, batch_size, lr: optimisation.
        loss_config: the loss (default: :class:`~verl_search_r3.stage1.loss.Stage1LossConfig`).
        data_config: the dataset (default: :class:`~verl_search_r3.stage1.data.GroupDataConfig`).
        eval_groups: size of the fixed evaluation batch.
        eval_split: ``split`` of the evaluation rows; None = ``data_config.val_split``.
        seed: shuffling and initialisation seed.

    Returns:
        ``metrics[0]``: ``{"step": 0, "eval_infonce", "eval_accuracy"}`` before training; then one
        dict per step: ``loss``, ``sft``, ``kl``, ``infonce``, ``triplet``, ``accuracy`` on that
        step's batch before its update (terms with weight 0 are absent), and ``eval_infonce`` /
        ``eval_accuracy`` after it.
    """
    loss_config = loss_config or Stage1LossConfig()
    data_config = data_config or GroupDataConfig()
    torch.manual_seed(seed)
    source = _as_pairs(pairs)
    train = PairsGroupDataset(source, tokenizer, data_config, split=data_config.train_split)
    split = eval_split or data_config.val_split
    held_out = PairsGroupDataset(source, tokenizer, data_config, split=split, max_samples=eval_groups)
    collate = GroupCollator()
    eval_batch = collate([held_out[i] for i in range(len(held_out))])
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise ValueError(f"{len(train)} training groups are fewer than batch_size={batch_size}")

    group_size, token_id = data_config.group_size, embed_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # masked anyway
    objective = loss_config.reference_loss()
    reference = None
    if loss_config.kl_weight:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            out = stage1_forward(model, eval_batch, pad_id, token_id)
            query, positive, negatives = split_groups(out["embeddings"], group_size)
            _, pos_keys, neg_keys = split_groups(eval_batch[DOC_KEY], group_size)
            _, _, valid = split_groups(eval_batch[VALID_KEY], group_size)
            relevant = split_groups(eval_batch[RELEVANT_KEY], group_size)[0]
            args = (query, positive, negatives, valid, pos_keys, neg_keys)
            exclude = relevance_exclusion(pos_keys, neg_keys, relevant)
            scores, labels = objective.infonce.scores(*args, exclude=exclude)
            return {
                "eval_infonce": float(objective.infonce(*args, exclude=exclude)),
                "eval_accuracy": float((scores.argmax(-1) == labels).float().mean()),
            }

    metrics: list[dict[str, float]] = [{"step": 0, **evaluate()}]
    for step, batch in zip(range(1, steps + 1), _batches(loader)):
        model.train()
        out = stage1_forward(model, batch, pad_id, token_id)
        ref_logits = None
        if reference is not None:
            with torch.no_grad():
                ref_logits = stage1_forward(reference, batch, pad_id, token_id)["logits"]
        result = reference_loss(out, batch, group_size, objective, ref_logits)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        row = {"step": step, "loss": float(result.loss.detach())}
        row.update({name: float(value) for name, value in result.parts.items()})
        row.update(evaluate())
        metrics.append(row)
    return metrics
