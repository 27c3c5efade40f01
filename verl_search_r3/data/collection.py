"""The common shape every converter produces: a corpus parquet on disk plus judged queries in memory.

Converters stream documents into a :class:`CorpusWriter` (Arrow batches appended to
``corpus.parquet``, so a corpus of millions of passages is never held as Python strings), and
collect judgements in a :class:`QrelsBuilder`, which checks them against the queries and the
corpus once both have been read. What stays in memory is what the outputs need: document ids,
judged query texts, relevance grades and given negatives.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from ..prompts import format_document
from .issues import DataFormatError, IssueLog

__all__ = ["CORPUS_SCHEMA", "Collection", "CorpusWriter", "QrelsBuilder", "GivenNegatives", "relevant_only", "missing_reason", "parse_grade"]

#: ``corpus.parquet``: one row per document, in input order.
CORPUS_SCHEMA = pa.schema([("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())])


class CorpusWriter:
    """Append documents to a parquet file in batches, skipping empty texts and repeated ids.

    Args:
        path: the parquet file to write.
        issues: where skipped documents are reported.
        id_field, text_field: the input's names for the id and text, used in messages.
        batch_rows: documents buffered per row group.
        same_content_ok: a repeated id whose title and text equal the first occurrence's is
            silently merged (inputs that inline passages, where one passage serves many queries);
            otherwise every repeated id is a ``duplicate_id`` skip.
    """

    def __init__(
        self,
        path: str,
        issues: IssueLog,
        id_field: str,
        text_field: str,
        batch_rows: int = 50_000,
        same_content_ok: bool = False,
    ):
        self.path = path
        self.issues = issues
        self.id_field = id_field
        self.text_field = text_field
        self.batch_rows = batch_rows
        self.skipped: dict[str, str] = {}  # doc id -> place of the skipped row, for later messages
        self._content: dict[str, int] | None = {} if same_content_ok else None
        self._ids: set[str] = set()
        self._buf: dict[str, list[str]] = {name: [] for name in CORPUS_SCHEMA.names}
        self._writer = pq.ParquetWriter(path, CORPUS_SCHEMA)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, doc_id: str, title: str, text: str, place: str) -> bool:
        """Add one document; False (and a reported skip) if its text is empty or its id is a duplicate."""
        if doc_id in self._ids:
            if self._content is not None and self._content[doc_id] == hash((title, text)):
                return True
            self.issues.skip("duplicate_id", f"{place}: duplicate {self.id_field} {doc_id!r} (the first one is kept)")
            return False
        if not format_document(title, text):
            self.issues.skip("empty_text", f"{place}: empty {self.text_field!r} in document {doc_id!r}")
            self.skipped.setdefault(doc_id, place)
            return False
        self._ids.add(doc_id)
        if self._content is not None:
            self._content[doc_id] = hash((title, text))
        for name, value in zip(CORPUS_SCHEMA.names, (doc_id, title, text)):
            self._buf[name].append(value)
        if len(self._buf["doc_id"]) >= self.batch_rows:
            self._flush()
        return True

    def _flush(self) -> None:
        if self._buf["doc_id"]:
            self._writer.write_table(pa.table(self._buf, schema=CORPUS_SCHEMA))
            self._buf = {name: [] for name in CORPUS_SCHEMA.names}

    def close(self) -> int:
        """Write what is buffered and close the file; returns the number of documents."""
        self._flush()
        self._writer.close()
        return len(self._ids)


@dataclass
class GivenNegatives:
    """Hard negatives named by the input (MS MARCO triples, a ``negative`` field), per query, capped."""

    cap: int
    by_query: dict[str, list[str]] = field(default_factory=dict)

    def add(self, qid: str, doc_id: str) -> None:
        """Remember ``doc_id`` as a negative of ``qid`` (repeats and those past the cap are dropped)."""
        negs = self.by_query.setdefault(qid, [])
        if len(negs) < self.cap and doc_id not in negs:
            negs.append(doc_id)


def missing_reason(key: str, skipped: dict[str, str], source: str) -> str:
    """The end of a message saying why ``key`` cannot be found: skipped at a place, or absent."""
    return f"was skipped at {skipped[key]}" if key in skipped else f"is not in {source}"


def parse_grade(value: str | int | float) -> int | None:
    """A relevance grade as an int: whole numbers (``"2"``, ``"2.0"``, ``2``) only; None for
    anything else — text, ``inf``/``nan``, fractions such as ``0.7`` (truncating it would turn a
    relevant pair into a non-relevant one without a word)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


class QrelsBuilder:
    """Judgements ``(query, document, grade)`` read before the corpus, checked after it.

    ``fields`` are the input's names for the query id, document id and grade, used in messages.
    """

    def __init__(self, issues: IssueLog, fields: tuple[str, str, str] = ("query-id", "corpus-id", "score")):
        self.issues = issues
        self.query_field, self.doc_field, self.grade_field = fields
        self._rows: dict[tuple[str, str], tuple[int, str]] = {}

    def add(self, qid: str, doc_id: str, grade: str | int, place: str) -> None:
        """Add one judgement; a grade that is not a number or a repeated pair is skipped."""
        g = parse_grade(grade)
        if g is None:
            self.issues.skip("invalid_field", f"{place}: field {self.grade_field!r} is not a whole number: {grade!r}")
            return
        if (qid, doc_id) in self._rows:
            first = self._rows[(qid, doc_id)][1]
            self.issues.skip("duplicate_id", f"{place}: duplicate judgement {self.query_field} {qid!r}, {self.doc_field} {doc_id!r} (first at {first})")
            return
        self._rows[(qid, doc_id)] = (g, place)

    def judgements(self) -> dict[str, dict[str, int]]:
        """All judgements read, unchecked: ``{qid: {doc_id: grade}}`` in input order."""
        out: dict[str, dict[str, int]] = {}
        for (qid, doc_id), (grade, _) in self._rows.items():
            out.setdefault(qid, {})[doc_id] = grade
        return out

    def query_ids(self) -> set[str]:
        """Ids of queries with at least one judgement (of any grade)."""
        return {q for q, _ in self._rows}

    def __len__(self) -> int:
        return len(self._rows)

    def finish(
        self,
        queries: Container[str],
        corpus: Container[str],
        queries_file: str,
        corpus_file: str,
        skipped_queries: dict[str, str] | None = None,
        skipped_docs: dict[str, str] | None = None,
    ) -> dict[str, dict[str, int]]:
        """All checked judgements, ``{qid: {doc_id: grade}}`` in input order.

        A judgement naming a query or document that was not read (or was skipped, as the
        ``skipped_*`` maps of id -> place tell) is reported and dropped.
        """
        qrels: dict[str, dict[str, int]] = {}
        for (qid, doc_id), (grade, place) in self._rows.items():
            if qid not in queries:
                why = missing_reason(qid, skipped_queries or {}, queries_file)
                self.issues.skip("unknown_query", f"{place}: {self.query_field} {qid!r} {why}")
            elif doc_id not in corpus:
                why = missing_reason(doc_id, skipped_docs or {}, corpus_file)
                self.issues.skip("unknown_document", f"{place}: {self.doc_field} {doc_id!r} (query {qid!r}) {why}")
            else:
                qrels.setdefault(qid, {})[doc_id] = grade
        self._rows.clear()
        return qrels


def relevant_only(qrels: dict[str, dict[str, int]]) -> tuple[dict[str, dict[str, int]], int]:
    """Keep grades > 0, best first per query; also return how many judgements had grade <= 0."""
    kept: dict[str, dict[str, int]] = {}
    dropped = 0
    for qid, docs in qrels.items():
        rel = sorted(((d, g) for d, g in docs.items() if g > 0), key=lambda dg: -dg[1])
        dropped += len(docs) - len(rel)
        if rel:
            kept[qid] = dict(rel)
    return kept, dropped


@dataclass
class Collection:
    """A converted dataset: corpus on disk, judged queries and relevance in memory.

    ``queries`` holds only queries with at least one relevant document (grade > 0);
    ``qrels[qid]`` maps each relevant document to its grade, best first.
    """

    name: str
    corpus_path: str
    num_docs: int
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    negatives: dict[str, list[str]]
    inputs: list[str]
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_docs == 0:
            raise DataFormatError(f"empty result: no document was read from {', '.join(self.inputs)}")
        if not self.queries:
            raise DataFormatError(f"empty result: no query with a relevant document was read from {', '.join(self.inputs)}")

    @property
    def num_judgements(self) -> int:
        """Relevant (query, document) pairs."""
        return sum(len(d) for d in self.qrels.values())
