"""Embedding-aware actor pieces, run through verl's real FSDP engine class methods on CPU.

The FSDP engine cannot be *initialised* without CUDA, but its ``prepare_model_inputs`` /
``prepare_model_outputs`` are plain torch: we build the engine object without ``__init__``,
attach a tiny Qwen2 as its module and run exactly the code path of a micro-batch.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config.actor import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from engine_helpers import engine_forward, make_engine

from verl_search_r3.embedding import last_hidden_states
from verl_search_r3.losses import InfoNCELoss
from verl_search_r3.rl.engine import DOC_IDS_KEY, DOC_MASK_KEY, DOCS_KEY, EMBEDDING_KEY, add_embedding_outputs, dense, response_embeddings
from verl_search_r3.rl.workers import ContrastiveConfig, search_r3_ppo_loss
from verl_search_r3.tiny import build_tiny_qwen2
from verl_search_r3.tokens import embed_token_id


def nj(seqs, dtype=torch.long):
    return torch.nested.as_nested_tensor([torch.as_tensor(s, dtype=dtype) for s in seqs], layout=torch.jagged)


def test_response_embeddings_packed_and_padded_layouts():
    E = 99
    prompts, responses = [[1, E, 2], [3, 4]], [[5, E, 6], [7]]  # 2nd response has no token
    seqs = [p + r for p, r in zip(prompts, responses)]
    hidden_rows = [torch.randn(len(s), 4) for s in seqs]
    ids = nj(seqs)
    plen = torch.tensor([3, 2])
    packed = torch.cat(hidden_rows + [torch.randn(3, 4)])[None]  # trailing static pad
    padded = torch.zeros(2, 6, 4)
    for i, h in enumerate(hidden_rows):
        padded[i, : len(h)] = h
    for hidden, is_packed in ((packed, True), (padded, False)):
        emb = response_embeddings(hidden, ids, E, plen, packed=is_packed)
        torch.testing.assert_close(emb[0], F.normalize(hidden_rows[0][4], dim=0))
        assert torch.all(emb[1] == 0)
    # without prompt lengths, the token quoted in the prompt counts for the 2nd sequence? no: it has none
    emb_all = response_embeddings(packed, nj([[1, E, 2], [E, 3]]), E, None, packed=True)
    assert torch.all(emb_all.norm(dim=-1) > 0)


@pytest.fixture()
def engine_and_model():
    model, tok = build_tiny_qwen2(seed=11)
    model.train()
    return make_engine(model, embed_token_id(tok)), model, embed_token_id(tok)


def _micro_batch(prompts, responses, use_remove_padding=False):
    seqs = [p + r for p, r in zip(prompts, responses)]
    mb = TensorDict(
        {
            "input_ids": nj(seqs),
            "position_ids": nj([list(range(len(s))) for s in seqs]),
            "prompts": nj(prompts),
            "responses": nj(responses),
        },
        batch_size=[len(seqs)],
    )
    tu.assign_non_tensor(mb, temperature=1.0, use_remove_padding=use_remove_padding)
    return mb


@pytest.mark.parametrize("use_remove_padding", [False, True])
def test_engine_outputs_embedding_equal_to_a_manual_forward(engine_and_model, use_remove_padding):
    eng, model, E = engine_and_model
    assert type(eng).__name__ == "SearchR3FSDPEngineWithLMHead"
    # the packed layout on CPU has no varlen attention, so check it with one sequence per micro-batch
    prompts = [[11, E, 12, 13]] if use_remove_padding else [[11, E, 12, 13], [14, 15]]
    responses = [[21, 22, E, 23]] if use_remove_padding else [[21, 22, E, 23], [24, E]]
    mb = _micro_batch(prompts, responses, use_remove_padding)
    mo = engine_forward(eng, model, mb)
    assert set(mo) == {"log_probs", EMBEDDING_KEY}
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            seq = torch.tensor([p + r])
            h = last_hidden_states(model, seq)[0]
            pos = len(p) + max(j for j, t in enumerate(r) if t == E)
            torch.testing.assert_close(mo[EMBEDDING_KEY][i].detach(), F.normalize(h[pos], dim=0), atol=1e-5, rtol=1e-4)
    # a second add is idempotent and the log-prob pass without grad still fills the field
    add_embedding_outputs(eng, model, E)
    with torch.no_grad():
        assert engine_forward(eng, model, mb)[EMBEDDING_KEY].shape == (len(prompts), 64)


def test_sequence_parallel_is_refused():
    eng = SimpleNamespace(ulysses_sequence_parallel_size=2)
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=1"):
        add_embedding_outputs(eng, torch.nn.Linear(1, 1), 5)


def _rl_data(mb, responses, docs, doc_ids, doc_mask, global_batch_size):
    data = mb.clone()
    data["response_mask"] = nj([[1] * len(r) for r in responses], torch.float32)
    data["old_log_probs"] = nj([[-1.0] * len(r) for r in responses], torch.float32)
    data["advantages"] = nj([[1.0 if i % 2 else -1.0] * len(r) for i, r in enumerate(responses)], torch.float32)
    data[DOCS_KEY], data[DOC_IDS_KEY], data[DOC_MASK_KEY] = docs, doc_ids, doc_mask
    n_tokens = sum(len(r) for r in responses)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=n_tokens, global_batch_size=global_batch_size)
    return data


def _actor_config():
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=PolicyLossConfig(loss_mode="vanilla"))


def test_loss_is_ppo_plus_scaled_infonce_and_grads_reach_the_model(engine_and_model):
    eng, model, E = engine_and_model
    prompts, responses = [[1, 2], [3, 4], [5]], [[6, E], [7, 8, E], [9, 10]]  # 3rd: no token
    mb = _micro_batch(prompts, responses)
    torch.manual_seed(0)
    docs = torch.randn(3, 3, 64)
    doc_ids = torch.tensor([[1, 2, 3], [1, 4, 5], [6, 7, 8]])
    doc_mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    data = _rl_data(mb, responses, docs, doc_ids, doc_mask, global_batch_size=4)
    cfg = ContrastiveConfig(coef=0.5, temperature=0.1)
    mo = engine_forward(eng, model, mb)
    loss, metrics = search_r3_ppo_loss(_actor_config(), mo, data, contrastive=cfg)

    base, _ = ppo_loss(_actor_config(), mo, data)
    q = mo[EMBEDDING_KEY]
    nce_rows = []
    for i in range(2):  # rows with an embed token; per-group softmax over [positive, valid negatives]
        cands = [docs[i, 0]] + [docs[i, j] for j in (1, 2) if doc_mask[i, j]]
        logits = torch.stack([F.cosine_similarity(q[i], c, dim=0) for c in cands]) / 0.1
        nce_rows.append(-F.log_softmax(logits, 0)[0])
    want = base + 0.5 * sum(nce_rows) * (1 / 4)  # dp_size / global_batch_size
    torch.testing.assert_close(loss, want)
    assert metrics["actor/embed_found_frac"] == pytest.approx(2 / 3)
    assert 0 <= metrics["actor/contrastive_acc"] <= 1
    model.zero_grad()
    loss.backward()
    assert model.model.norm.weight.grad.abs().sum() > 0
    # coef 0 is exactly verl's ppo_loss
    off, _ = search_r3_ppo_loss(_actor_config(), engine_forward(eng, model, mb), data, contrastive=ContrastiveConfig(coef=0))
    torch.testing.assert_close(off, ppo_loss(_actor_config(), engine_forward(eng, model, mb), data)[0])


def test_contrastive_gradient_is_invariant_to_micro_batching(engine_and_model):
    eng, model, E = engine_and_model
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    responses = [[8, E], [9, 10, E], [11, E], [12, 13, E]]
    torch.manual_seed(1)
    docs, doc_ids = torch.randn(4, 3, 64), torch.arange(12).view(4, 3)
    doc_mask = torch.ones(4, 3, dtype=torch.bool)
    cfg = ContrastiveConfig(coef=1.0, temperature=0.2)

    def grads(splits):
        model.zero_grad()
        for idx in splits:
            mb = _micro_batch([prompts[i] for i in idx], [responses[i] for i in idx])
            data = _rl_data(mb, [responses[i] for i in idx], docs[idx], doc_ids[idx], doc_mask[idx], global_batch_size=4)
            data["advantages"] = nj([[0.0] * len(responses[i]) for i in idx], torch.float32)  # isolate the NCE term
            loss, _ = search_r3_ppo_loss(_actor_config(), engine_forward(eng, model, mb), data, contrastive=cfg)
            loss.backward()
        return model.model.norm.weight.grad.clone()

    one = grads([[0, 1, 2, 3]])
    two = grads([[0, 1], [2, 3]])
    four = grads([[0], [1], [2], [3]])
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(one, four, atol=1e-6, rtol=1e-4)
    assert one.abs().sum() > 0


def test_in_batch_negatives_mask_shared_positives(engine_and_model):
    """With in-batch negatives, samples of one GRPO group share the positive: never a negative."""
    eng, model, E = engine_and_model
    prompts, responses = [[1], [1]], [[2, E], [3, E]]
    mb = _micro_batch(prompts, responses)
    docs = torch.randn(2, 2, 64)
    docs[1, 0] = docs[0, 0]
    doc_ids = torch.tensor([[7, 8], [7, 9]])  # same positive id
    data = _rl_data(mb, responses, docs, doc_ids, torch.ones(2, 2, dtype=torch.bool), global_batch_size=2)
    mo = engine_forward(eng, model, mb)
    with_ib, _ = search_r3_ppo_loss(_actor_config(), mo, data, contrastive=ContrastiveConfig(coef=1, in_batch_negatives=True))
    nce = InfoNCELoss(0.05)(mo[EMBEDDING_KEY], docs[:, 0], docs[:, 1:], positive_ids=doc_ids[:, 0], negative_ids=doc_ids[:, 1:])
    base, _ = ppo_loss(_actor_config(), mo, data)
    torch.testing.assert_close(with_ib, base + nce * 2 * (1 / 2))


def test_document_batch_pads_to_a_multiple_and_feeds_the_engine(engine_and_model):
    from verl_search_r3.rl.workers import document_batch

    eng, model, E = engine_and_model
    batch = document_batch([[1, 2, E], [3, E]], pad_to_multiple=4)
    assert len(batch) == 4 and batch["input_ids"].offsets().tolist() == [0, 3, 5, 7, 9]
    assert batch["position_ids"].unbind()[0].tolist() == [0, 1, 2]
    tu.assign_non_tensor(batch, use_remove_padding=False)
    emb = engine_forward(eng, model, batch)[EMBEDDING_KEY]
    torch.testing.assert_close(emb[1], emb[3])  # the padding row repeats the last document
    assert torch.all(emb.norm(dim=-1) > 0.99)
    with pytest.raises(ValueError):
        document_batch([])


def test_doc_grad_reencodes_documents_with_gradient(engine_and_model):
    """With doc_grad the loss value equals the stored-vector loss on the same documents, but the
    gradient also flows through the document forward."""
    from verl_search_r3.embedding import last_hidden_states as lhs
    from verl_search_r3.prompts import embed_prompt_ids
    from verl_search_r3.rl.engine import DOC_EMBEDDING_KEY, DOC_TOKEN_LENGTHS_KEY, DOC_TOKENS_KEY
    from verl_search_r3.rl.trainer import document_prompt_fields

    eng, model, E = engine_and_model
    tok = build_tiny_qwen2()[1]
    texts = {"d1": "supersonic flutter of wings", "d2": "heat transfer in slabs", "d3": "boundary layer"}
    id_lists = [["d1", "d2", ""], ["d1", "d3", "d2"]]  # d1 shared by both samples, a padding row
    fields = document_prompt_fields(id_lists, lambda ids: [texts[i] for i in ids], tok, 64)
    assert fields[DOC_TOKEN_LENGTHS_KEY][0, 2] == 0
    assert fields[DOC_TOKENS_KEY].offsets().diff().tolist() == fields[DOC_TOKEN_LENGTHS_KEY].sum(1).tolist()

    keys = {"d1": 1, "d2": 2, "d3": 3, "": -1}
    doc_ids = torch.tensor([[keys[d] for d in row] for row in id_lists])
    with torch.no_grad():  # the stored vectors: the same documents encoded without gradient
        vecs = {d: F.normalize(lhs(model, torch.tensor([embed_prompt_ids(tok, t, "document", 64)]))[0, -1], dim=0) for d, t in texts.items()}
    docs = torch.stack([torch.stack([vecs[d] if d else torch.zeros(64) for d in row]) for row in id_lists])
    mask = doc_ids >= 0
    prompts, responses = [[1, 2], [3]], [[4, E], [5, 6, E]]

    def run(with_tokens):
        mb = _micro_batch(prompts, responses)
        if with_tokens:
            mb[DOC_TOKENS_KEY], mb[DOC_TOKEN_LENGTHS_KEY], mb[DOC_IDS_KEY] = fields[DOC_TOKENS_KEY], fields[DOC_TOKEN_LENGTHS_KEY], doc_ids
        mo = engine_forward(eng, model, mb)
        data = _rl_data(mb, responses, docs, doc_ids, mask, global_batch_size=2)
        data["advantages"] = nj([[0.0] * len(r) for r in responses], torch.float32)
        loss, _ = search_r3_ppo_loss(_actor_config(), mo, data, contrastive=ContrastiveConfig(coef=1.0, doc_grad=with_tokens))
        model.zero_grad()
        loss.backward()
        return loss.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone(), mo

    stored_loss, stored_grad, _ = run(False)
    grad_loss, doc_grad, mo = run(True)
    torch.testing.assert_close(mo[DOC_EMBEDDING_KEY].detach(), docs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_loss, stored_loss, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(doc_grad, stored_grad, atol=1e-7)


def test_contrastive_fields_survive_verl_micro_batching():
    """3-D jagged fields come back per row after verl's real batch split (the step-1 crash)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches

    from verl_search_r3.rl.engine import dense

    B, K, H = 8, 3, 4
    docs = torch.randn(B, K, H)
    ids = torch.arange(B * K).reshape(B, K)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[5, 2] = 0

    def nested(t):
        return torch.nested.as_nested_tensor(list(t), layout=torch.jagged)

    batch = tu.get_tensordict({DOCS_KEY: nested(docs), DOC_IDS_KEY: nested(ids), DOC_MASK_KEY: nested(mask), "row": torch.arange(B)})
    tu.assign_non_tensor(batch, use_dynamic_bsz=False, micro_batch_size_per_gpu=2)
    micro_batches, _ = prepare_micro_batches(batch)
    assert len(micro_batches) == 4
    for mb in micro_batches:
        rows = mb["row"]
        assert dense(mb[DOCS_KEY]).shape == (2, K, H)
        torch.testing.assert_close(dense(mb[DOCS_KEY]), docs[rows])
        assert torch.equal(dense(mb[DOC_IDS_KEY]), ids[rows]) and torch.equal(dense(mb[DOC_MASK_KEY]), mask[rows])


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.fixture()
def cpu_forward_step(monkeypatch):
    """verl's real ``forward_step`` on the host: device lookups answer ``cpu``, no autocast."""
    from verl.workers.engine.fsdp import transformer_impl

    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")

    def run(eng, mb, loss_fn=None):
        eng._autocast_dtype = torch.float32
        return eng.forward_step(mb, loss_function=loss_fn, forward_only=loss_fn is None)[1]["model_output"]

    return run


@pytest.mark.parametrize("use_remove_padding", [False, True])
def test_document_encoding_runs_the_decoder_only(engine_and_model, cpu_forward_step, use_remove_padding):
    """encode_documents' batches go through verl's forward_step without lm_head / log-probs, same vectors."""
    from verl_search_r3.rl.workers import document_batch

    eng, model, E = engine_and_model
    docs = [[31, 32, 33, E]] if use_remove_padding else [[31, 32, 33, E], [34, E], [35, 36, E]]
    batch = document_batch(docs)
    tu.assign_non_tensor(batch, use_remove_padding=use_remove_padding, calculate_entropy=False)
    calls, handle = _count_calls(model.lm_head)
    with torch.no_grad():
        out = cpu_forward_step(eng, batch)
    handle.remove()
    assert calls == [] and set(out) == {EMBEDDING_KEY}
    with torch.no_grad():
        for i, d in enumerate(docs):
            want = F.normalize(last_hidden_states(model, torch.tensor([d]))[0, -1], dim=0)
            torch.testing.assert_close(out[EMBEDDING_KEY][i], want, atol=1e-5, rtol=1e-4)
    assert "forward" not in vars(model)  # the instance forward is restored


def _doc_grad_inputs(tok, E):
    from verl_search_r3.rl.engine import DOC_TOKEN_LENGTHS_KEY, DOC_TOKENS_KEY
    from verl_search_r3.rl.trainer import document_prompt_fields

    texts = {"d1": "supersonic flutter of wings", "d2": "heat transfer in slabs", "d3": "boundary layer"}
    id_lists = [["d1", "d2", ""], ["d1", "d3", "d2"]]
    fields = document_prompt_fields(id_lists, lambda ids: [texts[i] for i in ids], tok, 64)
    keys = {"d1": 1, "d2": 2, "d3": 3, "": -1}
    doc_ids = torch.tensor([[keys[d] for d in row] for row in id_lists])
    mb = _micro_batch([[1, 2], [3]], [[4, E], [5, 6, E]])
    mb[DOC_TOKENS_KEY], mb[DOC_TOKEN_LENGTHS_KEY], mb[DOC_IDS_KEY] = fields[DOC_TOKENS_KEY], fields[DOC_TOKEN_LENGTHS_KEY], doc_ids
    return mb, texts, id_lists


def test_doc_grad_forward_skips_the_lm_head_and_respects_the_caps(engine_and_model):
    from verl_search_r3.prompts import embed_prompt_ids
    from verl_search_r3.rl.engine import DOC_EMBEDDING_KEY, DOC_GRAD_MASK_KEY

    eng, model, E = engine_and_model
    tok = build_tiny_qwen2()[1]
    mb, texts, id_lists = _doc_grad_inputs(tok, E)
    calls, handle = _count_calls(model.lm_head)
    mo = engine_forward(eng, model, mb)
    assert len(calls) == 1  # the policy forward only; the documents ran through the decoder
    handle.remove()
    with torch.no_grad():
        vecs = {d: F.normalize(last_hidden_states(model, torch.tensor([embed_prompt_ids(tok, t, "document", 64)]))[0, -1], dim=0) for d, t in texts.items()}
    valid = torch.tensor([[d != "" for d in row] for row in id_lists])
    assert torch.equal(mo[DOC_GRAD_MASK_KEY], valid)
    for i, row in enumerate(id_lists):
        for k, d in enumerate(row):
            if d:
                torch.testing.assert_close(mo[DOC_EMBEDDING_KEY][i, k].detach(), vecs[d], atol=1e-5, rtol=1e-4)

    # cap: 2 distinct documents -> the positive d1 and the hardest negatives in slot order (d2 of sample 0)
    eng.search_r3_doc_grad_max_docs = 2
    mo = engine_forward(eng, model, mb)
    assert mo[DOC_GRAD_MASK_KEY].tolist() == [[True, True, False], [True, False, True]]
    assert torch.all(mo[DOC_EMBEDDING_KEY][1, 1] == 0)  # d3 left out: zero row, env vector in the loss
    # token budget (dynamic batch size): the micro-batch's own tokens count against it
    eng.search_r3_doc_grad_max_docs = 16
    lengths = dense(mb["search_r3_doc_token_lengths"])
    own = int(mb["input_ids"].offsets()[-1])
    tu.assign_non_tensor(mb, use_dynamic_bsz=True, max_token_len_per_gpu=own + int(lengths[0, 0]))
    mo = engine_forward(eng, model, mb)
    assert mo[DOC_GRAD_MASK_KEY].tolist() == [[True, False, False], [True, False, False]]
    tu.assign_non_tensor(mb, max_token_len_per_gpu=own)  # nothing fits: a one-token forward, nothing encoded
    mo = engine_forward(eng, model, mb)
    assert not mo[DOC_GRAD_MASK_KEY].any() and mo[DOC_EMBEDDING_KEY].requires_grad


def test_doc_grad_loss_uses_env_vectors_for_documents_over_the_cap(engine_and_model):
    """Documents over the cap keep their environment vector: same loss value, less gradient."""
    from verl_search_r3.prompts import embed_prompt_ids

    eng, model, E = engine_and_model
    tok = build_tiny_qwen2()[1]
    mb, texts, id_lists = _doc_grad_inputs(tok, E)
    with torch.no_grad():
        vecs = {d: F.normalize(last_hidden_states(model, torch.tensor([embed_prompt_ids(tok, t, "document", 64)]))[0, -1], dim=0) for d, t in texts.items()}
    docs = torch.stack([torch.stack([vecs[d] if d else torch.zeros(64) for d in row]) for row in id_lists])
    mask = torch.tensor([[d != "" for d in row] for row in id_lists])
    losses = {}
    for cap in (16, 1):
        eng.search_r3_doc_grad_max_docs = cap
        mo = engine_forward(eng, model, mb)
        data = _rl_data(mb, [[4, E], [5, 6, E]], docs, mb[DOC_IDS_KEY], mask, global_batch_size=2)
        cfg = ContrastiveConfig(coef=1.0, doc_grad=True, doc_grad_max_docs=cap)
        losses[cap], metrics = search_r3_ppo_loss(_actor_config(), mo, data, contrastive=cfg)
        assert metrics["actor/doc_grad_frac"] == pytest.approx(1.0 if cap == 16 else 2 / 5)
    torch.testing.assert_close(losses[1], losses[16], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="doc_grad_max_docs"):
        ContrastiveConfig(doc_grad_max_docs=0)


def test_doc_grad_with_verl_fused_kernels(engine_and_model):
    """use_fused_kernels patches the model class's forward (it needs return_dict=True); the
    document forward runs the decoder only, so doc_grad works with it and gives the same vectors."""
    from transformers import Qwen2ForCausalLM
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    from verl_search_r3.rl.engine import DOC_EMBEDDING_KEY

    eng, model, E = engine_and_model
    tok = build_tiny_qwen2()[1]
    mb, _, _ = _doc_grad_inputs(tok, E)
    want = engine_forward(eng, model, mb)
    model.__class__ = type("FusedQwen2ForCausalLM", (Qwen2ForCausalLM,), {})  # verl patches the class: keep it local
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    tu.assign_non_tensor(mb, use_fused_kernels=True)
    got = engine_forward(eng, model, mb)
    torch.testing.assert_close(got[DOC_EMBEDDING_KEY], want[DOC_EMBEDDING_KEY], atol=1e-5, rtol=1e-4)


def test_decoder_only_under_fsdp2(tmp_path):
    """FSDP2 (verl's apply_fsdp2, lm_head sharded on its own): the root's hooks still gather the
    parameters, the lm_head never runs, the hidden states equal the unsharded model's, gradients flow."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from verl.utils.fsdp_utils import apply_fsdp2

    from verl_search_r3.embedding import FinalNormCapture
    from verl_search_r3.rl.engine import decoder_only

    model, _ = build_tiny_qwen2(tie_word_embeddings=False, seed=1)
    plain = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        apply_fsdp2(model, {"mesh": init_device_mesh("cpu", (1,))}, {})
        calls, _ = _count_calls(model.lm_head)
        capture = FinalNormCapture(model).attach()
        ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        logits = model(input_ids=ids, use_cache=False).logits
        capture.pop()
        with decoder_only(model):
            model(input_ids=ids, use_cache=False)
        hidden = capture.pop()
        assert len(calls) == 1
        with torch.no_grad():
            torch.testing.assert_close(hidden.detach(), last_hidden_states(plain, ids), atol=1e-5, rtol=1e-4)
        (logits.float().mean() + hidden.float().pow(2).mean()).backward()
        assert model.model.norm.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_rows_without_a_positive_offer_no_in_batch_negative(engine_and_model):
    """A rollout without the embed token (or a verl padding row) gets all-masked documents from the
    trainer: its zero "positive" must not enter the other rows' in-batch denominators."""
    eng, model, E = engine_and_model
    prompts, responses = [[1], [2], [3]], [[4, E], [5, 6, E], [7, 8]]  # the 3rd has no token
    torch.manual_seed(3)
    docs = torch.randn(3, 2, 64)
    docs[2] = 0
    doc_ids = torch.tensor([[1, 2], [3, 4], [-1, -2]])
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    mb = _micro_batch(prompts, responses)
    data = _rl_data(mb, responses, docs, doc_ids, mask, global_batch_size=3)
    mo = engine_forward(eng, model, mb)
    got, _ = search_r3_ppo_loss(_actor_config(), mo, data, contrastive=ContrastiveConfig(coef=1, in_batch_negatives=True))
    q = mo[EMBEDDING_KEY][:2]
    want_nce = InfoNCELoss(0.05)(q, docs[:2, 0], docs[:2, 1:], positive_ids=doc_ids[:2, 0], negative_ids=doc_ids[:2, 1:])
    base, _ = ppo_loss(_actor_config(), mo, data)
    torch.testing.assert_close(got, base + want_nce * 2 / 3)
