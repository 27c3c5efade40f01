"""Stage-1 loss through verl's real FSDP engine methods on CPU, against a manual computation.

As in ``test_workers.py``, the engines are built without ``__init__`` (which needs CUDA) and run
exactly the micro-batch code path: ``prepare_model_inputs`` -> module -> ``prepare_model_outputs``
(with verl's logits-processor hook for the KL) -> loss.
"""

import copy
import dataclasses
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.utils.torch_functional import logprobs_from_logits_naive
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.engine.utils import prepare_micro_batches

from engine_helpers import engine_forward, make_engine

from verl_search_r3.embedding import last_hidden_states
from verl_search_r3.losses import token_kl
from verl_search_r3.rl.engine import EMBEDDING_KEY
from verl_search_r3.stage1.data import GroupCollator, GroupDataConfig, PairsGroupDataset
from verl_search_r3.stage1.loss import (
    KL_KEY,
    NUM_GROUPS_KEY,
    NUM_PAIRS_KEY,
    REF_IDS_KEY,
    REF_LOGP_KEY,
    Stage1EngineLoss,
    Stage1LossConfig,
    add_reference_topk_outputs,
    assign_group_counts,
    predicting_rows,
)
from verl_search_r3.stage1.trainer import Stage1TrainingWorker, _reduce_metrics
from verl_search_r3.tokens import embed_token_id

TOPK = 16
ROWS = [  # (query_id, query, pos_id, neg_ids); q1 has two positives, so d2 must not be q1's negative
    ("q1", "laminar boundary layer", "d1", ["d3"]),
    ("q1", "laminar boundary layer", "d2", []),
    ("q2", "hypersonic heating", "d3", ["d1"]),
]
# short system prompts keep the CPU forward cheap (verl's CPU log-prob path is per token over 152k words)
# the fixed replies are trained, so SFT and KL have tokens in these direct-form groups
DATA = GroupDataConfig(num_negatives=1, doc_max_length=32, train_fixed_replies=True,
                       templates={"query_direct_system": "Query.", "document_system": "Doc."})
DOCS = {f"d{i}": f"document {i} on {w}" for i, w in enumerate(["", "plates", "flow", "heat", "wings", "noise", "shocks"]) if i}


def pairs():
    return pa.Table.from_pylist(
        [
            {"query_id": q, "query": text, "pos_id": p, "pos_text": DOCS[p], "neg_ids": n, "neg_texts": [DOCS[d] for d in n], "split": "train"}
            for q, text, p, n in ROWS
        ]
    )


@pytest.fixture()
def setup(monkeypatch):
    # verl's CPU fallback (logprobs_from_logits_v2) loops over tokens to save GPU memory; the naive
    # log-softmax + gather computes the same values in one op, which keeps these tests fast.
    monkeypatch.setattr(transformer_impl, "logprobs_from_logits", logprobs_from_logits_naive)
    from verl_search_r3.tiny import build_tiny_qwen2

    model, tok = build_tiny_qwen2(seed=3)
    with torch.no_grad():  # sharper next-token distributions than a random init, so the top-k carries mass
        model.model.norm.weight.mul_(40.0)
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # the policy has drifted from the base model, so the KL is not 0
        model.model.norm.weight.add_(0.2 * torch.randn_like(model.model.norm.weight))
        model.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    token_id = embed_token_id(tok)
    ref_eng = make_engine(reference)
    add_reference_topk_outputs(ref_eng, TOPK)
    ds = PairsGroupDataset(pairs(), tok, DATA)
    return SimpleNamespace(model=model, reference=reference, tok=tok, eng=make_engine(model, token_id), ref_eng=ref_eng, ds=ds)


def make_batch(s):
    """A rank's batch as the trainer builds it: groups, counts, reference top-k, topk flag."""
    data = tu.get_tensordict(GroupCollator()([s.ds[i] for i in range(len(s.ds))]), {"temperature": 1.0, "use_remove_padding": False})
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(data["loss_mask"].values().sum()))
    assign_group_counts(data, s.ds.group_size)
    with torch.no_grad():
        ref_out = engine_forward(s.ref_eng, s.reference, data)
    data[REF_LOGP_KEY], data[REF_IDS_KEY] = ref_out[REF_LOGP_KEY], ref_out[REF_IDS_KEY]
    tu.assign_non_tensor(data, distillation_use_topk=True)
    return data


def manual_loss(s, cfg):
    """The objective written out from plain HF forwards, one sequence at a time."""
    G = s.ds.group_size
    items = [s.ds[i] for i in range(len(s.ds))]
    seqs = [ids for it in items for ids in it["input_ids"]]
    masks = [m for it in items for m in it["loss_mask"]]
    n_tokens = sum(int(m.sum()) for m in masks)
    sft = kl = 0.0
    emb = []
    for ids, mask in zip(seqs, masks):
        logp = F.log_softmax(s.model(ids[None]).logits[0].float(), -1)
        ref_logp = F.log_softmax(s.reference(ids[None]).logits[0].float(), -1)
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                sft = sft - logp[t, ids[t + 1]]
                top, idx = ref_logp[t].topk(TOPK)
                kl = kl + (top.exp() * (top - logp[t, idx])).sum()
        emb.append(F.normalize(last_hidden_states(s.model, ids[None])[0, -1], dim=0))
    emb = torch.stack(emb).view(len(items), G, -1)
    q, docs = emb[:, 0], emb[:, 1:]
    doc_ids = [[p] + n + [None] * (G - 2 - len(n)) for _, _, p, n in ROWS]
    relevant = {qid: {p for q2, _, p, _ in ROWS if q2 == qid} for qid, *_ in ROWS}
    nce, trip, pairs_n = 0.0, 0.0, 0
    for i, (qid, *_rest) in enumerate(ROWS):
        cands = [docs[j, 0] for j in range(len(ROWS))] + [docs[j, k] for j in range(len(ROWS)) for k in range(1, G - 1)]
        ids = [doc_ids[j][0] for j in range(len(ROWS))] + [doc_ids[j][k] for j in range(len(ROWS)) for k in range(1, G - 1)]
        keep = [c == i or (d is not None and d not in relevant[qid]) for c, d in enumerate(ids)]
        logits = torch.stack([q[i] @ c for c, k in zip(cands, keep) if k]) / cfg.temperature
        own = sum(keep[:i])
        nce = nce - F.log_softmax(logits, 0)[own]
        for k in range(1, G - 1):
            if doc_ids[i][k] is not None:
                trip = trip + F.relu(q[i] @ docs[i, k] - q[i] @ docs[i, 0] + cfg.margin)
                pairs_n += 1
    return sft / n_tokens + kl / n_tokens + nce / len(ROWS) + trip / pairs_n


def test_engine_loss_matches_manual_computation(setup):
    s, cfg = setup, Stage1LossConfig(kl_topk=TOPK)
    loss_fn = Stage1EngineLoss(cfg, s.ds.group_size)
    data = make_batch(s)
    assert data[NUM_GROUPS_KEY] == 3 and data[NUM_PAIRS_KEY] == 2
    mo = engine_forward(s.eng, s.model, data, loss_fn)
    assert {"log_probs", EMBEDDING_KEY, KL_KEY} <= set(mo)
    loss, metrics = loss_fn(model_output=mo, data=data)
    want = manual_loss(s, cfg)
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    parts = sum(metrics[f"search_r3/{k}"].aggregate() for k in ("sft", "kl", "infonce", "triplet"))
    assert parts == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["search_r3/kl"].aggregate() > 0
    assert 0 < metrics["search_r3/ref_topk_mass"].aggregate() <= 1
    assert 0 <= metrics["search_r3/accuracy"].aggregate() <= 1
    s.model.zero_grad()
    loss.backward()
    token_row = s.model.model.embed_tokens.weight.grad[embed_token_id(s.tok)]
    assert token_row.abs().sum() > 0  # the new token's row trains


def test_loss_is_invariant_to_verl_micro_batching(setup):
    s = setup
    cfg = Stage1LossConfig(kl_topk=TOPK, in_batch_negatives=False)  # else negatives depend on the split by design
    loss_fn = Stage1EngineLoss(cfg, s.ds.group_size)

    def run(micro_batches):
        s.model.zero_grad()
        total = 0.0
        for mb in micro_batches:
            loss, _ = loss_fn(model_output=engine_forward(s.eng, s.model, mb, loss_fn), data=mb)
            loss.backward()
            total += loss.item()
        return total, s.model.model.norm.weight.grad.clone()

    data = make_batch(s)
    whole, whole_grad = run([data])
    tu.assign_non_tensor(data, force_group_size=s.ds.group_size, use_dynamic_bsz=True, max_token_len_per_gpu=200)
    micro, _ = prepare_micro_batches(data)
    assert len(micro) > 1
    split, split_grad = run(micro)
    assert split == pytest.approx(whole, rel=1e-5)
    torch.testing.assert_close(split_grad, whole_grad, atol=1e-6, rtol=1e-4)


def test_topk_kl_is_the_exact_kl_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    V, lengths = 11, [5, 4]
    logits, ref_logits = torch.randn(1, sum(lengths), V), torch.randn(1, sum(lengths), V)
    mask = [torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 0])]
    loss_mask = torch.nested.as_nested_tensor(mask, layout=torch.jagged)
    ref_logp, ref_ids = F.log_softmax(ref_logits[0], -1).topk(V)
    data = TensorDict(
        {
            "loss_mask": loss_mask,
            REF_LOGP_KEY: torch.nested.nested_tensor_from_jagged(ref_logp, loss_mask.offsets()),
            REF_IDS_KEY: torch.nested.nested_tensor_from_jagged(ref_ids, loss_mask.offsets()),
        },
        batch_size=[2],
    )
    per_row = Stage1EngineLoss(Stage1LossConfig(kl_topk=V), 3).token_kl(logits, data)[0]
    rows = predicting_rows(loss_mask)
    assert rows.tolist() == [False, True, True, True, False, True, True, False, False]
    start = 0
    for n, m in zip(lengths, mask):
        seg = slice(start, start + n)
        want = token_kl(logits[:, seg], ref_logits[:, seg], m[None])
        torch.testing.assert_close(per_row[seg][rows[seg]].mean(), want)
        start += n


class _FakeReference:
    def __init__(self):
        self.seen = None

    def infer_batch(self, data):
        self.seen = data
        zeros = torch.nested.nested_tensor_from_jagged(torch.zeros(data["input_ids"].values().shape[0], 2), data["input_ids"].offsets())
        return TensorDict({REF_LOGP_KEY: zeros, REF_IDS_KEY: zeros.long()}, batch_size=data.batch_size)


def test_worker_prepares_groups_counts_and_reference(setup):
    s = setup
    worker = object.__new__(Stage1TrainingWorker)
    worker.group_size, worker.reference = s.ds.group_size, _FakeReference()
    worker.engine = SimpleNamespace(get_data_parallel_group=lambda: None)
    data = tu.get_tensordict(GroupCollator()([s.ds[i] for i in range(3)]), {"temperature": 1.0})
    worker.prepare_batch(data)
    assert tu.get(data, "force_group_size") == s.ds.group_size
    assert tu.get(data, "distillation_use_topk") is True
    assert data[NUM_GROUPS_KEY] == 3 and REF_LOGP_KEY in data.keys() and REF_IDS_KEY in data.keys()
    assert tu.get(worker.reference.seen, "compute_loss") is False and tu.get(data, "compute_loss") is None
    plain = tu.get_tensordict(GroupCollator()([s.ds[0]]), {})
    worker.prepare_batch(plain, compute_loss=False)  # forward-only passes need no reference
    assert REF_LOGP_KEY not in plain.keys() and tu.get(plain, "force_group_size") == s.ds.group_size


def test_metrics_are_reduced_to_global_means():
    per_rank = [Metric(AggregationType.SUM), Metric(AggregationType.SUM)]
    per_rank[0].extend([1.0, 2.0])  # rank 0: two micro-batches
    per_rank[1].extend([3.0, 4.0])
    out = tu.get_tensordict({}, {"metrics": {"search_r3/infonce": per_rank, "loss": 1.5}})
    metrics = tu.get(_reduce_metrics(out), "metrics")
    assert metrics == {"search_r3/infonce": 5.0, "loss": 1.5}  # per micro-batch mean over ranks, summed
    assert _reduce_metrics(None) is None


def test_configuration_errors():
    with pytest.raises(ValueError, match="unknown search_r3.loss keys"):
        Stage1LossConfig.from_config({"temprature": 0.1})
    with pytest.raises(ValueError, match="hard negatives"):
        Stage1EngineLoss(Stage1LossConfig(), group_size=2)


def test_infonce_exclude_removes_candidates_in_both_directions():
    from verl_search_r3.losses import InfoNCELoss

    torch.manual_seed(0)
    q, p, n = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 1, 8)
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[0, 1] = exclude[2, 3] = True  # p1 relevant to q0; n0 relevant to q2
    exclude[0, 0] = True  # a row's own positive is never removed
    got = InfoNCELoss(temperature=0.5, symmetric=True)(q, p, n, exclude=exclude)

    cos = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.5  # noqa: E731
    labels = torch.arange(3)
    forward = cos(q, torch.cat([p, n[:, 0]]))
    forward[0, 1] = forward[2, 3] = float("-inf")
    backward = cos(p, q)  # p_j against the queries: q0 is not a negative of p1
    backward[1, 0] = float("-inf")
    want = (F.cross_entropy(forward, labels) + F.cross_entropy(backward, labels)) / 2
    torch.testing.assert_close(got, want)


def test_embedding_terms_and_metrics_are_float32_under_bf16_autocast(qwen_tokenizer):
    """verl runs the loss inside its bf16 autocast block; InfoNCE, triplet and the cosine metrics
    must equal their fp32 values (bf16 cos/τ logits at τ=0.05 are off by up to 0.06)."""
    ds = PairsGroupDataset(pairs(), qwen_tokenizer, DATA)
    data = tu.get_tensordict(GroupCollator()([ds[i] for i in range(len(ds))]), {"temperature": 1.0})
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(data["loss_mask"].values().sum()))
    assign_group_counts(data, ds.group_size)
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(64, generator=g) + 0.3 * torch.randn(len(data), 64, generator=g), dim=-1)
    loss_fn = Stage1EngineLoss(Stage1LossConfig(sft_weight=0, kl_weight=0, margin=0.01), ds.group_size)
    want_loss, want = loss_fn(model_output={EMBEDDING_KEY: emb}, data=data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_loss, got = loss_fn(model_output={EMBEDDING_KEY: emb}, data=data)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)
    for key in ("infonce", "triplet", "accuracy", "pos_cos", "neg_cos"):
        assert got[f"search_r3/{key}"].aggregate() == pytest.approx(want[f"search_r3/{key}"].aggregate(), abs=1e-6), key


def test_a_batch_without_trained_tokens_keeps_the_embedding_terms(setup):
    """``train_fixed_replies=False`` and no reasoning traces: nothing to imitate, still a finite contrastive step."""
    s = setup
    ds = PairsGroupDataset(pairs(), s.tok, dataclasses.replace(DATA, train_fixed_replies=False))
    data = tu.get_tensordict(GroupCollator()([ds[i] for i in range(len(ds))]), {"temperature": 1.0, "use_remove_padding": False})
    assert int(data["loss_mask"].values().sum()) == 0
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=0)
    assign_group_counts(data, ds.group_size)
    loss_fn = Stage1EngineLoss(Stage1LossConfig(kl_weight=0.0), ds.group_size)
    loss, metrics = loss_fn(model_output=engine_forward(s.eng, s.model, data, loss_fn), data=data)
    assert torch.isfinite(loss)
    assert metrics["search_r3/sft"].aggregate() == 0.0
    assert metrics["search_r3/infonce"].aggregate() > 0
