"""The output folder of ``data_prep/build_pairs.py``: schemas, writers and the atomic commit.

Files (all parquet written with pyarrow and an explicit schema):

* ``corpus.parquet`` — :data:`~verl_search_r3.data.collection.CORPUS_SCHEMA` (``doc_id, title, text``).
* ``pairs.parquet`` — :data:`PAIRS_SCHEMA`, one row per (query, relevant document): the Stage-1 groups.
* ``rl_train.parquet`` / ``rl_val.parquet`` — :data:`RL_SCHEMA`, one row per query, the columns
  verl's ``RLHFDataset`` reads. ``reward_model.ground_truth`` is
  ``{"doc_ids": list<string>, "grades": list<int32>}``: the query's relevant documents (grade > 0),
  best grade first, aligned lists.
* ``manifest.json`` — counts, options, skipped rows by reason, SHA-256 of inputs and outputs.

Everything is written into a hidden temporary folder beside the output and renamed into place
at the end (:class:`AtomicFolder`), so a failed run leaves no partial files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..atomic import check_writable, remove_stale_siblings, temp_sibling
from ..prompts import format_document, query_reasoning_messages
from .collection import Collection

__all__ = [
    "PAIRS_SCHEMA",
    "RL_SCHEMA",
    "GROUND_TRUTH_TYPE",
    "AtomicFolder",
    "check_distinct",
    "write_pairs",
    "write_rl",
]

#: ``reward_model.ground_truth``: relevant document ids and their grades, best first.
GROUND_TRUTH_TYPE = pa.struct([("doc_ids", pa.list_(pa.string())), ("grades", pa.list_(pa.int32()))])

#: ``pairs.parquet``: texts are ``format_document(title, text)``; ``split`` is the query's split.
PAIRS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("pos_id", pa.string()),
        ("pos_text", pa.string()),
        ("grade", pa.int32()),
        ("neg_ids", pa.list_(pa.string())),
        ("neg_texts", pa.list_(pa.string())),
        ("split", pa.string()),
        ("source", pa.string()),
    ]
)

#: ``rl_*.parquet`` in verl's ``RLHFDataset`` layout.
RL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", GROUND_TRUTH_TYPE)])),
        (
            "extra_info",
            pa.struct([("index", pa.int64()), ("split", pa.string()), ("query_id", pa.string()), ("query", pa.string())]),
        ),
    ]
)


class AtomicFolder:
    """A folder written in full or not at all.

    Files go to a hidden temporary folder in the same parent (so the final rename is atomic on
    one file system, named by :func:`~verl_search_r3.atomic.temp_sibling`); :meth:`commit`
    renames it to ``path``. Leaving the ``with`` block without a commit — an exception, Ctrl-C,
    SIGTERM under :func:`~verl_search_r3.atomic.sigterm_as_interrupt` — deletes the temporary
    folder; temporary folders of ``path`` left by a killed run are removed on entry. An existing
    non-empty ``path`` is refused unless ``overwrite``, in which case it is replaced only at
    commit. An output that is, contains or lies inside one of ``inputs`` is always refused (the
    replace would delete the input, or the run would write into it).

    Args:
        path: the output folder.
        overwrite: replace a non-empty ``path`` at commit.
        inputs: files and folders the run reads (None entries are ignored).
    """

    def __init__(self, path: str, overwrite: bool = False, inputs: Sequence[str | None] = ()):
        self.path = os.path.abspath(path)
        check_distinct(path, inputs)
        if os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise FileExistsError(f"output {path!r} exists and is not a folder")
            if os.listdir(self.path) and not overwrite:
                raise FileExistsError(f"output folder {path!r} is not empty (use --overwrite to replace it)")
        check_writable(self.path, "output folder", folder=True)
        self.tmp: str | None = None

    def __enter__(self) -> AtomicFolder:
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            remove_stale_siblings(self.path)
            tmp = temp_sibling(self.path)
            os.mkdir(tmp)  # mode from the umask: the result is an ordinary folder
        except OSError as e:
            raise type(e)(e.errno, f"cannot write output folder {self.path!r}: {e.strerror or e}") from None
        self.tmp = tmp
        return self

    def file(self, name: str) -> str:
        """Path of ``name`` inside the temporary folder."""
        assert self.tmp is not None, "use AtomicFolder in a with block"
        return os.path.join(self.tmp, name)

    def commit(self) -> None:
        """Move the finished folder into place (replacing an old one, if allowed at construction)."""
        assert self.tmp is not None, "use AtomicFolder in a with block"
        old = None
        if os.path.isdir(self.path):
            if os.listdir(self.path):
                old = temp_sibling(self.path, "old")
                os.rename(self.path, old)
            else:
                os.rmdir(self.path)
        os.rename(self.tmp, self.path)
        self.tmp = None
        if old:
            shutil.rmtree(old)

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def check_distinct(output: str, inputs: Sequence[str | None]) -> None:
    """Raise ``ValueError`` if the output folder is, contains or lies inside one of ``inputs``.

    Paths are compared after resolving symbolic links, so a link to the input is the input.
    """
    out = os.path.realpath(output)
    for given in inputs:
        if given is None:
            continue
        src = os.path.realpath(given)
        if out == src:
            how = "is"
        elif src.startswith(out.rstrip(os.sep) + os.sep):
            how = "contains"
        elif out.startswith(src.rstrip(os.sep) + os.sep):
            how = "lies inside"
        else:
            continue
        raise ValueError(f"output folder {output!r} {how} the input {given!r}; choose an output outside every input "
                         "(--overwrite would delete or change the input)")


def _needed_texts(corpus_path: str, needed: set[str], batch_rows: int, progress: bool) -> pa.Table:
    """``(doc_id, text)`` of the ``needed`` documents, as one Arrow table (texts formatted once)."""
    value_set = pa.array(sorted(needed), pa.string())
    parts = []
    pf = pq.ParquetFile(corpus_path)
    with tqdm(total=pf.metadata.num_rows, unit="doc", desc="pair texts", disable=not progress, leave=False) as bar:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["doc_id", "title", "text"]):
            sub = batch.filter(pc.is_in(batch.column("doc_id"), value_set=value_set))
            texts = [format_document(t, x) for t, x in zip(sub.column("title").to_pylist(), sub.column("text").to_pylist())]
            parts.append(pa.table({"doc_id": sub.column("doc_id"), "text": pa.array(texts, pa.string())}))
            bar.update(batch.num_rows)
    return pa.concat_tables(parts) if parts else pa.table({"doc_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})


def _pair_rows(collection: Collection, negatives: dict[tuple[str, str], list[str]]) -> Iterator[tuple[str, str, int, list[str]]]:
    """``(query id, positive id, grade, negative ids)`` per pair, queries in input order."""
    for qid, docs in collection.qrels.items():
        for pos, grade in docs.items():
            yield qid, pos, grade, negatives.get((qid, pos), [])


def write_pairs(
    path: str,
    collection: Collection,
    split_of: dict[str, str],
    negatives: dict[tuple[str, str], list[str]],
    source: str,
    batch_rows: int = 50_000,
    progress: bool = False,
) -> int:
    """Write ``pairs.parquet``; returns the number of rows.

    Only the texts of positives and chosen negatives are gathered (one pass over the corpus
    parquet, kept as Arrow), then rows are written ``batch_rows`` at a time.
    """
    needed = set()
    for _, pos, _, negs in _pair_rows(collection, negatives):
        needed.add(pos)
        needed.update(negs)
    docs = _needed_texts(collection.corpus_path, needed, batch_rows, progress)
    doc_ids, doc_texts = docs.column("doc_id"), docs.column("text")
    del needed

    def texts_of(ids: list[str]) -> pa.Array:
        return doc_texts.take(pc.index_in(pa.array(ids, pa.string()), value_set=doc_ids)).combine_chunks()

    rows = 0
    with pq.ParquetWriter(path, PAIRS_SCHEMA) as writer:
        batch: list[tuple[str, str, int, list[str]]] = []
        pairs = _pair_rows(collection, negatives)
        total = collection.num_judgements
        for item in tqdm(pairs, total=total, unit="pair", desc="write pairs", disable=not progress, leave=False):
            batch.append(item)
            if len(batch) == batch_rows:
                rows += _write_pair_batch(writer, batch, collection, split_of, source, texts_of)
                batch = []
        rows += _write_pair_batch(writer, batch, collection, split_of, source, texts_of)
    return rows


def _write_pair_batch(
    writer: pq.ParquetWriter,
    batch: list[tuple[str, str, int, list[str]]],
    collection: Collection,
    split_of: dict[str, str],
    source: str,
    texts_of: Callable[[list[str]], pa.Array],
) -> int:
    """Write one batch of pair rows (possibly empty, so the schema is always there)."""
    qids = [b[0] for b in batch]
    negs = [b[3] for b in batch]
    offsets = pa.array([0, *accumulate(len(n) for n in negs)], pa.int32())
    flat = [d for n in negs for d in n]
    table = pa.table(
        {
            "query_id": pa.array(qids, pa.string()),
            "query": pa.array([collection.queries[q] for q in qids], pa.string()),
            "pos_id": pa.array([b[1] for b in batch], pa.string()),
            "pos_text": texts_of([b[1] for b in batch]),
            "grade": pa.array([b[2] for b in batch], pa.int32()),
            "neg_ids": pa.ListArray.from_arrays(offsets, pa.array(flat, pa.string())),
            "neg_texts": pa.ListArray.from_arrays(offsets, texts_of(flat)),
            "split": pa.array([split_of[q] for q in qids], pa.string()),
            "source": pa.array([source] * len(batch), pa.string()),
        },
        schema=PAIRS_SCHEMA,
    )
    writer.write_table(table)
    return len(batch)


def write_rl(
    paths: dict[str, str], collection: Collection, split_of: dict[str, str], data_source: str, ability: str
) -> dict[str, int]:
    """Write one RL parquet per split (``paths[split]``); returns rows per split.

    ``extra_info.index`` is unique over all splits (train rows first, in query input order).
    """
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in paths}
    index = 0
    for split in paths:
        for qid, query in collection.queries.items():
            if split_of[qid] != split:
                continue
            docs = collection.qrels[qid]
            rows[split].append(
                {
                    "data_source": data_source,
                    "prompt": query_reasoning_messages(query),
                    "ability": ability,
                    "reward_model": {"style": "rule", "ground_truth": {"doc_ids": list(docs), "grades": list(docs.values())}},
                    "extra_info": {"index": index, "split": split, "query_id": qid, "query": query},
                }
            )
            index += 1
    for split, path in paths.items():
        pq.write_table(pa.Table.from_pylist(rows[split], schema=RL_SCHEMA), path)
    return {s: len(r) for s, r in rows.items()}
