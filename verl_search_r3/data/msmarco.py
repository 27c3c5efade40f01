"""MS MARCO-style TSV folders: ``collection.tsv`` (pid, passage), ``queries.<split>.tsv`` (qid,
query), ``qrels.<split>.tsv`` (TREC ``qid 0 pid rel``) and optional id triples (qid, pid+, pid-).

The collection is streamed line by line into ``corpus.parquet``; only document ids, judged
queries and judgements stay in memory, so the 8.8M-passage collection is never held as Python
strings. Passages have no titles (``title`` is empty).
"""

from __future__ import annotations

import os

from .collection import Collection, CorpusWriter, GivenNegatives, QrelsBuilder, missing_reason, relevant_only
from .issues import IssueLog
from .readers import iter_tsv, require_file

__all__ = ["MsMarcoPaths", "convert_msmarco"]

COLLECTION_COLUMNS = ("pid", "passage")
QUERY_COLUMNS = ("qid", "query")
QRELS_COLUMNS = ("qid", "iteration", "pid", "rel")
TRIPLE_COLUMNS = ("qid", "pos_pid", "neg_pid")


class MsMarcoPaths:
    """The files of an MS MARCO folder for one split (``train``, ``dev``, ``dev.small``, ...)."""

    def __init__(self, folder: str, split: str, triples: str | None = None):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"MS MARCO folder {folder!r} does not exist")
        self.collection = require_file(os.path.join(folder, "collection.tsv"), "MS MARCO collection")
        self.queries = require_file(os.path.join(folder, f"queries.{split}.tsv"), f"MS MARCO queries (split {split!r})")
        self.qrels = require_file(os.path.join(folder, f"qrels.{split}.tsv"), f"MS MARCO qrels (split {split!r})")
        self.triples = require_file(triples, "MS MARCO triples") if triples else None

    def all(self) -> list[str]:
        """Every input file, for the manifest."""
        return [p for p in (self.collection, self.queries, self.qrels, self.triples) if p]


def convert_msmarco(
    folder: str,
    split: str,
    corpus_path: str,
    issues: IssueLog,
    triples: str | None = None,
    negatives_cap: int = 0,
    batch_rows: int = 50_000,
    progress: bool = False,
) -> Collection:
    """Stream an MS MARCO folder into ``corpus_path``; return judged queries, relevance, given negatives.

    Args:
        triples: a TSV of ``qid, positive pid, negative pid`` rows; the negatives become given
            hard negatives of their query (at most ``negatives_cap`` per query, first ones kept).
    """
    paths = MsMarcoPaths(folder, split, triples)
    builder = QrelsBuilder(issues, ("qid", "pid", "rel"))
    for place, row in iter_tsv(paths.qrels, QRELS_COLUMNS, issues, sep=None):
        builder.add(row["qid"], row["pid"], row["rel"], place)

    judgements_read = len(builder)
    judged = builder.query_ids()
    queries: dict[str, str] = {}
    seen: set[str] = set()
    skipped_queries: dict[str, str] = {}
    for place, row in iter_tsv(paths.queries, QUERY_COLUMNS, issues, skipped=skipped_queries):
        qid = row["qid"]
        if qid in seen:
            issues.skip("duplicate_id", f"{place}: duplicate qid {qid!r} (the first one is kept)")
            continue
        seen.add(qid)
        if qid not in judged:
            continue
        if not row["query"].strip():
            issues.skip("empty_text", f"{place}: empty 'query' in query {qid!r}")
            skipped_queries[qid] = place
            continue
        queries[qid] = row["query"]

    corpus = CorpusWriter(corpus_path, issues, id_field="pid", text_field="passage", batch_rows=batch_rows)
    for place, row in iter_tsv(paths.collection, COLLECTION_COLUMNS, issues, progress=progress, desc="collection",
                               skipped=corpus.skipped):
        corpus.add(row["pid"], "", row["passage"], place)
    num_docs = corpus.close()

    checked = builder.finish(queries, corpus, paths.queries, paths.collection, skipped_queries, corpus.skipped)
    qrels, non_relevant = relevant_only(checked)
    queries = {q: t for q, t in queries.items() if q in qrels}

    given = GivenNegatives(cap=negatives_cap)
    if paths.triples and negatives_cap > 0:
        for place, row in iter_tsv(paths.triples, TRIPLE_COLUMNS, issues, progress=progress, desc="triples"):
            qid, neg = row["qid"], row["neg_pid"]
            if qid not in queries:
                why = missing_reason(qid, skipped_queries, f"the judged queries of {paths.queries}")
                issues.skip("unknown_query", f"{place}: qid {qid!r} {why}")
            elif neg not in corpus:
                issues.skip("unknown_document", f"{place}: neg_pid {neg!r} {missing_reason(neg, corpus.skipped, paths.collection)}")
            else:
                given.add(qid, neg)

    return Collection(
        name=os.path.basename(os.path.normpath(folder)),
        corpus_path=corpus_path,
        num_docs=num_docs,
        queries=queries,
        qrels=qrels,
        negatives=given.by_query,
        inputs=paths.all(),
        stats={"judgements_read": judgements_read, "non_relevant_judgements": non_relevant},
    )
