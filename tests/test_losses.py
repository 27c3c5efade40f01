import math

import pytest
import torch
import torch.nn.functional as F

from verl_search_r3.embedding import gather_embeddings, last_token_positions, pad_sequences
from verl_search_r3.losses import (
    InfoNCELoss,
    Stage1Loss,
    TripletMarginLoss,
    in_batch_accuracy,
    sft_cross_entropy,
    token_kl,
)
from verl_search_r3.prompts import embed_prompt_ids
from verl_search_r3.tiny import build_tiny_qwen2
from verl_search_r3.tokens import embed_token_id

S = 1 / math.sqrt(2)


def test_infonce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # norms differ: cosine ignores them
    expected = (math.log(1 + math.exp(S - 1)) + math.log(1 + math.exp(-S))) / 2
    assert InfoNCELoss(temperature=1.0)(q, p).item() == pytest.approx(expected, rel=1e-6)
    # temperature 0.5 doubles every logit
    expected_half = (math.log(1 + math.exp(2 * (S - 1))) + math.log(1 + math.exp(-2 * S))) / 2
    assert InfoNCELoss(temperature=0.5)(q, p).item() == pytest.approx(expected_half, rel=1e-6)


def test_infonce_duplicate_positives_are_not_negatives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # both rows share the same positive document: nothing is left in the denominators
    assert InfoNCELoss(temperature=1.0)(q, p, positive_ids=["d7", "d7"]).item() == pytest.approx(0.0, abs=1e-7)
    assert InfoNCELoss(temperature=1.0)(q, p, positive_ids=torch.tensor([3, 4])).item() > 0.1


def _reference_infonce(q, p, n, tau, pos_ids, neg_ids, nmask):
    """Loop implementation, independent of the vectorised one."""
    bsz, k = n.shape[:2]
    docs = [(p[j], pos_ids[j], True) for j in range(bsz)] + [
        (n[j, m], neg_ids[j][m], bool(nmask[j, m])) for j in range(bsz) for m in range(k)
    ]
    total = 0.0
    for i in range(bsz):
        logits = []
        for c, (d, did, ok) in enumerate(docs):
            if c != i and (not ok or did == pos_ids[i]):
                continue
            logits.append(F.cosine_similarity(q[i], d, dim=0).item() / tau)
        own = F.cosine_similarity(q[i], p[i], dim=0).item() / tau
        total += -own + math.log(sum(math.exp(x) for x in logits))
    return total / bsz


def test_infonce_hard_negatives_against_reference():
    torch.manual_seed(0)
    q, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 3, 8)
    pos_ids = ["a", "b", "a", "c"]
    neg_ids = [["x", "b", "y"], ["a", "z", "w"], ["q", "r", "s"], ["t", "u", "v"]]
    nmask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    got = InfoNCELoss(temperature=0.1)(q, p, n, nmask, pos_ids, neg_ids)
    want = _reference_infonce(q, p, n, 0.1, pos_ids, neg_ids, nmask)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_infonce_without_in_batch_negatives_is_per_group_softmax():
    torch.manual_seed(1)
    q, p, n = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 2, 5)
    got = InfoNCELoss(temperature=0.2, in_batch_negatives=False)(q, p, n)
    logits = torch.stack([F.cosine_similarity(q[:, None], torch.cat([p[:, None], n], 1), dim=-1)]).squeeze(0) / 0.2
    want = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(got, want)


def test_infonce_symmetric_and_query_mask():
    torch.manual_seed(2)
    q, p = torch.randn(3, 4), torch.randn(3, 4)
    fwd = F.cross_entropy(F.normalize(q) @ F.normalize(p).T / 0.5, torch.arange(3))
    bwd = F.cross_entropy(F.normalize(p) @ F.normalize(q).T / 0.5, torch.arange(3))
    got = InfoNCELoss(temperature=0.5, symmetric=True)(q, p)
    torch.testing.assert_close(got, (fwd + bwd) / 2)
    # a query without an embedding leaves the loss, its positive stays a negative for others
    mask = torch.tensor([True, False, True])
    rows = F.cross_entropy(F.normalize(q) @ F.normalize(p).T / 0.5, torch.arange(3), reduction="none")
    got_masked = InfoNCELoss(temperature=0.5)(q, p, query_mask=mask)
    torch.testing.assert_close(got_masked, rows[mask].mean())
    assert InfoNCELoss()(q, p, query_mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_triplet_matches_torch_reference():
    torch.manual_seed(3)
    q, p, n = torch.randn(5, 6), torch.randn(5, 6), torch.randn(5, 1, 6)
    ref = torch.nn.TripletMarginWithDistanceLoss(
        distance_function=lambda a, b: 1 - F.cosine_similarity(a, b), margin=0.3
    )(q, p, n[:, 0])
    torch.testing.assert_close(TripletMarginLoss(margin=0.3)(q, p, n), ref)


def test_triplet_hand_computed_mean_and_max():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[S, S]])  # cos 0.7071
    n = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # cos 1 and 0
    h1, h2 = max(0, 1 - S + 0.1), max(0, 0 - S + 0.1)
    assert TripletMarginLoss(0.1)(q, p, n).item() == pytest.approx((h1 + h2) / 2, rel=1e-6)
    assert TripletMarginLoss(0.1, reduction="max")(q, p, n).item() == pytest.approx(h1, rel=1e-6)
    masked = TripletMarginLoss(0.1)(q, p, n, negatives_mask=torch.tensor([[False, True]]))
    assert masked.item() == pytest.approx(h2, abs=1e-7)


def test_sft_cross_entropy_matches_hf_labels(tiny_qwen):
    model, tok = tiny_qwen
    ids, mask = pad_sequences([[1, 2, 3, 4, 5], [6, 7, 8]], tok.pad_token_id, side="right")
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    labels = ids.masked_fill(loss_mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(sft_cross_entropy(out.logits, ids, loss_mask), out.loss)
    n_tokens = int(loss_mask[:, 1:].sum())
    torch.testing.assert_close(sft_cross_entropy(out.logits, ids, loss_mask, reduction="sum"), out.loss * n_tokens)


def test_token_kl_matches_kl_div_and_is_zero_for_identical():
    torch.manual_seed(4)
    logits, ref = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    loss_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    per_tok = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    want = per_tok[:, :-1][loss_mask[:, 1:].bool()].mean()  # KL(ref || policy)
    torch.testing.assert_close(token_kl(logits, ref, loss_mask), want)
    rev = F.kl_div(F.log_softmax(ref, -1), F.log_softmax(logits, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(logits, ref, loss_mask, "policy_ref"), rev[:, :-1][loss_mask[:, 1:].bool()].mean())
    assert token_kl(logits, logits, loss_mask).item() == pytest.approx(0.0, abs=1e-6)


def test_in_batch_accuracy():
    logits = torch.tensor([[3.0, 1.0], [2.0, 1.0], [0.0, 5.0]])
    assert in_batch_accuracy(logits, torch.tensor([0, 1, 1])).item() == pytest.approx(2 / 3)
    assert in_batch_accuracy(logits, torch.tensor([0, 1, 1]), torch.tensor([True, False, True])).item() == 1.0


def _embed(model, tok, texts, kind):
    tid = embed_token_id(tok)
    ids, mask = pad_sequences([embed_prompt_ids(tok, t, kind) for t in texts], tok.pad_token_id, side="left")
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    pos, found = last_token_positions(ids, tid, mask)
    return gather_embeddings(out.hidden_states[-1], pos, found), out.logits, ids, mask


def test_stage1_loss_is_the_weighted_sum_and_grads_reach_the_right_parameters():
    model, tok = build_tiny_qwen2(tie_word_embeddings=False, seed=7)
    model.train()
    ref_model, _ = build_tiny_qwen2(tie_word_embeddings=False, seed=8)
    q, q_logits, q_ids, q_mask = _embed(model, tok, ["lift", "drag at mach 2"], "query")
    p, *_ = _embed(model, tok, ["lift of wings", "supersonic drag"], "document")
    n, *_ = _embed(model, tok, ["heat", "noise", "flutter", "rain"], "document")
    n = n.view(2, 2, -1)
    loss_mask = q_mask.clone()
    loss_mask[:, :-3] = 0  # pretend the last 3 tokens are the assistant turn
    with torch.no_grad():
        ref_logits = ref_model(input_ids=q_ids, attention_mask=q_mask).logits
    weights = dict(sft_weight=0.5, kl_weight=0.2, infonce_weight=1.0, triplet_weight=2.0)
    out = Stage1Loss(**weights, temperature=0.1, margin=0.2)(
        query=q, positive=p, negatives=n, logits=q_logits, input_ids=q_ids, loss_mask=loss_mask, ref_logits=ref_logits
    )
    parts = {
        "sft": sft_cross_entropy(q_logits, q_ids, loss_mask),
        "kl": token_kl(q_logits, ref_logits, loss_mask),
        "infonce": InfoNCELoss(0.1)(q, p, n),
        "triplet": TripletMarginLoss(0.2)(q, p, n),
    }
    want = sum(weights[f"{k}_weight"] * v for k, v in parts.items())
    torch.testing.assert_close(out.loss, want)
    for k, v in parts.items():
        torch.testing.assert_close(out.parts[k], v.detach())
    assert 0.0 <= out.parts["accuracy"].item() <= 1.0
    assert not out.parts["sft"].requires_grad

    # contrastive terms alone: gradients reach the decoder and final norm, not the (untied) lm_head
    model.zero_grad()
    (parts["infonce"] + parts["triplet"]).backward(retain_graph=True)
    assert model.model.norm.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None or model.lm_head.weight.grad.abs().sum() == 0
    model.zero_grad()
    parts["sft"].backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_stage1_loss_skips_zero_weights_and_names_missing_inputs():
    q, p = torch.randn(2, 4), torch.randn(2, 4)
    out = Stage1Loss(sft_weight=0, kl_weight=0, triplet_weight=0)(query=q, positive=p)
    torch.testing.assert_close(out.loss, InfoNCELoss()(q, p))
    assert set(out.parts) == {"infonce", "accuracy"}
    with pytest.raises(ValueError, match="sft term .* logits"):
        Stage1Loss(kl_weight=0, triplet_weight=0)(query=q, positive=p)
    with pytest.raises(ValueError, match="triplet term .* negatives"):
        Stage1Loss(sft_weight=0, kl_weight=0)(query=q, positive=p)


def _close_vectors(n: int, dim: int = 64, spread: float = 0.3, seed: int = 5) -> torch.Tensor:
    """Unit vectors around one direction: cosines near 1, logits near 1/τ, as trained embeddings give."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g)
    return F.normalize(base + spread * torch.randn(n, dim, generator=g), dim=-1)


def test_contrastive_terms_are_float32_under_bf16_autocast():
    """verl calls the loss inside its bf16 autocast block: the terms must equal the fp32 ones
    (bf16 logits of cos/τ at τ=0.05 are off by up to 0.06, the size of real positive/negative gaps)."""
    v = _close_vectors(4 + 4 + 4 * 3)
    q, p, n = v[:4], v[4:8], v[8:].view(4, 3, -1)
    nce, triplet = InfoNCELoss(temperature=0.05, symmetric=True), TripletMarginLoss(margin=0.01, reduction="max")
    want_scores, _ = nce.scores(q, p, n)
    want_nce, want_triplet = nce(q, p, n), triplet(q, p, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _ = nce.scores(q, p, n)
        got_nce, got_triplet = nce(q, p, n), triplet(q, p, n)
        stage1 = Stage1Loss(sft_weight=0, kl_weight=0, temperature=0.05, margin=0.01)(query=q, positive=p, negatives=n)
    torch.testing.assert_close(got_nce, want_nce, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_triplet, want_triplet, atol=1e-6, rtol=0)
    torch.testing.assert_close(stage1.parts["infonce"], InfoNCELoss(0.05)(q, p, n), atol=1e-5, rtol=0)
    torch.testing.assert_close(stage1.parts["triplet"], TripletMarginLoss(0.01)(q, p, n), atol=1e-6, rtol=0)
