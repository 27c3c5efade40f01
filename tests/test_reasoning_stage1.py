"""Stage 1 on the reasoning form: token positions checked by hand, and the validation's emission check."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from engine_helpers import engine_forward, make_engine
from verl.utils import tensordict_utils as tu

from verl_search_r3.embedding import last_token_positions_nested
from verl_search_r3.stage1.data import GroupCollator, GroupDataConfig, PairsGroupDataset
from verl_search_r3.rl.engine import EMBEDDING_KEY
from verl_search_r3.stage1.loss import Stage1EngineLoss, Stage1LossConfig, assign_group_counts, predicting_rows
from verl_search_r3.stage1.trainer import EMISSION_METRIC, REPLY_TOKENS_METRIC, EmissionCheck, EmissionConfig, Stage1Config
from verl_search_r3.tokens import embed_token_id

ROW = {"query_id": "q1", "query": "flutter", "pos_id": "d1", "pos_text": "wing flutter", "neg_ids": ["d2"],
       "neg_texts": ["slab heat"], "split": "train", "reasoning": "Wing flutter."}
SYSTEM = "Think, then write <|embed_token|>."  # a short reasoning prompt that quotes the token, as the default does

# The query sequence of the reasoning form with the Qwen chat template, token by token (written out by hand):
EXPECTED_TOKENS = [
    "<|im_start|>", "system", "Ċ", "Think", ",", "Ġthen", "Ġwrite", "Ġ", "<|embed_token|>", ".", "<|im_end|>", "Ċ",  # 0-11
    "<|im_start|>", "user", "Ċ", "flutter", "<|im_end|>", "Ċ",                                                   # 12-17
    "<|im_start|>", "assistant", "Ċ",                                                                             # 18-20
    "W", "ing", "Ġflutter", ".", "<|embed_token|>",                                                               # 21-25
]
ANALYSIS_AND_TOKEN = range(21, 26)
# The trained reply of a document sequence (this Qwen3 template wraps a finished assistant turn in an empty think block):
DOCUMENT_REPLY = ["<think>", "ĊĊ", "</think>", "ĊĊ", "Embed", "ding", ":", "Ġ", "<|embed_token|>"]
QUOTED, EMBEDDING = 8, 25


def dataset(tokenizer, fraction: float = 1.0, fixed_replies: bool = True) -> PairsGroupDataset:
    cfg = GroupDataConfig(num_negatives=1, reasoning_fraction=fraction, train_fixed_replies=fixed_replies,
                          templates={"query_reasoning_system": SYSTEM})
    return PairsGroupDataset(pa.Table.from_pylist([ROW]), tokenizer, cfg)


def test_reasoning_form_masks_and_embedding_position_by_hand(tiny_qwen):
    model, tok = tiny_qwen
    item = dataset(tok)[0]
    ids, mask = item["input_ids"][0].tolist(), item["loss_mask"][0].tolist()
    assert tok.convert_ids_to_tokens(ids) == EXPECTED_TOKENS
    # SFT and KL cover the analysis *and* the token, nothing of the prompt
    assert [i for i, m in enumerate(mask) if m] == list(ANALYSIS_AND_TOKEN)
    eid = embed_token_id(tok)
    assert [i for i, t in enumerate(ids) if t == eid] == [QUOTED, EMBEDDING]
    for doc in (1, 2):
        doc_ids, doc_mask = item["input_ids"][doc].tolist(), item["loss_mask"][doc].tolist()
        assert [t for t, m in zip(tok.convert_ids_to_tokens(doc_ids), doc_mask) if m] == DOCUMENT_REPLY
        assert doc_mask[-len(DOCUMENT_REPLY):] == [1] * len(DOCUMENT_REPLY)

    batch = GroupCollator()([item])
    # verl's engine loss: the rows whose next token is trained are the positions 20..24 (they predict 21..25)
    rows = predicting_rows(batch["loss_mask"]).nonzero().squeeze(-1).tolist()
    assert rows[:5] == [20, 21, 22, 23, 24]
    # the engine reads the embedding at the last embed token of each sequence: 25, not the quoted 8
    pos, found = last_token_positions_nested(batch["input_ids"], eid)
    assert pos[0].item() == EMBEDDING and found.all()

    # verl's engine with the Stage-1 loss: the query embedding is the final-norm state at 25 (InfoNCE's query vector) ...
    data = tu.get_tensordict(batch, {"temperature": 1.0, "use_remove_padding": False})
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(data["loss_mask"].values().sum()))
    assign_group_counts(data, 3)
    loss_fn = Stage1EngineLoss(Stage1LossConfig(kl_weight=0.0), 3)
    with torch.no_grad():
        out = engine_forward(make_engine(model, eid), model, data, loss_fn)
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(out[EMBEDDING_KEY][0], F.normalize(hidden[EMBEDDING], dim=-1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[EMBEDDING_KEY][0], F.normalize(hidden[QUOTED], dim=-1), atol=1e-3)
    # ... and its SFT term is the cross-entropy of exactly the trained tokens of the three sequences
    with torch.no_grad():
        _, metrics = loss_fn(model_output=out, data=data)
        losses = []
        for seq, m in zip(batch["input_ids"].unbind(), batch["loss_mask"].unbind()):
            logp = model(seq[None]).logits[0].log_softmax(-1)
            losses += [-logp[t - 1, seq[t]] for t in m.nonzero().squeeze(-1).tolist()]
    assert len(losses) == len(ANALYSIS_AND_TOKEN) + 2 * len(DOCUMENT_REPLY)
    assert metrics["search_r3/sft"].aggregate() == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)


def test_by_default_only_the_reasoning_form_is_trained(qwen_tokenizer):
    def masks(fraction):
        cfg = GroupDataConfig(num_negatives=1, reasoning_fraction=fraction, templates={"query_reasoning_system": SYSTEM})
        item = PairsGroupDataset(pa.Table.from_pylist([ROW]), qwen_tokenizer, cfg)[0]
        return [[i for i, m in enumerate(mask.tolist()) if m] for mask in item["loss_mask"]]

    assert masks(1.0) == [list(ANALYSIS_AND_TOKEN), [], []]  # the analysis and the token; no document reply
    assert masks(0.0) == [[], [], []]  # the direct form's fixed reply is prompt text: nothing to train


def test_reasoning_fraction_draws_the_form_per_row(qwen_tokenizer):
    assert dataset(qwen_tokenizer, 0.0)[0]["input_ids"][0].tolist()[-5:] != dataset(qwen_tokenizer, 1.0)[0]["input_ids"][0].tolist()[-5:]
    direct = qwen_tokenizer.convert_ids_to_tokens(dataset(qwen_tokenizer, 0.0)[0]["input_ids"][0].tolist())
    assert "flutter" in direct and "ing" not in direct and direct[-1] == "<|embed_token|>"


class ForceAtStep:
    """Forward hook on ``lm_head``: from generation step ``step`` on, ``token`` is the argmax; never ``banned``."""

    def __init__(self, step: int | None, token: int, banned: tuple[int, ...] = ()):
        self.step, self.token, self.banned, self.calls = step, token, banned, 0

    def __call__(self, _module, _inputs, logits):
        self.calls += 1
        logits = logits.clone()
        logits[..., list(self.banned)] = float("-inf")
        if self.step is not None and self.calls >= self.step:
            logits[..., self.token] = logits.amax(dim=-1) + 100.0
        return logits


def test_emission_check_counts_unforced_tokens_and_follows_verls_validation_steps(tiny_qwen):
    model, tok = tiny_qwen
    eid = embed_token_id(tok)
    queries = ["flutter", "heat transfer in slabs", "buckling of shells"]
    check = EmissionCheck(queries, tok, EmissionConfig(queries=3, max_new_tokens=6, batch_size=3), test_freq=2, total_steps=5)
    assert [check.advance() for _ in range(5)] == [False, True, False, True, True]
    resumed = EmissionCheck(queries, tok, EmissionConfig(), test_freq=0, total_steps=5, start_step=3)
    assert [resumed.advance() for _ in range(2)] == [False, True]

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for hook, rate, tokens in ((ForceAtStep(3, eid), 1.0, 3.0),             # two words, then the token
                               (ForceAtStep(None, eid, (eid, eos)), 0.0, 6.0),  # never stops: the budget runs out
                               (ForceAtStep(2, eos, (eid,)), 0.0, 2.0)):        # ends the turn without the token
        handle = model.lm_head.register_forward_hook(hook)
        try:
            figures = check.measure(model)
        finally:
            handle.remove()
        assert figures == {EMISSION_METRIC: rate, REPLY_TOKENS_METRIC: tokens}


def test_emission_config_is_read_from_the_search_r3_block():
    cfg = Stage1Config.from_config({"emission": {"queries": 8, "max_new_tokens": 64}})
    assert cfg.emission == EmissionConfig(queries=8, max_new_tokens=64, batch_size=8)
    with pytest.raises(ValueError, match="unknown search_r3.emission keys"):
        Stage1Config.from_config({"emission": {"n": 1}})
