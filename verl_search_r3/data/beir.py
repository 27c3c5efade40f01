"""BEIR-layout folders: ``corpus.jsonl`` (``_id,title,text``), ``queries.jsonl`` (``_id,text``),
``qrels/<split>.tsv`` (header ``query-id corpus-id score``, graded).

Two ways in: :func:`load_beir` reads a collection that fits in RAM (evaluation sets such as
Cranfield, SciFact, NFCorpus) and raises on the first defect; :func:`convert_beir` streams the
corpus to parquet for ``data_prep`` (BEIR's MS MARCO has 8.8M passages) and skips bad rows with
a warning unless the :class:`IssueLog` is strict. Messages name the file, line and field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from .collection import Collection, CorpusWriter, QrelsBuilder, relevant_only
from .issues import DataFormatError, IssueLog
from .readers import iter_jsonl, iter_tsv, require_file, text_field

__all__ = [
    "BeirData",
    "DataFormatError",
    "BeirPaths",
    "load_beir",
    "convert_beir",
    "iter_beir_corpus",
    "iter_beir_queries",
    "read_beir_qrels",
    "read_qrels",
]

QRELS_HEADER = ("query-id", "corpus-id", "score")


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


@dataclass(frozen=True)
class BeirPaths:
    """The three files of a BEIR folder for one split; checked to exist."""

    corpus: str
    queries: str
    qrels: str

    @classmethod
    def of(cls, folder: str, split: str = "test", need_qrels: bool = True) -> BeirPaths:
        """Paths in ``folder``; a missing file is a :class:`FileNotFoundError` naming it."""
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"BEIR folder {folder!r} does not exist")
        paths = cls(
            corpus=os.path.join(folder, "corpus.jsonl"),
            queries=os.path.join(folder, "queries.jsonl"),
            qrels=os.path.join(folder, "qrels", f"{split}.tsv"),
        )
        require_file(paths.corpus, "BEIR corpus")
        if need_qrels:
            require_file(paths.queries, "BEIR queries")
            require_file(paths.qrels, f"BEIR qrels (split {split!r})")
        return paths


def iter_beir_corpus(
    path: str, issues: IssueLog, progress: bool = False, skipped: dict[str, str] | None = None
) -> Iterator[tuple[str, str, str, str]]:
    """``(place, doc_id, title, text)`` per well-formed line of ``corpus.jsonl`` (title may be absent).

    ``skipped`` (if given) receives ``doc_id -> place`` of rows skipped for a bad text or title,
    so a later judgement naming the document can say where it went.
    """
    for place, rec in iter_jsonl(path, issues, progress, desc="corpus"):
        doc_id = text_field(rec, "_id", place, issues, is_id=True)
        if doc_id is None:
            continue
        text = text_field(rec, "text", place, issues)
        title = text_field(rec, "title", place, issues, required=False) if text is not None else None
        if title is None:
            if skipped is not None:
                skipped.setdefault(doc_id, place)
            continue
        yield place, doc_id, title, text


def iter_beir_queries(path: str, issues: IssueLog, skipped: dict[str, str] | None = None) -> Iterator[tuple[str, str, str]]:
    """``(place, qid, text)`` per well-formed line of ``queries.jsonl`` (``skipped``: as for
    :func:`iter_beir_corpus`)."""
    for place, rec in iter_jsonl(path, issues):
        qid = text_field(rec, "_id", place, issues, is_id=True)
        text = text_field(rec, "text", place, issues) if qid is not None else None
        if text is not None:
            yield place, qid, text
        elif qid is not None and skipped is not None:
            skipped.setdefault(qid, place)


def read_beir_qrels(path: str, issues: IssueLog) -> QrelsBuilder:
    """Judgements of a BEIR qrels TSV (unchecked against queries and corpus until ``finish``)."""
    builder = QrelsBuilder(issues, QRELS_HEADER)
    for place, row in iter_tsv(path, QRELS_HEADER, issues, header=QRELS_HEADER):
        builder.add(row["query-id"], row["corpus-id"], row["score"], place)
    return builder


def _read_queries(path: str, issues: IssueLog, wanted: set[str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """Queries (only ``wanted`` ids, if given) and the ids skipped for an empty text, with places."""
    queries: dict[str, str] = {}
    seen: set[str] = set()
    skipped: dict[str, str] = {}
    for place, qid, text in iter_beir_queries(path, issues, skipped):
        if qid in seen:
            issues.skip("duplicate_id", f"{place}: duplicate _id {qid!r} (the first one is kept)")
            continue
        seen.add(qid)
        if wanted is not None and qid not in wanted:
            continue
        if not text.strip():
            issues.skip("empty_text", f"{place}: empty 'text' in query {qid!r}")
            skipped[qid] = place
            continue
        queries[qid] = text
    return queries, skipped


def load_beir(folder: str, split: str = "test") -> BeirData:
    """Load a whole BEIR folder into memory; any defect raises :class:`DataFormatError`.

    Documents with an empty text are kept (evaluation needs the corpus as published).
    """
    paths = BeirPaths.of(folder, split)
    issues = IssueLog(strict=True)
    corpus: dict[str, tuple[str, str]] = {}
    for place, doc_id, title, text in iter_beir_corpus(paths.corpus, issues):
        if doc_id in corpus:
            issues.skip("duplicate_id", f"{place}: duplicate _id {doc_id!r}")
        corpus[doc_id] = (title, text)
    queries: dict[str, str] = {}
    for place, qid, text in iter_beir_queries(paths.queries, issues):
        if qid in queries:
            issues.skip("duplicate_id", f"{place}: duplicate _id {qid!r}")
        queries[qid] = text
    qrels = read_beir_qrels(paths.qrels, issues).finish(queries, corpus, paths.queries, paths.corpus)
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, name=os.path.basename(os.path.normpath(folder)))


def convert_beir(
    folder: str,
    split: str,
    corpus_path: str,
    issues: IssueLog,
    batch_rows: int = 50_000,
    progress: bool = False,
) -> Collection:
    """Stream a BEIR folder into ``corpus_path`` and return its judged queries and relevance.

    Order: qrels (small) → queries (only judged ones kept) → corpus (streamed to parquet) →
    judgements checked against both.
    """
    paths = BeirPaths.of(folder, split)
    builder = read_beir_qrels(paths.qrels, issues)
    judgements_read = len(builder)
    queries, skipped_queries = _read_queries(paths.queries, issues, wanted=builder.query_ids())
    corpus = CorpusWriter(corpus_path, issues, id_field="_id", text_field="text", batch_rows=batch_rows)
    for place, doc_id, title, text in iter_beir_corpus(paths.corpus, issues, progress, corpus.skipped):
        corpus.add(doc_id, title, text, place)
    num_docs = corpus.close()
    judged = builder.finish(queries, corpus, paths.queries, paths.corpus, skipped_queries, corpus.skipped)
    qrels, non_relevant = relevant_only(judged)
    return Collection(
        name=os.path.basename(os.path.normpath(folder)),
        corpus_path=corpus_path,
        num_docs=num_docs,
        queries={q: t for q, t in queries.items() if q in qrels},
        qrels=qrels,
        negatives={},
        inputs=[paths.corpus, paths.queries, paths.qrels],
        stats={"judgements_read": judgements_read, "non_relevant_judgements": non_relevant},
    )


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (header ``query-id corpus-id score``) without checking ids; any defect raises."""
    return read_beir_qrels(path, IssueLog(strict=True)).judgements()
