"""Stage-1 data: groups stay whole through verl's micro-batching; only assistant tokens are trained."""

import pyarrow as pa
import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import prepare_micro_batches

from verl_search_r3.prompts import DEFAULT_TEMPLATES, render_generation_prompt
from verl_search_r3.stage1.data import (
    DOC_KEY,
    GROUP_KEY,
    RELEVANT_KEY,
    ROLE_KEY,
    VALID_KEY,
    GroupCollator,
    GroupDataConfig,
    PairsGroupDataset,
    check_groups,
    relevance_exclusion,
    split_groups,
    stable_key,
)

TRACE = "The query asks about boundary layers; key terms: laminar flow, transition."


def pairs_table():
    """Four groups: query A has two positives (rows 0 and 1), rows differ in hard negatives."""
    rows = [
        ("qa", "laminar boundary layer transition", "d1", "boundary layer transition on flat plates", ["d3", "d4"]),
        ("qa", "laminar boundary layer transition", "d2", "transition of laminar flow", ["d5"]),
        ("qb", "heat transfer at hypersonic speed", "d3", "hypersonic heat transfer to blunt bodies", ["d1", "d6"]),
        ("qc", "flutter of thin wings", "d6", "wing flutter analysis", []),
    ]
    texts = {f"d{i}": f"document number {i} about aerodynamics" for i in range(1, 7)}
    return pa.Table.from_pylist(
        [
            {
                "query_id": q, "query": query, "pos_id": pid, "pos_text": ptext,
                "neg_ids": negs, "neg_texts": [texts[n] for n in negs], "split": "train",
                "reasoning": TRACE if i == 2 else None,
            }
            for i, (q, query, pid, ptext, negs) in enumerate(rows)
        ]
    )


def make_dataset(tokenizer, **kw):
    cfg = GroupDataConfig(num_negatives=2, doc_max_length=40, query_max_length=160, **kw)
    return PairsGroupDataset(pairs_table(), tokenizer, cfg)


def test_group_layout_padding_and_keys(qwen_tokenizer):
    ds = make_dataset(qwen_tokenizer, reasoning_fraction=0.0)
    assert len(ds) == 4 and ds.group_size == 4
    item = ds[1]  # one hard negative: the second slot is a masked empty document
    assert item[ROLE_KEY].tolist() == [0, 1, 2, 2]
    assert item[VALID_KEY].tolist() == [True, True, True, False]
    assert item[DOC_KEY].tolist() == [stable_key("qa"), stable_key("d2"), stable_key("d5"), -1]
    assert item["loss_mask"][3].sum() == 0
    assert sorted(item[RELEVANT_KEY].tolist()) == sorted([stable_key("d1"), stable_key("d2")])
    assert ds[3][VALID_KEY].tolist() == [True, True, False, False]
    for ids, pos in zip(item["input_ids"], item["position_ids"]):
        assert ids[-1].item() == ds.embed_id  # every prompt ends exactly at the embed token
        assert pos.tolist() == list(range(len(ids)))
    assert max(len(t) for t in item["input_ids"][1:]) <= 40


@pytest.mark.parametrize("fixed_replies", [False, True])
def test_loss_mask_covers_exactly_the_assistant_turn(qwen_tokenizer, fixed_replies):
    ds = make_dataset(qwen_tokenizer, reasoning_fraction=1.0, train_fixed_replies=fixed_replies)
    header = qwen_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    reply = qwen_tokenizer(DEFAULT_TEMPLATES.embed_reply, add_special_tokens=False)["input_ids"]
    for index in range(len(ds)):
        item = ds[index]
        for role, ids, mask, valid in zip(item[ROLE_KEY], item["input_ids"], item["loss_mask"], item[VALID_KEY]):
            ids, mask = ids.tolist(), mask.tolist()
            trained = bool(valid) and (fixed_replies or (index == 2 and role == 0))  # the reasoning form is always trained
            assert (sum(mask) > 0) == trained, (index, int(role))
            if not trained:
                continue
            start = mask.index(1)
            assert all(mask[start:]) and not any(mask[:start])  # one contiguous span up to the end
            assert ids[start - len(header) : start] == header  # right after "<|im_start|>assistant\n"
            if index == 2 and role == 0:  # the row with a reasoning trace, reasoning_fraction=1
                prompt = qwen_tokenizer(render_generation_prompt(qwen_tokenizer, ds._value("query", 2)), add_special_tokens=False)["input_ids"]
                assert ids[:start] == prompt
                assert ids[start:] == qwen_tokenizer(TRACE, add_special_tokens=False)["input_ids"] + [ds.embed_id]
            else:
                assert ids[-len(reply):] == reply  # "... Embedding: <|embed_token|>"
                assert qwen_tokenizer.decode(ids[start:]).strip().endswith(DEFAULT_TEMPLATES.embed_reply)


def test_reasoning_fraction_zero_uses_the_direct_form(qwen_tokenizer):
    ds = make_dataset(qwen_tokenizer, reasoning_fraction=0.0)
    reply = qwen_tokenizer(DEFAULT_TEMPLATES.embed_reply, add_special_tokens=False)["input_ids"]
    assert ds[2]["input_ids"][0][-len(reply):].tolist() == reply


def _batch(ds, meta):
    batch = GroupCollator()([ds[i] for i in range(len(ds))])
    return tu.get_tensordict(tensor_dict=batch, non_tensor_dict=meta)


@pytest.mark.parametrize("dynamic", [True, False])
def test_verl_micro_batching_keeps_groups_whole_with_force_group_size(qwen_tokenizer, dynamic):
    ds = make_dataset(qwen_tokenizer)
    G = ds.group_size
    longest_group = max(sum(len(t) for t in ds[i]["input_ids"]) for i in range(len(ds)))
    meta = {"use_dynamic_bsz": dynamic, "max_token_len_per_gpu": longest_group, "micro_batch_size_per_gpu": 1}
    data = _batch(ds, meta)
    assert data["input_ids"].shape[0] == len(ds) * G
    tu.assign_non_tensor(data, force_group_size=G)
    micro, _ = prepare_micro_batches(data)
    assert len(micro) > 1
    seen = []
    for mb in micro:
        check_groups(mb[ROLE_KEY], mb[GROUP_KEY], G)
        seen += mb[GROUP_KEY][::G].tolist()
        assert mb[RELEVANT_KEY].shape[0] == mb["input_ids"].shape[0]
    assert sorted(seen) == list(range(len(ds)))


def test_without_force_group_size_verl_splits_groups_and_the_check_catches_it(qwen_tokenizer):
    ds = make_dataset(qwen_tokenizer)
    longest_seq = max(len(t) for i in range(len(ds)) for t in ds[i]["input_ids"])
    data = _batch(ds, {"use_dynamic_bsz": True, "max_token_len_per_gpu": longest_seq + 1})
    micro, _ = prepare_micro_batches(data)
    with pytest.raises(ValueError, match="force_group_size"):
        for mb in micro:
            check_groups(mb[ROLE_KEY], mb[GROUP_KEY], ds.group_size)


def test_relevance_exclusion_masks_known_positives_of_the_query(qwen_tokenizer):
    ds = make_dataset(qwen_tokenizer)
    batch = GroupCollator()([ds[i] for i in range(len(ds))])
    _, pos, neg = split_groups(batch[DOC_KEY], ds.group_size)
    relevant = split_groups(batch[RELEVANT_KEY], ds.group_size)[0]
    ex = relevance_exclusion(pos, neg, relevant)  # columns: p0..p3, then n00 n01 n10 n11 ...
    assert ex.shape == (4, 4 + 4 * 2)
    assert ex[0, 1] and ex[1, 0]  # d2 is relevant to qa (row 0), d1 too (row 1)
    assert ex[0, 0] and not ex[0, 2]  # own positive is flagged (InfoNCE never removes it); d3 is not relevant to qa
    assert ex[0, 4 + 4] and ex[1, 4 + 4]  # n20 = d1, a hard negative of qb, is relevant to qa
    assert not ex[:, 4 + 3].any()  # padding negative (-1) is never flagged
    assert not ex[2, 0]


def test_bad_input_names_the_problem(qwen_tokenizer, tmp_path):
    table = pairs_table().drop_columns(["neg_texts"])
    with pytest.raises(ValueError, match="missing column"):
        PairsGroupDataset(table, qwen_tokenizer, GroupDataConfig())
    with pytest.raises(ValueError, match="no rows with split='val'"):
        PairsGroupDataset(pairs_table(), qwen_tokenizer, GroupDataConfig(), split="val")
    with pytest.raises(ValueError, match="unknown data.search_r3 keys"):
        GroupDataConfig.from_config({"num_negative": 3})
    with pytest.raises(ValueError, match="pad_mode=no_padding"):
        PairsGroupDataset(pairs_table(), qwen_tokenizer, {"pad_mode": "right", "search_r3": {}})
    check_groups(torch.tensor([0, 1, 2]), torch.tensor([5, 5, 5]), 3)
    with pytest.raises(ValueError, match="whole"):
        check_groups(torch.tensor([0, 1, 2]), torch.tensor([5, 5, 6]), 3)
