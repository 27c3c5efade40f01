import numpy as np
import pytest
import pytrec_eval

from verl_search_r3.data.beir import DataFormatError, load_beir
from verl_search_r3.prompts import format_document
from verl_search_r3.retrieval.bm25 import BM25Retriever


def test_cranfield_loads_with_exact_counts(cranfield_dir):
    data = load_beir(cranfield_dir)
    assert len(data.corpus) == 1400 and len(data.queries) == 225
    assert sum(len(d) for d in data.qrels.values()) == 1612
    assert len(data.judged_queries()) == 225


def test_bm25_reproduces_the_reference_figures_on_cranfield(cranfield_dir):
    """Reference (shared/README): bm25s + English stemming and stop words, nDCG@10 0.365, R@100 0.735."""
    data = load_beir(cranfield_dir)
    ids = list(data.corpus)
    bm25 = BM25Retriever(ids, [format_document(*data.corpus[i]) for i in ids])
    qids = list(data.judged_queries())
    hits, scores = bm25.search([data.queries[q] for q in qids], k=100)
    run = {q: {d: float(s) for d, s in zip(h, sc)} for q, h, sc in zip(qids, hits, scores)}
    res = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert np.mean([r["ndcg_cut_10"] for r in res.values()]) == pytest.approx(0.365, abs=1e-3)
    assert np.mean([r["recall_100"] for r in res.values()]) == pytest.approx(0.735, abs=1e-3)


def test_bm25_ranks_the_matching_document_first():
    bm25 = BM25Retriever(["a", "b", "c"], ["supersonic wing flutter", "heat transfer in slabs", "boundary layers"])
    hits, scores = bm25.search(["flutter of wings", "slab heat"], k=5)
    assert hits[0][0] == "a" and hits[1][0] == "b"
    assert len(hits[0]) == 3 and scores.shape == (2, 3)
    with pytest.raises(ValueError):
        BM25Retriever([], [])


def _write(folder, corpus, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(corpus)
    (folder / "queries.jsonl").write_text(queries)
    (folder / "qrels" / "test.tsv").write_text(qrels)


GOOD_C = '{"_id": "d1", "title": "t", "text": "x"}\n'
GOOD_Q = '{"_id": "q1", "text": "y"}\n'
GOOD_R = "query-id\tcorpus-id\tscore\nq1\td1\t1\n"


@pytest.mark.parametrize(
    "corpus,queries,qrels,match",
    [
        ('{"_id": "d1", "title": "t"\n', GOOD_Q, GOOD_R, r"corpus.jsonl:1: invalid JSON"),
        ('{"_id": "d1", "title": "t"}\n', GOOD_Q, GOOD_R, r"corpus.jsonl:1: missing field 'text'"),
        (GOOD_C + GOOD_C, GOOD_Q, GOOD_R, r"corpus.jsonl:2: duplicate _id 'd1'"),
        (GOOD_C, GOOD_Q, "query-id\tcorpus-id\tscore\nq9\td1\t1\n", r"query-id 'q9'"),
        (GOOD_C, GOOD_Q, "query-id\tcorpus-id\tscore\nq1\td9\t1\n", r"corpus-id 'd9'"),
        (GOOD_C, GOOD_Q, "qid\tdid\trel\nq1\td1\t1\n", r"test.tsv:1: expected header"),
        (GOOD_C, GOOD_Q, "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", r"test.tsv:2: field 'score'"),
    ],
)
def test_bad_beir_input_names_file_line_and_field(tmp_path, corpus, queries, qrels, match):
    _write(tmp_path, corpus, queries, qrels)
    with pytest.raises(DataFormatError, match=match):
        load_beir(str(tmp_path))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="queries"):
        _write(tmp_path, GOOD_C, GOOD_Q, GOOD_R)
        (tmp_path / "queries.jsonl").unlink()
        load_beir(str(tmp_path))
