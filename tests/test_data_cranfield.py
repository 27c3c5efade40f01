"""build_pairs on the real Cranfield collection: exact counts, verl's RLHFDataset, negatives, determinism."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from verl_search_r3.data.beir import load_beir
from verl_search_r3.data.build import BuildOptions, build_pairs
from verl_search_r3.data.negatives import NegativeOptions
from verl_search_r3.data.outputs import PAIRS_SCHEMA, RL_SCHEMA
from verl_search_r3.prompts import query_reasoning_messages

# Cranfield as shipped: 1,612 judgements, all grades 1..4; documents 471 and 995 have an empty
# title and text, and one judgement (query 125, line 865) names document 995.
QRELS_ROWS, EMPTY_DOCS, JUDGED_EMPTY = 1612, 2, 1


@pytest.fixture(scope="module")
def cranfield_out(cranfield_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cran") / "out")
    report = build_pairs(BuildOptions(format="beir", input=cranfield_dir, output=out, negatives=NegativeOptions(method="bm25")))
    return out, report


def _read(out, name):
    return pq.read_table(os.path.join(out, name))


def test_counts_match_the_qrels_exactly(cranfield_dir, cranfield_out):
    out, report = cranfield_out
    m = report.manifest
    data = load_beir(cranfield_dir)
    assert sum(len(d) for d in data.qrels.values()) == QRELS_ROWS
    c = m["counts"]
    assert c["documents"] == 1400 - EMPTY_DOCS
    assert c["queries"] == 225 == c["rl_train"] + c["rl_val"]
    assert c["judgements_read"] == QRELS_ROWS
    assert c["pairs"] == c["relevant_judgements"] == QRELS_ROWS - JUDGED_EMPTY
    assert m["skipped"] == {"empty_text": EMPTY_DOCS, "unknown_document": JUDGED_EMPTY}

    pairs = _read(out, "pairs.parquet").to_pylist()
    expected = {(q, d): g for q, docs in data.qrels.items() for d, g in docs.items() if d != "995"}
    assert {(p["query_id"], p["pos_id"]): p["grade"] for p in pairs} == expected
    rl = _read(out, "rl_train.parquet").to_pylist() + _read(out, "rl_val.parquet").to_pylist()
    truth = {r["extra_info"]["query_id"]: r["reward_model"]["ground_truth"] for r in rl}
    assert sum(len(t["doc_ids"]) for t in truth.values()) == QRELS_ROWS - JUDGED_EMPTY
    for qid, t in truth.items():
        assert dict(zip(t["doc_ids"], t["grades"])) == {d: g for d, g in data.qrels[qid].items() if d != "995"}
        assert t["grades"] == sorted(t["grades"], reverse=True)
    assert len(_read(out, "corpus.parquet")) == 1398


def test_schemas_and_manifest(cranfield_out):
    out, report = cranfield_out
    assert _read(out, "pairs.parquet").schema.equals(PAIRS_SCHEMA)
    for name in ("rl_train.parquet", "rl_val.parquet"):
        assert _read(out, name).schema.equals(RL_SCHEMA)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["counts"] == report.manifest["counts"]
    assert set(manifest["inputs"]) == {"corpus.jsonl", "queries.jsonl", "qrels/test.tsv"}
    assert set(manifest["outputs"]) == {"corpus.parquet", "pairs.parquet", "rl_train.parquet", "rl_val.parquet"}
    rl = _read(out, "rl_train.parquet").to_pylist() + _read(out, "rl_val.parquet").to_pylist()
    assert sorted(r["extra_info"]["index"] for r in rl) == list(range(225))
    assert {r["data_source"] for r in rl} == {"search_r3/cranfield"}
    assert rl[0]["prompt"] == query_reasoning_messages(rl[0]["extra_info"]["query"])
    assert sorted(os.listdir(os.path.dirname(out))) == ["out"]  # no temporary folder left beside it


def test_rl_parquets_load_in_verls_rlhf_dataset(cranfield_out, qwen_tokenizer, tmp_path, monkeypatch):
    import datasets
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out, report = cranfield_out
    for split in ("train", "val"):
        cfg = OmegaConf.create(
            {
                "prompt_key": "prompt",
                "max_prompt_length": 512,
                # the length filter applies the chat template to every prompt (slow: once is enough)
                "filter_overlong_prompts": split == "val",
                "filter_overlong_prompts_workers": 1,
                "truncation": "error",
                "return_raw_chat": True,
                "cache_dir": str(tmp_path / "verl"),
            }
        )
        ds = RLHFDataset(data_files=os.path.join(out, f"rl_{split}.parquet"), tokenizer=qwen_tokenizer, config=cfg)
        assert len(ds) == report.manifest["counts"][f"rl_{split}"]  # nothing filtered as overlong
        item = ds[0]
        assert item["raw_prompt"][0]["role"] == "system" and item["raw_prompt"][1]["content"] == item["extra_info"]["query"]
        gt = item["reward_model"]["ground_truth"]
        assert item["reward_model"]["style"] == "rule" and len(gt["doc_ids"]) == len(gt["grades"]) > 0
        assert item["index"] == item["extra_info"]["index"] and item["extra_info"]["split"] == split
        batch = collate_fn([ds[i] for i in range(2)])
        assert list(batch["data_source"]) == ["search_r3/cranfield"] * 2


def test_bm25_negatives_never_contain_a_relevant_document(cranfield_dir, cranfield_out):
    out, report = cranfield_out
    data = load_beir(cranfield_dir)
    pairs = _read(out, "pairs.parquet").to_pylist()
    corpus_ids = set(_read(out, "corpus.parquet").column("doc_id").to_pylist())
    assert report.manifest["counts"]["negatives_mined"] == 7 * len(pairs)
    for p in pairs:
        assert len(p["neg_ids"]) == 7 == len(p["neg_texts"]) and len(set(p["neg_ids"])) == 7
        assert not set(p["neg_ids"]) & set(data.qrels[p["query_id"]])
        assert set(p["neg_ids"]) <= corpus_ids
        assert all(p["neg_texts"]) and p["pos_text"]


def test_split_is_by_query_and_deterministic_under_seed(cranfield_dir, cranfield_out, tmp_path):
    out, report = cranfield_out
    again = build_pairs(BuildOptions(format="beir", input=cranfield_dir, output=str(tmp_path / "again"), negatives=NegativeOptions(method="bm25")))
    assert again.manifest["outputs"] == report.manifest["outputs"]  # byte-identical files
    other = build_pairs(BuildOptions(format="beir", input=cranfield_dir, output=str(tmp_path / "seed1"), seed=1))
    val0 = set(_read(out, "rl_val.parquet").column("extra_info").combine_chunks().field("query_id").to_pylist())
    val1 = set(_read(str(tmp_path / "seed1"), "rl_val.parquet").column("extra_info").combine_chunks().field("query_id").to_pylist())
    assert len(val0) == len(val1) == round(0.1 * 225) and val0 != val1
    train0 = set(_read(out, "rl_train.parquet").column("extra_info").combine_chunks().field("query_id").to_pylist())
    assert not train0 & val0
    pairs = _read(out, "pairs.parquet").to_pylist()
    assert {p["query_id"] for p in pairs if p["split"] == "val"} == val0
    assert other.manifest["counts"]["negatives_mined"] == 0  # --negatives none: no mining
