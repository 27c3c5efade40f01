"""Title → abstract pairs from any corpus with titles (weak supervision in the S2ORC style).

Each document with a non-empty title becomes a query (the title) whose one relevant document is
the document's *text without the title* — otherwise the pair would be a trivial exact match.
The corpus written for the environment is therefore the title-less texts; documents without a
title stay in it as distractors.
"""

from __future__ import annotations

from collections.abc import Iterable

from .collection import Collection, CorpusWriter
from .issues import IssueLog

__all__ = ["convert_titles"]


def convert_titles(
    documents: Iterable[tuple[str, str, str, str]],
    name: str,
    corpus_path: str,
    inputs: list[str],
    issues: IssueLog,
    id_field: str = "_id",
    text_field: str = "text",
    batch_rows: int = 50_000,
) -> Collection:
    """Turn ``(place, doc_id, title, text)`` documents into title queries over a title-less corpus.

    The query id of a title is its document's id. ``id_field`` / ``text_field`` name the input's
    fields in messages.
    """
    corpus = CorpusWriter(corpus_path, issues, id_field=id_field, text_field=text_field, batch_rows=batch_rows)
    queries: dict[str, str] = {}
    untitled = 0
    for place, doc_id, title, text in documents:
        if not corpus.add(doc_id, "", text, place):
            continue
        if title.strip():
            queries[doc_id] = title.strip()
        else:
            untitled += 1
    num_docs = corpus.close()
    return Collection(
        name=name,
        corpus_path=corpus_path,
        num_docs=num_docs,
        queries=queries,
        qrels={q: {q: 1} for q in queries},
        negatives={},
        inputs=inputs,
        stats={"documents_without_title": untitled},
    )
