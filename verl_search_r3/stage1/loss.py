"""The Stage-1 loss on verl's engine: SFT + KL to the base model + InfoNCE + triplet, per micro-batch.

:class:`Stage1EngineLoss` is the ``loss_fn`` installed with ``TrainingWorker.set_loss_fn``. verl
calls it once per micro-batch with ``model_output`` (per-token ``log_probs`` of the labels, plus
:data:`~verl_search_r3.rl.engine.EMBEDDING_KEY` from
:func:`~verl_search_r3.rl.engine.add_embedding_outputs`) and the micro-batch ``data`` (groups laid
out by :mod:`verl_search_r3.stage1.data`).

**KL term.** verl's ``model_output`` has no logits, and a log-ratio estimator on the *data*
tokens (k1/k3, as verl's ``kl_penalty``) is the wrong tool here: those tokens are not samples
of the policy, and where the base model gives the target a tiny probability — the new
``<|embed_token|>`` above all — the k1/k3 gradient equals the SFT gradient with the opposite
sign (for k1 always, for k3 as the base probability goes to 0), so with the paper's unit weights
SFT could never teach the format. We compute the real per-token ``KL(π_ref ‖ π_θ)`` over the
vocabulary instead, restricted to the ``kl_topk`` most likely tokens of the reference (the
approach of verl's own top-k distillation, ``verl/trainer/distillation``):

1. the frozen reference engine, made by :func:`add_reference_topk_outputs`, returns the
   reference's top-k log-probs and ids at every position that predicts an assistant token
   (:data:`REF_LOGP_KEY`, :data:`REF_IDS_KEY`, nested ``(S, j, k)``);
2. on the policy forward, verl's logits-processor hook (``distillation_use_topk=True`` on the
   batch; ``prepare_model_outputs`` then calls the loss function with ``student_logits``) lets
   this loss compute ``Σ_k p_ref (log p_ref − log π_θ)`` from the full policy logits at those
   positions (:data:`KL_KEY`), with gradients, before verl reduces the logits to log-probs.

With ``kl_topk`` equal to the vocabulary size this is exactly
:func:`~verl_search_r3.losses.token_kl` (``direction="ref_policy"``); :data:`REF_LOGP_KEY`'s
covered mass is logged as ``search_r3/ref_topk_mass``.

**Normalisation.** Like verl's ``sft_loss``, every term is a micro-batch *sum* divided by its
global count and multiplied by ``dp_size``, so summed micro-batch gradients and FSDP's mean over
ranks give the global mean: tokens for SFT/KL (``batch_num_tokens``), groups for InfoNCE and
accuracy, (query, negative) pairs for the triplet term (counts set by :func:`assign_group_counts`).
The one micro-batch dependence left is by design: in-batch negatives are the other groups of
the same micro-batch. Metrics are :class:`verl.utils.metric.Metric` with ``SUM`` aggregation,
i.e. global means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor
from verl.trainer.distillation.fsdp.losses import kl_divergence
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric

from ..config_utils import dataclass_from_dict
from ..losses import InfoNCELoss, TripletMarginLoss, group_cosine_similarity, in_batch_accuracy
from ..rl.engine import EMBEDDING_KEY
from .data import DOC_KEY, GROUP_KEY, RELEVANT_KEY, ROLE_KEY, VALID_KEY, check_groups, relevance_exclusion, split_groups

__all__ = [
    "REF_LOGP_KEY",
    "REF_IDS_KEY",
    "KL_KEY",
    "NUM_GROUPS_KEY",
    "NUM_PAIRS_KEY",
    "NUM_TRIPLET_QUERIES_KEY",
    "Stage1LossConfig",
    "predicting_rows",
    "assign_group_counts",
    "add_reference_topk_outputs",
    "Stage1EngineLoss",
]

REF_LOGP_KEY = "search_r3_ref_topk_logp"
"""Batch field: nested ``(S, j, k)`` float32 top-k log-probs of the reference (0 off the assistant rows)."""
REF_IDS_KEY = "search_r3_ref_topk_ids"
"""Batch field: nested ``(S, j, k)`` int64 token ids of :data:`REF_LOGP_KEY`."""
KL_KEY = "search_r3_kl"
"""``model_output`` field: nested ``(S, j)`` per-position ``KL(π_ref ‖ π_θ)`` over the top-k support."""
NUM_GROUPS_KEY = "search_r3_num_groups"
"""Non-tensor batch entry: number of groups in the global batch (all DP ranks)."""
NUM_PAIRS_KEY = "search_r3_num_pairs"
"""Non-tensor batch entry: number of (query, valid negative) pairs in the global batch."""
NUM_TRIPLET_QUERIES_KEY = "search_r3_num_triplet_queries"
"""Non-tensor batch entry: number of groups with at least one valid negative in the global batch."""


@dataclass
class Stage1LossConfig:
    """Loss knobs (config block ``search_r3.loss``); defaults are the paper's unweighted sum.

    Attributes:
        sft_weight: weight of the token cross-entropy on the assistant turns.
        kl_weight: weight of ``KL(π_ref ‖ π_θ)`` to the frozen base model on the same tokens;
            0 also skips building the reference model.
        infonce_weight: weight of InfoNCE (query vs positive, in-batch and hard negatives).
        triplet_weight: weight of the triplet margin loss over the hard negatives.
        temperature: InfoNCE τ (cosine / τ).
        margin: triplet θ on cosine similarity.
        symmetric: also the positive→query InfoNCE direction.
        triplet_reduction: ``mean`` over a query's negatives or ``max`` (hardest one).
        in_batch_negatives: other groups' documents of the micro-batch are negatives too.
        kl_topk: reference tokens per position kept for the KL (vocabulary size = exact KL).
    """

    sft_weight: float = 1.0
    kl_weight: float = 1.0
    infonce_weight: float = 1.0
    triplet_weight: float = 1.0
    temperature: float = 0.05
    margin: float = 0.1
    symmetric: bool = False
    triplet_reduction: Literal["mean", "max"] = "mean"
    in_batch_negatives: bool = True
    kl_topk: int = 64

    def __post_init__(self) -> None:
        for name in ("sft_weight", "kl_weight", "infonce_weight", "triplet_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"search_r3.loss.{name} must be >= 0")
        if self.kl_topk < 1:
            raise ValueError("search_r3.loss.kl_topk must be >= 1")

    @classmethod
    def from_config(cls, cfg: Any) -> Stage1LossConfig:
        """From a mapping or an OmegaConf node (missing keys take the defaults above)."""
        return dataclass_from_dict(cls, cfg, "search_r3.loss")


def predicting_rows(loss_mask: Tensor) -> Tensor:
    """``(T,)`` bool over the packed tokens: position ``t`` predicts token ``t + 1`` of the same
    sequence and that token has ``loss_mask`` 1 (the alignment of verl's ``log_probs``).

    Args:
        loss_mask: jagged nested ``(S, j)``.
    """
    values, offsets = loss_mask.values().bool(), loss_mask.offsets()
    rows = torch.zeros_like(values)
    rows[:-1] = values[1:]
    rows[offsets[1:] - 1] = False  # the last token of a sequence predicts nothing
    return rows


def assign_group_counts(data: TensorDict, group_size: int, dp_group: Any = None) -> None:
    """Store the global group / pair counts that normalise the embedding terms.

    Call on a rank's whole batch before verl splits it into micro-batches; sums over
    ``dp_group`` when torch.distributed is initialised.
    """
    _, _, neg_valid = split_groups(data[VALID_KEY].bool(), group_size)
    counts = torch.tensor(
        [neg_valid.shape[0], int(neg_valid.sum()), int(neg_valid.any(dim=1).sum())], dtype=torch.long
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from verl.utils.device import get_device_id

        counts = counts.to(get_device_id())
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=dp_group)
    groups, pairs, triplet_queries = (int(c) for c in counts.tolist())
    tu.assign_non_tensor(
        data, **{NUM_GROUPS_KEY: groups, NUM_PAIRS_KEY: pairs, NUM_TRIPLET_QUERIES_KEY: triplet_queries}
    )


def _row_logits(logits: Tensor, loss_mask: Tensor, rows: Tensor, packed: bool) -> Tensor:
    """Logits ``(M, V)`` at the packed positions ``rows`` (``(M,)`` long).

    ``logits`` is packed ``(1, T', V)`` (``T' >= T``; a trailing pad is ignored) or padded
    ``(S, L, V)`` with each sequence starting at column 0 (verl's no-remove-padding layout).
    """
    if packed:
        return logits.reshape(-1, logits.shape[-1])[rows]
    offsets = loss_mask.offsets().to(rows.device)
    seq = torch.searchsorted(offsets, rows, right=True) - 1
    return logits[seq, rows - offsets[seq]]


def _reference_engine_class(base: type) -> type:
    """A subclass of the engine class ``base`` whose outputs add the reference's top-k log-probs."""

    class _ReferenceTopK(base):  # type: ignore[misc, valid-type]
        search_r3_topk: int

        def prepare_model_outputs(self, output, output_args, micro_batch: TensorDict, logits_processor_func):
            model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
            logits = getattr(output, "logits", None)
            if logits is None:
                raise ValueError("the Search-R3 KL reference needs logits: set model.use_fused_kernels=False")
            loss_mask = micro_batch["loss_mask"]
            rows = predicting_rows(loss_mask).nonzero().squeeze(-1)
            packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
            with torch.no_grad():
                logp = F.log_softmax(_row_logits(logits, loss_mask, rows, packed).float(), dim=-1)
                values, ids = logp.topk(min(self.search_r3_topk, logp.shape[-1]), dim=-1)
            n_tokens, k = loss_mask.values().shape[0], values.shape[-1]
            offsets = loss_mask.offsets()
            dense_values = values.new_zeros((n_tokens, k)).index_put((rows,), values)
            dense_ids = ids.new_zeros((n_tokens, k)).index_put((rows,), ids)
            model_output[REF_LOGP_KEY] = torch.nested.nested_tensor_from_jagged(dense_values, offsets)
            model_output[REF_IDS_KEY] = torch.nested.nested_tensor_from_jagged(dense_ids, offsets)
            return model_output

    _ReferenceTopK.__name__ = f"SearchR3Reference{base.__name__}"
    _ReferenceTopK.__qualname__ = _ReferenceTopK.__name__
    return _ReferenceTopK


def add_reference_topk_outputs(engine: Any, topk: int) -> None:
    """Make a (forward-only) LM-head engine also return :data:`REF_LOGP_KEY` / :data:`REF_IDS_KEY`:
    the top-``topk`` log-probs of the next token at every position that predicts an assistant
    token (``loss_mask`` of the next token is 1). Swaps ``engine.__class__``; idempotent."""
    if not getattr(engine, "search_r3_reference", False):
        engine.__class__ = _reference_engine_class(type(engine))
        engine.search_r3_reference = True
    engine.search_r3_topk = topk


def _sum_metric(value: Tensor | float) -> Metric:
    return Metric(aggregation=AggregationType.SUM, value=float(value))


class Stage1EngineLoss:
    """Search-R3's Stage-1 loss as a verl engine loss function (see the module docstring).

    Called by verl either as the loss, ``(model_output, data, dp_group) -> (loss, metrics)``, or,
    when the batch carries ``distillation_use_topk=True``, as the logits processor,
    ``(student_logits=(1, T', V), data) -> {KL_KEY: (1, T')}`` — the same convention as verl's
    ``distillation_ppo_loss``.

    Args:
        config: term weights and hyper-parameters.
        group_size: sequences per group (``2 + num_negatives``).
    """

    def __init__(self, config: Stage1LossConfig, group_size: int):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (query and positive), got {group_size}")
        if config.triplet_weight and group_size < 3:
            raise ValueError("the triplet term needs hard negatives: set data.search_r3.num_negatives > 0 or triplet_weight=0")
        self.config = config
        self.group_size = group_size
        self.infonce = InfoNCELoss(config.temperature, config.symmetric, config.in_batch_negatives)
        self.triplet = TripletMarginLoss(config.margin, config.triplet_reduction)

    def __call__(
        self,
        model_output: dict[str, Tensor] | None = None,
        data: TensorDict | None = None,
        dp_group: Any = None,
        student_logits: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Metric]] | dict[str, Tensor]:
        if student_logits is not None:
            return {KL_KEY: self.token_kl(student_logits, data)}
        return self.loss(model_output, data)

    def token_kl(self, student_logits: Tensor, data: TensorDict) -> Tensor:
        """``(1, T')`` per-position top-k ``KL(π_ref ‖ π_θ)``, 0 off the predicting rows."""
        if REF_LOGP_KEY not in data.keys():
            raise ValueError(f"the KL term needs {REF_LOGP_KEY} from the reference engine in the batch")
        rows = predicting_rows(data["loss_mask"]).nonzero().squeeze(-1)
        logp = F.log_softmax(student_logits[0, rows].float(), dim=-1)
        ref_logp = data[REF_LOGP_KEY].values()[rows].float()
        ref_ids = data[REF_IDS_KEY].values()[rows].long()
        kl = kl_divergence(log_q=logp.gather(-1, ref_ids), log_p=ref_logp)
        return student_logits.new_zeros(student_logits.shape[1], dtype=torch.float32).index_put((rows,), kl)[None]

    def loss(self, model_output: dict[str, Tensor], data: TensorDict) -> tuple[Tensor, dict[str, Metric]]:
        """Weighted sum of the terms for one micro-batch, normalised as in the module docstring."""
        cfg, G = self.config, self.group_size
        dp_size = data["dp_size"]
        rows = predicting_rows(data["loss_mask"])
        zero = rows.new_zeros((), dtype=torch.float32)
        total, metrics = zero, {}

        def add(name: str, weight: float, value: Tensor) -> None:
            nonlocal total
            total = total + weight * value
            metrics[f"search_r3/{name}"] = _sum_metric(value.detach())

        token_scale = dp_size / max(data["batch_num_tokens"], 1)  # 0 when no sequence of the step has trained tokens
        if cfg.sft_weight:
            add("sft", cfg.sft_weight, -model_output["log_probs"].values().float()[rows].sum() * token_scale)
        if cfg.kl_weight:
            if KL_KEY not in model_output:
                raise ValueError(
                    "the KL term got no per-token KL from the engine: the batch needs distillation_use_topk=True "
                    "and model.use_fused_kernels=False (the Search-R3 SFT trainer sets the former)"
                )
            add("kl", cfg.kl_weight, model_output[KL_KEY].values()[rows].sum() * token_scale)
            ref_mass = data[REF_LOGP_KEY].values()[rows].float().exp().sum(-1).sum()
            metrics["search_r3/ref_topk_mass"] = _sum_metric(ref_mass * token_scale)

        if NUM_GROUPS_KEY not in data.keys():
            raise ValueError("the batch has no global group counts: call assign_group_counts on it before micro-batching")
        check_groups(data[ROLE_KEY], data[GROUP_KEY], G)
        query, positive, negatives = split_groups(model_output[EMBEDDING_KEY], G)
        _, positive_keys, negative_keys = split_groups(data[DOC_KEY], G)
        _, _, negatives_valid = split_groups(data[VALID_KEY].bool(), G)
        relevant = split_groups(data[RELEVANT_KEY], G)[0]
        found = (query.detach().norm(dim=-1) > 0) & (positive.detach().norm(dim=-1) > 0)
        negatives_mask = negatives_valid & (negatives.detach().norm(dim=-1) > 0)
        exclude = relevance_exclusion(positive_keys, negative_keys, relevant)
        args = (query, positive, negatives, negatives_mask, positive_keys, negative_keys)
        group_scale = dp_size / data[NUM_GROUPS_KEY]
        n_found = found.sum()

        if cfg.infonce_weight:
            nce = self.infonce(*args, query_mask=found, exclude=exclude)
            add("infonce", cfg.infonce_weight, nce * n_found * group_scale)
        if cfg.triplet_weight:
            valid_pairs = negatives_mask & found[:, None]
            if cfg.triplet_reduction == "mean":
                count, denominator = valid_pairs.sum(), data[NUM_PAIRS_KEY]
            else:
                count, denominator = valid_pairs.any(dim=1).sum(), data[NUM_TRIPLET_QUERIES_KEY]
            hinge = self.triplet(query, positive, negatives, negatives_mask, found)
            add("triplet", cfg.triplet_weight, hinge * count * dp_size / max(denominator, 1))
        with torch.no_grad():
            scores, labels = self.infonce.scores(*args, exclude=exclude)
            accuracy = in_batch_accuracy(scores, labels, found) * n_found * group_scale
            metrics["search_r3/accuracy"] = _sum_metric(accuracy)
            pos_cos = group_cosine_similarity(query, positive[:, None])[:, 0][found].sum() * group_scale
            neg_cos = group_cosine_similarity(query, negatives)[negatives_mask].sum()
            metrics["search_r3/pos_cos"] = _sum_metric(pos_cos)
            metrics["search_r3/neg_cos"] = _sum_metric(neg_cos * dp_size / max(data[NUM_PAIRS_KEY], 1))
        return total, metrics
