"""Corpus texts for the environment from ``corpus.parquet``."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_search_r3.env import load_corpus_texts
from verl_search_r3.prompts import format_document


def _write(path, rows: dict) -> str:
    pq.write_table(pa.table(rows), str(path), row_group_size=2)
    return str(path)


def test_texts_are_formatted_documents_and_a_shard_keeps_its_own(tmp_path):
    path = _write(tmp_path / "corpus.parquet", {"doc_id": ["a", "b", "c"], "title": ["T", None, "  "],
                                                 "text": ["body a", "body b", None]})
    ids, texts = load_corpus_texts(path, batch_rows=2)
    assert ids == ["a", "b", "c"]
    assert texts == [format_document("T", "body a"), format_document(None, "body b"), ""]
    assert load_corpus_texts(path, keep=lambda d: d != "b") == (["a", "c"], [texts[0], texts[2]])


def test_bad_corpus_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus_texts(str(tmp_path / "missing.parquet"))
    path = _write(tmp_path / "no_title.parquet", {"doc_id": ["a"], "text": ["x"]})
    with pytest.raises(ValueError, match=r"no_title.parquet: missing column\(s\) \['title'\]"):
        load_corpus_texts(path)
    path = _write(tmp_path / "dup.parquet", {"doc_id": ["a", "b", "a"], "title": ["", "", ""], "text": ["1", "2", "3"]})
    with pytest.raises(ValueError, match="dup.parquet: row 3: duplicate doc_id 'a'"):
        load_corpus_texts(path)
