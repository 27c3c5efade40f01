"""Read a BEIR-layout folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

This in-memory reader suits collections that fit in RAM (evaluation sets such as Cranfield,
SciFact, NFCorpus). Errors name the file, line and field.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

__all__ = ["BeirData", "DataFormatError", "load_beir", "read_jsonl", "read_qrels"]


class DataFormatError(ValueError):
    """Malformed input; the message names the file, line and field."""


@dataclass
class BeirData:
    """A BEIR collection. ``corpus[doc_id] = (title, text)``; ``qrels[qid][doc_id] = grade``."""

    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str

    def judged_queries(self) -> dict[str, str]:
        """Queries that have at least one judgement with a positive grade."""
        return {q: t for q, t in self.queries.items() if any(g > 0 for g in self.qrels.get(q, {}).values())}


def read_jsonl(path: str, required: tuple[str, ...]):
    """Yield ``(line_number, record)`` from a JSON-lines file, checking ``required`` string fields."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataFormatError(f"{path}:{n}: expected a JSON object")
            for field in required:
                if field not in rec:
                    raise DataFormatError(f"{path}:{n}: missing field {field!r}")
            yield n, rec


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (header ``query-id corpus-id score``)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise DataFormatError(f"{path}:1: expected header 'query-id<TAB>corpus-id<TAB>score', got {header!r}")
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) < 3:
                raise DataFormatError(f"{path}:{n}: expected 3 tab-separated fields, got {len(row)}")
            try:
                grade = int(float(row[2]))
            except ValueError:
                raise DataFormatError(f"{path}:{n}: field 'score' is not a number: {row[2]!r}") from None
            qrels.setdefault(row[0], {})[row[1]] = grade
    return qrels


def load_beir(folder: str, split: str = "test") -> BeirData:
    """Load a BEIR folder; qrels rows naming unknown queries or documents are an error."""
    paths = {
        "corpus": os.path.join(folder, "corpus.jsonl"),
        "queries": os.path.join(folder, "queries.jsonl"),
        "qrels": os.path.join(folder, "qrels", f"{split}.tsv"),
    }
    for what, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BEIR folder {folder!r} has no {what} file {path!r}")
    corpus: dict[str, tuple[str, str]] = {}
    for n, rec in read_jsonl(paths["corpus"], ("_id", "text")):
        doc_id = str(rec["_id"])
        if doc_id in corpus:
            raise DataFormatError(f"{paths['corpus']}:{n}: duplicate _id {doc_id!r}")
        corpus[doc_id] = (str(rec.get("title") or ""), str(rec["text"] or ""))
    queries: dict[str, str] = {}
    for n, rec in read_jsonl(paths["queries"], ("_id", "text")):
        qid = str(rec["_id"])
        if qid in queries:
            raise DataFormatError(f"{paths['queries']}:{n}: duplicate _id {qid!r}")
        queries[qid] = str(rec["text"])
    qrels = read_qrels(paths["qrels"])
    for qid, docs in qrels.items():
        if qid not in queries:
            raise DataFormatError(f"{paths['qrels']}: query-id {qid!r} is not in {paths['queries']}")
        unknown = [d for d in docs if d not in corpus]
        if unknown:
            raise DataFormatError(f"{paths['qrels']}: corpus-id {unknown[0]!r} (query {qid!r}) is not in {paths['corpus']}")
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, name=os.path.basename(os.path.normpath(folder)))
