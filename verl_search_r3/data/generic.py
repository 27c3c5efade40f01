"""Generic (query, positives, negatives) rows from a JSON-lines file, a parquet file or a
``datasets`` folder saved with ``save_to_disk``, with the field names given as options.

This covers NQ / TriviaQA / HotpotQA-style exports (DPR's ``question``, ``positive_ctxs``,
``hard_negative_ctxs``), sentence-transformers triplets (``anchor``, ``positive``, ``negative``)
and similar. A passage field may hold a string, an object with title / text / id fields, or a
list of either. Passages without an id get one from a hash of their text, so the same passage
in many rows is one corpus document; queries without an id field get one from their text, so
rows repeating a query merge into one query with several positives.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .collection import Collection, CorpusWriter, GivenNegatives
from .issues import IssueLog
from .readers import TableKind, iter_records, text_field

__all__ = ["FieldNames", "convert_generic", "iter_generic_documents", "content_id", "dataset_name"]

_ID_HASH_CHARS = 16


@dataclass(frozen=True)
class FieldNames:
    """Names of the fields of a generic row (and of the objects inside its passage fields).

    Attributes:
        query: the query text.
        query_id: the query id; None derives it from the query text.
        positive: relevant passage(s).
        negative: hard negative passage(s); optional in every row. None ignores negatives.
        doc_id: a passage's id inside a passage object (or a row's id with ``--title-as-query``);
            absent ids are derived from the passage text.
        title: a passage's title inside a passage object (optional).
        text: a passage's text inside a passage object.
    """

    query: str = "query"
    query_id: str | None = None
    positive: str = "positive"
    negative: str | None = "negative"
    doc_id: str = "id"
    title: str = "title"
    text: str = "text"


def content_id(prefix: str, *parts: str) -> str:
    """A stable id for content without one: ``prefix`` + a hash of the parts."""
    h = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()
    return prefix + h[:_ID_HASH_CHARS]


def _passage(value: Any, field: str, f: FieldNames, place: str, issues: IssueLog) -> tuple[str, str, str] | None:
    """``(doc_id, title, text)`` of one passage value (a string or an object), None if skipped."""
    where_ = f"{place}: field {field!r}"
    if isinstance(value, str):
        rec = {f.text: value}
    elif isinstance(value, dict):
        rec = value
    else:
        issues.skip("invalid_field", f"{place}: field {field!r} should hold strings or objects, got {type(value).__name__}")
        return None
    text = text_field(rec, f.text, where_, issues)
    title = text_field(rec, f.title, where_, issues, required=False) if text is not None else None
    if title is None:
        return None
    if f.doc_id in rec and rec[f.doc_id] is not None:
        doc_id = text_field(rec, f.doc_id, where_, issues, is_id=True)
        if doc_id is None:
            return None
    else:
        doc_id = content_id("d", title, text)
    return doc_id, title, text


def _passages(rec: dict[str, Any], field: str, f: FieldNames, place: str, issues: IssueLog, required: bool) -> list | None:
    """All passages of ``rec[field]`` (a passage or a list of them); None if the row must be skipped."""
    if field not in rec or rec[field] is None:
        if required:
            issues.skip("missing_field", f"{place}: missing field {field!r}")
            return None
        return []
    values = rec[field] if isinstance(rec[field], list) else [rec[field]]
    out = []
    for v in values:
        p = _passage(v, field, f, place, issues)
        if p is None:
            return None
        out.append(p)
    if required and not out:
        issues.skip("empty_text", f"{place}: field {field!r} holds no passage")
        return None
    return out


def convert_generic(
    path: str,
    kind: TableKind,
    fields: FieldNames,
    corpus_path: str,
    issues: IssueLog,
    split: str | None = None,
    negatives_cap: int = 0,
    batch_rows: int = 50_000,
    progress: bool = False,
) -> Collection:
    """Read generic rows into a corpus (positives and negatives, deduplicated) and judged queries.

    Each positive gets grade 1. A row with any defect (missing or empty query, no positive, a
    passage without text) is skipped whole; negatives beyond ``negatives_cap`` per query are dropped.
    """
    corpus = CorpusWriter(corpus_path, issues, id_field=fields.doc_id, text_field=fields.text, batch_rows=batch_rows, same_content_ok=True)
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    given = GivenNegatives(cap=negatives_cap)
    rows = 0
    for place, rec in iter_records(path, kind, issues, split, batch_rows, progress):
        rows += 1
        query = text_field(rec, fields.query, place, issues)
        if query is None:
            continue
        if not query.strip():
            issues.skip("empty_text", f"{place}: empty {fields.query!r}")
            continue
        qid = text_field(rec, fields.query_id, place, issues, is_id=True) if fields.query_id else content_id("q", query)
        if qid is None:
            continue
        if queries.get(qid, query) != query:
            issues.skip("duplicate_id", f"{place}: query id {qid!r} was seen before with another text (the first one is kept)")
            continue
        positives = _passages(rec, fields.positive, fields, place, issues, required=True)
        negatives = _passages(rec, fields.negative, fields, place, issues, required=False) if fields.negative else []
        if positives is None or negatives is None:
            continue
        added = [doc_id for doc_id, title, text in positives if corpus.add(doc_id, title, text, place)]
        if not added:
            continue
        queries[qid] = query
        for doc_id in added:
            qrels.setdefault(qid, {})[doc_id] = 1
        for doc_id, title, text in negatives:
            if corpus.add(doc_id, title, text, place):
                given.add(qid, doc_id)
    num_docs = corpus.close()
    return Collection(
        name=dataset_name(path),
        corpus_path=corpus_path,
        num_docs=num_docs,
        queries=queries,
        qrels=qrels,
        negatives=given.by_query,
        inputs=[path],
        stats={"rows_read": rows},
    )


def iter_generic_documents(
    path: str,
    kind: TableKind,
    fields: FieldNames,
    issues: IssueLog,
    split: str | None = None,
    batch_rows: int = 50_000,
    progress: bool = False,
) -> Iterator[tuple[str, str, str, str]]:
    """``(place, doc_id, title, text)`` per row of a document table (for ``--title-as-query``)."""
    for place, rec in iter_records(path, kind, issues, split, batch_rows, progress):
        text = text_field(rec, fields.text, place, issues)
        title = text_field(rec, fields.title, place, issues) if text is not None else None
        if title is None:
            continue
        if fields.doc_id in rec:
            doc_id = text_field(rec, fields.doc_id, place, issues, is_id=True)
            if doc_id is None:
                continue
        else:
            doc_id = content_id("d", title, text)
        yield place, doc_id, title, text


def dataset_name(path: str) -> str:
    """A dataset name from a file or folder path: its base name without extension."""
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
