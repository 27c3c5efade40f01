"""Stage-1 losses of Search-R3: SFT cross-entropy, KL to the base model, InfoNCE and triplet margin.

Search-R3 (Gui & Cheng, 2025, arXiv 2510.07048) trains its first stage on
``L = L_SFT + L_KL + L_InfoNCE + L_triplet`` over (query, positive, hard negatives) groups, with
embeddings read at ``<|embed_token|>``. The paper does not publish its constants; every constant
here is an argument with a documented default, and the weights default to the paper's unweighted
sum.

Shapes: ``B`` groups, ``N`` hard negatives per group, ``H`` hidden size, ``L`` sequence length,
``V`` vocabulary. Embeddings need not be normalised: similarities are cosines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "cosine_similarity_matrix",
    "group_cosine_similarity",
    "InfoNCELoss",
    "TripletMarginLoss",
    "sft_cross_entropy",
    "token_kl",
    "in_batch_accuracy",
    "Stage1Loss",
    "Stage1Output",
]

IdsLike = Tensor | Sequence[int] | Sequence[str]


def _no_autocast(t: Tensor) -> torch.autocast:
    """Autocast off on ``t``'s device. verl calls losses inside its bf16 autocast block, where a
    float32 matmul still returns bf16: at τ = 0.05 a logit cos/τ near 20 moves by up to 0.06,
    the size of a real positive vs hard-negative gap."""
    return torch.autocast(t.device.type, enabled=False)


def cosine_similarity_matrix(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``(P, H) x (M, H) -> (P, M)`` cosine similarities in float32, also under autocast."""
    with _no_autocast(a):
        return F.normalize(a.float(), dim=-1, eps=eps) @ F.normalize(b.float(), dim=-1, eps=eps).T


def group_cosine_similarity(query: Tensor, docs: Tensor, eps: float = 1e-12) -> Tensor:
    """``(B, H) x (B, N, H) -> (B, N)``: each query against its own documents, float32, also under autocast."""
    with _no_autocast(query):
        q = F.normalize(query.float(), dim=-1, eps=eps)
        return torch.einsum("bh,bnh->bn", q, F.normalize(docs.float(), dim=-1, eps=eps))


def _as_id_tensors(positive_ids: IdsLike | None, negative_ids: IdsLike | None, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """Map document ids (ints or strings) to one shared integer space."""
    if positive_ids is None:
        return None, None
    if isinstance(positive_ids, Tensor) and (negative_ids is None or isinstance(negative_ids, Tensor)):
        return positive_ids.to(device), None if negative_ids is None else negative_ids.to(device)
    vocab: dict[object, int] = {}

    def encode(ids: object) -> object:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        if isinstance(ids, (list, tuple)):
            return [encode(x) for x in ids]
        return vocab.setdefault(ids, len(vocab))

    pos = torch.tensor(encode(positive_ids), dtype=torch.long, device=device)
    neg = None if negative_ids is None else torch.tensor(encode(negative_ids), dtype=torch.long, device=device)
    return pos, neg


class InfoNCELoss(nn.Module):
    """InfoNCE with in-batch and hard negatives (van den Oord et al., 2018, "Representation
    Learning with Contrastive Predictive Coding"; in-batch negatives as in Karpukhin et al., 2020,
    "Dense Passage Retrieval").

    For query ``i`` the candidates are every positive in the batch and every hard negative in the
    batch; the target is its own positive::

        loss_i = -log( exp(cos(q_i, p_i)/τ) / Σ_c exp(cos(q_i, c)/τ) )

    Candidates that are actually relevant to query ``i`` are removed from its denominator: another
    row's positive or a hard negative with the same document id as ``p_i`` (pass ``positive_ids``
    / ``negative_ids``), and any candidate flagged in ``exclude`` (e.g. documents known to be
    relevant to query ``i``). With ``symmetric=True`` the document-to-query direction (each positive
    against all queries) is added and the two are averaged.

    Args:
        temperature: τ; similarities are divided by it.
        symmetric: also compute the positive→query loss.
        in_batch_negatives: if False, each query sees only its own positive and hard negatives.
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False, in_batch_negatives: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature
        self.symmetric = symmetric
        self.in_batch_negatives = in_batch_negatives

    def scores(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        negatives_mask: Tensor | None = None,
        positive_ids: IdsLike | None = None,
        negative_ids: IdsLike | None = None,
        exclude: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Masked logits ``(B, B + B*N)`` (``-inf`` = excluded) and labels ``(B,)``.

        Columns are ``[p_0 … p_{B-1}, n_{0,0} … n_{0,N-1}, n_{1,0} …]``.

        Args:
            query: ``(B, H)``.
            positive: ``(B, H)``.
            negatives: ``(B, N, H)`` hard negatives, or None.
            negatives_mask: ``(B, N)`` bool, False for padding negatives.
            positive_ids: ``(B,)`` document ids of the positives (ints or strings).
            negative_ids: ``(B, N)`` document ids of the hard negatives.
            exclude: ``(B, B + B*N)`` bool, True = remove that candidate from row ``i``'s
                denominator; the row's own positive (column ``i``) is never removed.
        """
        bsz, device = query.shape[0], query.device
        docs = positive if negatives is None else torch.cat([positive, negatives.reshape(-1, negatives.shape[-1])])
        logits = cosine_similarity_matrix(query, docs) / self.temperature
        n_neg = 0 if negatives is None else negatives.shape[1]
        extra, exclude = exclude, torch.zeros_like(logits, dtype=torch.bool)
        own = torch.eye(bsz, dtype=torch.bool, device=device)

        if not self.in_batch_negatives:
            exclude[:, :bsz] = ~own
            if n_neg:
                owner = torch.arange(bsz, device=device).repeat_interleave(n_neg)
                exclude[:, bsz:] = owner[None, :] != torch.arange(bsz, device=device)[:, None]
        if negatives_mask is not None and n_neg:
            exclude[:, bsz:] |= ~negatives_mask.reshape(1, -1).to(device).bool()
        pos_ids, neg_ids = _as_id_tensors(positive_ids, negative_ids, device)
        if pos_ids is not None:
            exclude[:, :bsz] |= (pos_ids[:, None] == pos_ids[None, :]) & ~own
            if neg_ids is not None and n_neg:
                exclude[:, bsz:] |= pos_ids[:, None] == neg_ids.reshape(1, -1)
        if extra is not None:
            exclude |= extra.to(device).bool() & ~F.pad(own, (0, logits.shape[1] - bsz))
        logits = logits.masked_fill(exclude, float("-inf"))
        return logits, torch.arange(bsz, device=device)

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        negatives_mask: Tensor | None = None,
        positive_ids: IdsLike | None = None,
        negative_ids: IdsLike | None = None,
        query_mask: Tensor | None = None,
        exclude: Tensor | None = None,
    ) -> Tensor:
        """Mean loss over the rows where ``query_mask`` (``(B,)`` bool) is True; 0 if none."""
        logits, labels = self.scores(query, positive, negatives, negatives_mask, positive_ids, negative_ids, exclude)
        rows = torch.ones_like(labels, dtype=torch.bool) if query_mask is None else query_mask.bool()
        loss = _masked_mean(F.cross_entropy(logits, labels, reduction="none"), rows)
        if not self.symmetric:
            return loss
        back = cosine_similarity_matrix(positive, query) / self.temperature
        pos_ids, _ = _as_id_tensors(positive_ids, None, query.device)
        not_own = ~torch.eye(len(labels), dtype=torch.bool, device=query.device)
        back_exclude = ~rows[None, :].expand_as(back).clone()  # queries without an embedding
        if pos_ids is not None:
            back_exclude |= (pos_ids[:, None] == pos_ids[None, :]) & not_own
        if exclude is not None:  # p_j relevant to q_i: q_i is not a negative of p_j
            back_exclude |= exclude[:, : len(labels)].T.to(query.device).bool() & not_own
        back = back.masked_fill(back_exclude, float("-inf"))
        back_loss = _masked_mean(F.cross_entropy(back, labels, reduction="none"), rows)
        return (loss + back_loss) / 2


class TripletMarginLoss(nn.Module):
    """Triplet margin loss on cosine similarity (Schroff et al., 2015, "FaceNet")::

        loss = max(0, cos(q, n) - cos(q, p) + θ)

    which equals ``torch.nn.TripletMarginWithDistanceLoss`` with distance ``1 - cos``. With
    several hard negatives per query the hinge is averaged over them (``reduction="mean"``) or
    taken on the hardest one (``"max"``).

    Args:
        margin: θ.
        reduction: how the ``N`` negatives of a query are combined.
    """

    def __init__(self, margin: float = 0.1, reduction: Literal["mean", "max"] = "mean"):
        super().__init__()
        if reduction not in ("mean", "max"):
            raise ValueError("reduction must be 'mean' or 'max'")
        self.margin = margin
        self.reduction = reduction

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor,
        negatives_mask: Tensor | None = None,
        query_mask: Tensor | None = None,
    ) -> Tensor:
        """``query (B, H)``, ``positive (B, H)``, ``negatives (B, N, H)``, masks ``(B, N)`` / ``(B,)``."""
        pos_sim = group_cosine_similarity(query, positive[:, None])[:, 0]  # (B,)
        neg_sim = group_cosine_similarity(query, negatives)  # (B, N)
        hinge = F.relu(neg_sim - pos_sim[:, None] + self.margin)
        valid = torch.ones_like(hinge, dtype=torch.bool) if negatives_mask is None else negatives_mask.bool()
        if query_mask is not None:
            valid = valid & query_mask.bool()[:, None]
        if self.reduction == "max":
            per_query = hinge.masked_fill(~valid, float("-inf")).amax(dim=1)
            return _masked_mean(per_query, valid.any(dim=1))
        return _masked_mean(hinge, valid)


def sft_cross_entropy(
    logits: Tensor, input_ids: Tensor, loss_mask: Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Next-token cross-entropy on the tokens where ``loss_mask`` is 1 (the assistant turn).

    Args:
        logits: ``(B, L, V)``; position ``t`` predicts token ``t + 1``.
        input_ids: ``(B, L)``.
        loss_mask: ``(B, L)``, 1 on the tokens to be *predicted*.
        reduction: ``"mean"`` over masked tokens, or ``"sum"`` (for callers that normalise globally).
    """
    mask = loss_mask[:, 1:].bool()
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return nll[mask].sum() if reduction == "sum" else _masked_mean(nll, mask)


def token_kl(
    logits: Tensor,
    ref_logits: Tensor,
    loss_mask: Tensor,
    direction: Literal["ref_policy", "policy_ref"] = "ref_policy",
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Per-token KL between the model and a reference (the frozen base model), on masked tokens.

    ``"ref_policy"`` is ``KL(π_ref ‖ π_θ)``, the distillation direction: it keeps mass wherever
    the base model puts it, which is how Search-R3's KL term preserves the base model's language
    ability. ``"policy_ref"`` is ``KL(π_θ ‖ π_ref)``, the RLHF direction. The sum runs over the
    full vocabulary at every position.

    Args:
        logits, ref_logits: ``(B, L, V)``, aligned like :func:`sft_cross_entropy`.
        loss_mask: ``(B, L)``, 1 on the tokens whose *prediction* is regularised.
    """
    mask = loss_mask[:, 1:].bool()
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    if direction == "ref_policy":
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    elif direction == "policy_ref":
        kl = (logp.exp() * (logp - ref_logp)).sum(-1)
    else:
        raise ValueError("direction must be 'ref_policy' or 'policy_ref'")
    return kl[mask].sum() if reduction == "sum" else _masked_mean(kl, mask)


def in_batch_accuracy(logits: Tensor, labels: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """Fraction of rows whose own positive has the highest (masked) score."""
    hit = (logits.argmax(dim=-1) == labels).float()
    rows = torch.ones_like(hit, dtype=torch.bool) if row_mask is None else row_mask.bool()
    return _masked_mean(hit, rows)


@dataclass
class Stage1Output:
    """Total loss (with grad) and each part (detached) for logging."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class Stage1Loss(nn.Module):
    """``sft_weight·L_SFT + kl_weight·L_KL + infonce_weight·L_InfoNCE + triplet_weight·L_triplet``.

    Search-R3's Stage-1 objective (arXiv 2510.07048, §Stage 1), reported there as an unweighted
    sum, hence the default weights of 1. A term whose weight is 0 is skipped (its inputs may be
    omitted); a term with a positive weight and missing inputs raises.

    Args:
        sft_weight, kl_weight, infonce_weight, triplet_weight: term weights.
        temperature: InfoNCE τ.
        margin: triplet θ.
        symmetric: symmetric InfoNCE.
        kl_direction: see :func:`token_kl`.
        triplet_reduction: see :class:`TripletMarginLoss`.
        in_batch_negatives: see :class:`InfoNCELoss`.
    """

    def __init__(
        self,
        sft_weight: float = 1.0,
        kl_weight: float = 1.0,
        infonce_weight: float = 1.0,
        triplet_weight: float = 1.0,
        temperature: float = 0.05,
        margin: float = 0.1,
        symmetric: bool = False,
        kl_direction: Literal["ref_policy", "policy_ref"] = "ref_policy",
        triplet_reduction: Literal["mean", "max"] = "mean",
        in_batch_negatives: bool = True,
    ):
        super().__init__()
        self.weights = {"sft": sft_weight, "kl": kl_weight, "infonce": infonce_weight, "triplet": triplet_weight}
        self.infonce = InfoNCELoss(temperature=temperature, symmetric=symmetric, in_batch_negatives=in_batch_negatives)
        self.triplet = TripletMarginLoss(margin=margin, reduction=triplet_reduction)
        self.kl_direction = kl_direction

    def forward(
        self,
        *,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        negatives_mask: Tensor | None = None,
        positive_ids: IdsLike | None = None,
        negative_ids: IdsLike | None = None,
        query_mask: Tensor | None = None,
        logits: Tensor | None = None,
        input_ids: Tensor | None = None,
        loss_mask: Tensor | None = None,
        ref_logits: Tensor | None = None,
        exclude: Tensor | None = None,
    ) -> Stage1Output:
        """Embeddings and ``exclude`` as in :class:`InfoNCELoss`; ``logits``/``input_ids``/``loss_mask``
        ``(B', L[, V])`` for the token terms (``B'`` = all sequences of the batch: queries and documents)."""
        w = self.weights
        zero = query.new_zeros((), dtype=torch.float32)
        parts: dict[str, Tensor] = {}
        total = zero
        if w["sft"]:
            _require(logits=logits, input_ids=input_ids, loss_mask=loss_mask, term="sft")
            parts["sft"] = sft_cross_entropy(logits, input_ids, loss_mask)
            total = total + w["sft"] * parts["sft"]
        if w["kl"]:
            _require(logits=logits, ref_logits=ref_logits, loss_mask=loss_mask, term="kl")
            parts["kl"] = token_kl(logits, ref_logits, loss_mask, direction=self.kl_direction)
            total = total + w["kl"] * parts["kl"]
        if w["infonce"]:
            parts["infonce"] = self.infonce(
                query, positive, negatives, negatives_mask, positive_ids, negative_ids, query_mask, exclude
            )
            total = total + w["infonce"] * parts["infonce"]
        if w["triplet"]:
            _require(negatives=negatives, term="triplet")
            parts["triplet"] = self.triplet(query, positive, negatives, negatives_mask, query_mask)
            total = total + w["triplet"] * parts["triplet"]
        with torch.no_grad():
            scores, labels = self.infonce.scores(
                query, positive, negatives, negatives_mask, positive_ids, negative_ids, exclude
            )
            parts["accuracy"] = in_batch_accuracy(scores, labels, query_mask)
        return Stage1Output(loss=total, parts={k: v.detach() for k, v in parts.items()})


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]``; 0 (still connected to the graph) when the mask is empty."""
    mask = mask.bool()
    return torch.where(mask, values, values.new_zeros(())).sum() / mask.sum().clamp(min=1)


def _require(term: str, **tensors: Tensor | None) -> None:
    missing = [name for name, t in tensors.items() if t is None]
    if missing:
        raise ValueError(f"the {term} term has a positive weight but {', '.join(missing)} was not given")
