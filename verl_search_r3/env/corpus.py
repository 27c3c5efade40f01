"""Document texts for the environment, read from the project's ``corpus.parquet``.

``corpus.parquet`` has columns ``doc_id, title, text`` (what ``data_prep`` writes). The text a
document is embedded from is :func:`verl_search_r3.prompts.format_document` of its title and
text; the ``encode`` callback wraps it in the document prompt.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..prompts import format_document

__all__ = ["load_corpus_texts", "CORPUS_COLUMNS"]

CORPUS_COLUMNS = ("doc_id", "title", "text")


def load_corpus_texts(
    path: str,
    keep: Callable[[str], bool] | None = None,
    batch_rows: int = 65536,
    progress: bool = False,
) -> tuple[list[str], list[str]]:
    """Read ``(doc_ids, texts)`` from a corpus parquet.

    Args:
        path: the parquet file (columns ``doc_id, title, text``; ``title`` may be null).
        keep: optional filter on the doc id (a shard keeps its own ids).
        batch_rows: rows read per Arrow batch.
        progress: show a tqdm bar.

    Raises:
        FileNotFoundError / ValueError naming the file, the column or the duplicated id.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus parquet {path!r} does not exist")
    pf = pq.ParquetFile(path)
    missing = [c for c in CORPUS_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(CORPUS_COLUMNS)}")
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    row = 0
    with tqdm(total=pf.metadata.num_rows, unit="doc", desc="corpus texts", disable=not progress) as bar:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(CORPUS_COLUMNS)):
            cols = batch.to_pydict()
            for doc_id, title, text in zip(cols["doc_id"], cols["title"], cols["text"]):
                row += 1
                if doc_id is None:
                    raise ValueError(f"{path}: row {row}: null doc_id")
                if keep is not None and not keep(doc_id):
                    continue
                if doc_id in seen:
                    raise ValueError(f"{path}: row {row}: duplicate doc_id {doc_id!r}")
                seen.add(doc_id)
                ids.append(doc_id)
                texts.append(format_document(title, text or ""))
            bar.update(batch.num_rows)
    return ids, texts
