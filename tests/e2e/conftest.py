"""Fixtures of the end-to-end runs: a Cranfield slice, the data and index the CPU recipes read, and
tiny models (:mod:`verl_search_r3.tiny`); the runner and shared sizes are in ``e2e_run.py``."""

from __future__ import annotations

import json
import os

import pytest
from e2e_run import SEARCH_QUERY, SEARCH_TAGS

from verl_search_r3.data.build import BuildOptions, build_pairs
from verl_search_r3.data.negatives import NegativeOptions
from verl_search_r3.prompts import DEFAULT_TEMPLATES
from verl_search_r3.search_r1.build_index import BuildIndexOptions, build_index
from verl_search_r3.search_r1.data import DEFAULT_INSTRUCTION, QADataOptions, build_qa_data, parse_source
from verl_search_r3.tiny import tiny_policy, tiny_tokenizer, transitions
from verl_search_r3.tokens import add_embed_token


def _save(model, tok, path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def cranfield_slice(cranfield_dir, tmp_path_factory) -> str:
    """A BEIR folder: 12 Cranfield queries with 1-4 judgements, their documents and 60 others."""
    out = tmp_path_factory.mktemp("cranfield_slice")
    qrels: dict[str, dict[str, int]] = {}
    with open(os.path.join(cranfield_dir, "qrels", "test.tsv"), encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, g = line.rstrip("\n").split("\t")
            qrels.setdefault(q, {})[d] = int(g)
    queries = sorted((q for q in qrels if 1 <= len(qrels[q]) <= 4), key=int)[:12]
    with open(os.path.join(cranfield_dir, "corpus.jsonl"), encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f]
    keep = {d for q in queries for d in qrels[q]} | {c["_id"] for c in corpus[:60]}
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c) + "\n" for c in corpus if c["_id"] in keep)
    with open(os.path.join(cranfield_dir, "queries.jsonl"), encoding="utf-8") as src, open(out / "queries.jsonl", "w") as dst:
        dst.writelines(line for line in src if json.loads(line)["_id"] in queries)
    (out / "qrels").mkdir()
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{g}\n" for q in queries for d, g in qrels[q].items())
    return str(out)


@pytest.fixture(scope="session")
def search_r3_data(cranfield_slice, tmp_path_factory) -> str:
    """``data_prep/build_pairs.py`` output (pairs, rl_train/rl_val, corpus) with BM25 negatives."""
    out = str(tmp_path_factory.mktemp("search_r3_data") / "data")
    build_pairs(BuildOptions(format="beir", input=cranfield_slice, output=out, val_fraction=0.25,
                             negatives=NegativeOptions(method="bm25", num_negatives=2)))
    return out


@pytest.fixture(scope="session")
def search_r1_data(cranfield_slice, tmp_path_factory) -> tuple[str, str]:
    """``(DATA_DIR, INDEX_DIR)``: Cranfield questions as QA rows, and a BM25 index of the slice."""
    root = tmp_path_factory.mktemp("search_r1")
    qa = root / "qa.jsonl"
    with open(os.path.join(cranfield_slice, "queries.jsonl"), encoding="utf-8") as src, open(qa, "w") as dst:
        dst.writelines(json.dumps({"question": json.loads(line)["text"], "golden_answers": [SEARCH_QUERY]}) + "\n" for line in src)
    sources = [parse_source(f"{split}:cranfield={qa}") for split in ("train", "test")]
    build_qa_data(QADataOptions(sources=sources, output=str(root / "data")))
    build_index(BuildIndexOptions(input=cranfield_slice, format="beir", output=str(root / "index"), progress=False))
    return str(root / "data"), str(root / "index")


@pytest.fixture(scope="session")
def tokenizer_texts(cranfield_slice) -> list[str]:
    with open(os.path.join(cranfield_slice, "corpus.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts + [DEFAULT_INSTRUCTION, DEFAULT_TEMPLATES.query_reasoning_system, DEFAULT_TEMPLATES.document_system]


@pytest.fixture(scope="session")
def search_r3_policy(tokenizer_texts, tmp_path_factory) -> str:
    """Tiny policy that answers every query with ``" The query<|embed_token|>"`` (an analysis, then the token)."""
    tok = tiny_tokenizer(tokenizer_texts)
    add_embed_token(tok)
    model = tiny_policy(tok, transitions(tok, ["\n"], f" The query{DEFAULT_TEMPLATES.embed_token}"))
    return _save(model, tok, tmp_path_factory.mktemp("search_r3_policy"))


@pytest.fixture(scope="session")
def search_r1_policy(tokenizer_texts, tmp_path_factory) -> str:
    """Tiny policy that starts every turn with ``<search> boundary layer</search>``."""
    tok = tiny_tokenizer(tokenizer_texts, words=SEARCH_TAGS)
    model = tiny_policy(tok, transitions(tok, ["\n"], f"<search> {SEARCH_QUERY}</search>"), embed_token=False)
    return _save(model, tok, tmp_path_factory.mktemp("search_r1_policy"))


@pytest.fixture(scope="session")
def stage1_base(tokenizer_texts, tmp_path_factory) -> str:
    """Tiny random base model *without* ``<|embed_token|>`` (Stage 1 adds it)."""
    tok = tiny_tokenizer(tokenizer_texts)
    return _save(tiny_policy(tok, embed_token=False), tok, tmp_path_factory.mktemp("stage1_base"))
