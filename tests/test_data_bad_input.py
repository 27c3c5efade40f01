"""One case per kind of bad input: skipped with a warning naming file, line and field (counted in
the manifest), an error under ``strict``; whole-input defects are always errors."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from verl_search_r3.data.build import BuildOptions, build_pairs
from verl_search_r3.data.issues import DataFormatError

GOOD_CORPUS = [
    {"_id": "d1", "title": "Wing flutter", "text": "flutter of swept wings"},
    {"_id": "d2", "title": "Heat", "text": "heat conduction in slabs"},
    {"_id": "d3", "title": "Shells", "text": "buckling of thin shells"},
]
GOOD_QUERIES = [{"_id": "q1", "text": "wing flutter"}, {"_id": "q2", "text": "slab heat"}]
GOOD_QRELS = [("q1", "d1", "1"), ("q2", "d2", "2")]


def beir(tmp_path, corpus=None, queries=None, qrels=None, raw_corpus: bytes | None = None):
    """A small BEIR folder; ``raw_corpus`` replaces corpus.jsonl byte for byte."""
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    lines = lambda recs: "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)  # noqa: E731
    if raw_corpus is not None:
        (folder / "corpus.jsonl").write_bytes(raw_corpus)
    else:
        (folder / "corpus.jsonl").write_text(lines(GOOD_CORPUS if corpus is None else corpus))
    (folder / "queries.jsonl").write_text(lines(GOOD_QUERIES if queries is None else queries))
    rows = GOOD_QRELS if qrels is None else qrels
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows))
    return "beir", str(folder)


def msmarco(tmp_path, collection: bytes, qrels="q1\t0\td1\t1\n"):
    folder = tmp_path / "msmarco"
    folder.mkdir()
    (folder / "collection.tsv").write_bytes(collection)
    (folder / "queries.train.tsv").write_text("q1\twing flutter\n")
    (folder / "qrels.train.tsv").write_text(qrels)
    return "msmarco", str(folder)


def generic(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "jsonl", str(path)


GOOD_ROW = {"query": "wing flutter", "positive": "flutter of swept wings"}

SKIP_CASES = {
    "malformed JSON line": (
        lambda t: beir(t, corpus=[GOOD_CORPUS[0], '{"_id": "d2", "text": ', GOOD_CORPUS[2]], qrels=[GOOD_QRELS[0]]),
        "invalid_json",
        r"corpus\.jsonl:2: invalid JSON",
    ),
    "missing field (JSON)": (
        lambda t: beir(t, queries=[GOOD_QUERIES[0], {"_id": "q2", "title": "no text"}], qrels=[GOOD_QRELS[0]]),
        "missing_field",
        r"queries\.jsonl:2: missing field 'text'",
    ),
    "missing field (TSV column)": (
        lambda t: msmarco(t, b"d1\tflutter of swept wings\nd2\n"),
        "missing_field",
        r"collection\.tsv:2: missing field 'passage'",
    ),
    "missing field (table row)": (
        lambda t: generic(t, [GOOD_ROW, {"query": "slab heat"}]),
        "missing_field",
        r"rows\.jsonl:2: missing field 'positive'",
    ),
    "qrels row naming an unknown query": (
        lambda t: beir(t, qrels=[*GOOD_QRELS, ("q9", "d3", "1")]),
        "unknown_query",
        r"test\.tsv:4: query-id 'q9' is not in .*queries\.jsonl",
    ),
    "qrels row naming an unknown document": (
        lambda t: beir(t, qrels=[*GOOD_QRELS, ("q1", "d9", "1")]),
        "unknown_document",
        r"test\.tsv:4: corpus-id 'd9' \(query 'q1'\) is not in .*corpus\.jsonl",
    ),
    "grade that is not a number": (
        lambda t: msmarco(t, b"d1\tflutter\n", qrels="q1\t0\td1\t1\nq1\t0\td1\thigh\n"),
        "invalid_field",
        r"qrels\.train\.tsv:2: field 'rel' is not a whole number",
    ),
    "empty text": (
        lambda t: beir(t, corpus=[*GOOD_CORPUS, {"_id": "d4", "title": "", "text": "  "}]),
        "empty_text",
        r"corpus\.jsonl:4: empty 'text' in document 'd4'",
    ),
    "duplicate ids": (
        lambda t: beir(t, corpus=[*GOOD_CORPUS, {"_id": "d1", "title": "again", "text": "a second d1"}]),
        "duplicate_id",
        r"corpus\.jsonl:4: duplicate _id 'd1'",
    ),
    "wrong encoding (JSON)": (
        lambda t: beir(t, raw_corpus=b'{"_id": "d1", "text": "flutter"}\n{"_id": "d2", "text": "caf\xe9 heat"}\n', qrels=[GOOD_QRELS[0]]),
        "bad_encoding",
        r"corpus\.jsonl:2: field 'text' is not valid UTF-8",
    ),
    "wrong encoding (TSV)": (
        lambda t: msmarco(t, b"d1\tflutter\nd2\tcaf\xe9\n"),
        "bad_encoding",
        r"collection\.tsv:2: field 'passage' is not valid UTF-8",
    ),
}


@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_row_defect_is_skipped_with_a_warning_and_counted(tmp_path, caplog, case):
    make, reason, message = SKIP_CASES[case]
    fmt, path = make(tmp_path)
    with caplog.at_level(logging.WARNING, logger="verl_search_r3.data"):
        report = build_pairs(BuildOptions(format=fmt, input=path, output=str(tmp_path / "out")))
    assert report.manifest["skipped"] == {reason: 1}
    assert any(re.search(message, r.getMessage()) for r in caplog.records), caplog.text


@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_row_defect_is_an_error_with_strict(tmp_path, case):
    make, _, message = SKIP_CASES[case]
    fmt, path = make(tmp_path)
    with pytest.raises(DataFormatError, match=message):
        build_pairs(BuildOptions(format=fmt, input=path, output=str(tmp_path / "out"), strict=True))
    assert not os.path.exists(tmp_path / "out") and sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


ERROR_CASES = {
    "empty result": (lambda t: beir(t, qrels=[("q1", "d9", "1")]), r"empty result: no query with a relevant document"),
    "only non-relevant judgements": (lambda t: beir(t, qrels=[("q1", "d1", "0")]), r"empty result"),
    "empty corpus": (lambda t: beir(t, corpus=[]), r"empty result: no document"),
    "UTF-16 file": (lambda t: beir(t, raw_corpus="\ufeff".encode("utf-16-le") + '{"_id": "d1"}\n'.encode("utf-16-le")), r"corpus\.jsonl:1: the file is UTF-16"),
}


def test_whole_input_defects_are_errors_without_strict(tmp_path):
    for i, (case, (make, message)) in enumerate(ERROR_CASES.items()):
        fmt, path = make(tmp_path / str(i))
        with pytest.raises(DataFormatError, match=message):
            build_pairs(BuildOptions(format=fmt, input=path, output=str(tmp_path / str(i) / "out")))
        assert not os.path.exists(tmp_path / str(i) / "out"), case


def test_wrong_qrels_header_and_missing_files(tmp_path):
    fmt, path = beir(tmp_path)
    with open(os.path.join(path, "qrels", "test.tsv"), "w") as f:
        f.write("qid\tdid\trel\nq1\td1\t1\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:1: expected header"):
        build_pairs(BuildOptions(format=fmt, input=path, output=str(tmp_path / "out")))
    os.remove(os.path.join(path, "queries.jsonl"))
    with pytest.raises(FileNotFoundError, match="queries"):
        build_pairs(BuildOptions(format=fmt, input=path, output=str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match="queries.dev.tsv"):
        build_pairs(BuildOptions(format="msmarco", input=msmarco(tmp_path, b"d1\tx\n")[1], output=str(tmp_path / "o"), split="dev"))
    assert sorted(os.listdir(tmp_path)) == ["beir", "msmarco"]
