"""Build a Search-R1 search index folder from a passage collection (nothing is downloaded).

    python -m verl_search_r3.search_r1.build_index --format search-r1 --input wiki-18.jsonl \\
        --output indexes/wiki18-e5 --retriever sentence_transformers --model models/e5-base-v2 \\
        --query-prefix "query: " --document-prefix "passage: " --dtype float16 --num-shards 8

Inputs: Search-R1 passage files (JSON lines ``{"id", "contents"}``, the title on the first line
of ``contents``), BEIR folders (``corpus.jsonl``: ``_id, title, text``) and ``corpus.parquet``
files (``doc_id, title, text``, e.g. from ``data_prep/build_pairs.py``). Bad rows follow the
project's rules (skipped with a warning naming file, line and field; ``--strict`` makes them
errors). The output folder (:mod:`.index_layout`) is written atomically.

Shards are built one after the other, each from one pass over the written ``corpus.parquet``
keeping its own documents (a stable hash of the id), so memory holds one shard at a time and
every document is encoded once. Documents are embedded from ``format_document(title, text)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..data.beir import BeirPaths, iter_beir_corpus
from ..data.collection import CorpusWriter
from ..atomic import exit_status, sigterm_as_interrupt
from ..data.issues import SKIP_REASONS, DataFormatError, IssueLog
from ..data.outputs import AtomicFolder
from ..data.readers import iter_jsonl, iter_table, require_file, sha256_path, text_field
from ..env import CorpusIndex, EnvConfig
from ..env.actor import _shard_dir, shard_of  # the shard layout of CorpusIndexClient.snapshot
from ..env.config import DTYPES, INDEX_TYPES
from ..env.snapshot import write_snapshot_files
from ..prompts import format_document
from .index_layout import BM25_DIR, CORPUS_FILE, INDEX_MANIFEST, KINDS, SNAPSHOT_DIR, IndexManifest
from .models import DenseModel, DenseModelOptions, load_dense_model
from .observation import join_contents, split_contents

__all__ = ["BuildIndexOptions", "build_index", "iter_passages", "FORMATS", "main"]

FORMATS: tuple[str, ...] = ("search-r1", "beir", "parquet")
Format = Literal["search-r1", "beir", "parquet"]


@dataclass
class BuildIndexOptions:
    """Everything :func:`build_index` needs (the CLI flags one to one).

    Attributes:
        input: a Search-R1 JSON-lines file, a BEIR folder or a ``corpus.parquet``.
        output: the index folder (created; must be empty unless ``overwrite``).
        format: ``search-r1``, ``beir`` or ``parquet``.
        retriever: ``bm25``, ``sentence_transformers`` or ``search_r3``.
        model: the encoder folder (dense retrievers).
        id_field, contents_field: field names of Search-R1 passage files.
        num_shards: corpus-index shards (one Ray actor each at search time).
        dtype: vector storage, ``float32``, ``float16`` or ``bfloat16`` (see :class:`~verl_search_r3.env.EnvConfig`).
        index_type: ``flat`` (exact), ``ivf`` or ``hnsw``.
        batch_size: documents per encoder forward.
        max_length: document token budget of the encoder (None = the model's).
        device: encoder device (None = CUDA if available, else CPU).
        model_dtype: Search-R3 model dtype (None = bfloat16 on CUDA, float32 on CPU).
        query_prefix, document_prefix: sentence-transformers prefixes (E5: ``"query: "``, ``"passage: "``).
        strict: make every skipped row an error.
        overwrite: replace a non-empty output folder (only once the new one is complete).
        batch_rows: rows per parquet batch (bounds memory).
        max_warnings: skip warnings shown per reason (all are counted).
        progress: progress bars.
    """

    input: str
    output: str
    format: Format = "search-r1"
    retriever: str = "bm25"
    model: str | None = None
    id_field: str = "id"
    contents_field: str = "contents"
    num_shards: int = 1
    dtype: str = "float32"
    index_type: str = "flat"
    batch_size: int = 64
    max_length: int | None = 512
    device: str | None = None
    model_dtype: str | None = None
    query_prefix: str = ""
    document_prefix: str = ""
    strict: bool = False
    overwrite: bool = False
    batch_rows: int = 50_000
    max_warnings: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; use one of {', '.join(FORMATS)}")
        if self.retriever not in KINDS:
            raise ValueError(f"unknown retriever {self.retriever!r}; use one of {', '.join(KINDS)}")
        if self.retriever == "bm25" and self.model is not None:
            raise ValueError("--model applies to dense retrievers only")
        if self.retriever != "bm25" and not self.model:
            raise ValueError(f"--retriever {self.retriever} needs --model (a model folder)")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"--index-type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        for name in ("num_shards", "batch_size", "batch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def iter_passages(opts: BuildIndexOptions, issues: IssueLog) -> Iterator[tuple[str, str, str, str]]:
    """``(place, doc_id, title, text)`` of every well-formed input row."""
    if opts.format == "beir":
        yield from iter_beir_corpus(BeirPaths.of(opts.input, need_qrels=False).corpus, issues, opts.progress)
        return
    if opts.format == "parquet":
        for place, rec in iter_table(opts.input, "parquet", None, opts.batch_rows, opts.progress):
            doc_id = text_field(rec, "doc_id", place, issues, is_id=True)
            text = text_field(rec, "text", place, issues) if doc_id is not None else None
            title = text_field(rec, "title", place, issues, required=False) if text is not None else None
            if title is not None:
                yield place, doc_id, title, text
        return
    for place, rec in iter_jsonl(require_file(opts.input, "Search-R1 passages"), issues, opts.progress):
        doc_id = text_field(rec, opts.id_field, place, issues, is_id=True)
        contents = text_field(rec, opts.contents_field, place, issues) if doc_id is not None else None
        if contents is not None:
            yield (place, doc_id, *split_contents(contents))


def _env_config(opts: BuildIndexOptions) -> EnvConfig:
    # no neighbour graph: the search tool never refreshes selectively
    return EnvConfig(dtype=opts.dtype, index_type=opts.index_type, graph_k=0, num_shards=opts.num_shards, progress=False)


def _corpus_batches(path: str, batch_rows: int) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["doc_id", "title", "text"]):
        cols = batch.to_pydict()
        yield cols["doc_id"], cols["title"], cols["text"]


def _build_shards(opts: BuildIndexOptions, corpus: str, folder: str, env: EnvConfig, model: DenseModel | None, total: int) -> None:
    os.makedirs(folder)
    n = opts.num_shards
    with tqdm(total=total, unit="doc", desc="index", disable=not opts.progress) as bar:
        for shard in range(n):
            index = CorpusIndex(env)
            for ids, titles, texts in _corpus_batches(corpus, opts.batch_rows):
                keep = np.flatnonzero(shard_of(ids, n) == shard)
                if not len(keep):
                    continue
                ids_s = [ids[i] for i in keep]
                index.add_texts(ids_s, [join_contents(titles[i], texts[i]) for i in keep])
                if model is not None:
                    for start in range(0, len(keep), opts.batch_size):
                        part = keep[start : start + opts.batch_size]
                        vecs = model.encode_documents([format_document(titles[i], texts[i]) for i in part])
                        index.upsert([ids[i] for i in part], vecs, version=0, update_graph=False)
                        bar.update(len(part))
                else:
                    bar.update(len(keep))
            index.save(os.path.join(folder, _shard_dir(shard, n)), meta={"shard": shard, "num_shards": n})
    write_snapshot_files(folder, {}, {"num_shards": n, "shards": [_shard_dir(i, n) for i in range(n)]})


def build_index(opts: BuildIndexOptions) -> IndexManifest:
    """Read the passages, write ``corpus.parquet``, the corpus-index snapshot (texts, vectors for
    dense retrievers), the BM25 index (``bm25``) and the manifest, atomically; returns the manifest.

    Raises :class:`~verl_search_r3.data.issues.DataFormatError` for bad input (the first skipped
    row when ``strict``, or no document at all), ``OSError`` / ``ValueError`` for bad paths (an
    output that is, contains or lies inside the input or the model); nothing is left in the
    output folder then.
    """
    start = time.perf_counter()
    issues = IssueLog(strict=opts.strict, max_warnings=opts.max_warnings)
    id_field = "_id" if opts.format == "beir" else "doc_id" if opts.format == "parquet" else opts.id_field
    text_field_name = "text" if opts.format != "search-r1" else opts.contents_field
    if opts.retriever != "bm25" and not os.path.isdir(opts.model):
        raise FileNotFoundError(f"model folder {opts.model!r} does not exist")
    # refuses a non-empty output, and one that is, contains or lies inside the input or the model, first
    with AtomicFolder(opts.output, overwrite=opts.overwrite, inputs=[opts.input, opts.model]) as out:
        model = None
        if opts.retriever != "bm25":
            options = DenseModelOptions(device=opts.device, dtype=opts.model_dtype, batch_size=opts.batch_size, max_length=opts.max_length,
                                        query_prefix=opts.query_prefix, document_prefix=opts.document_prefix)
            model = load_dense_model(opts.retriever, opts.model, options)
        corpus = out.file(CORPUS_FILE)
        writer = CorpusWriter(corpus, issues, id_field=id_field, text_field=text_field_name, batch_rows=opts.batch_rows)
        for place, doc_id, title, text in iter_passages(opts, issues):
            writer.add(doc_id, title, text, place)
        num_docs = writer.close()
        if num_docs == 0:
            raise DataFormatError(f"{opts.input}: no document could be read")
        env = _env_config(opts)
        _build_shards(opts, corpus, out.file(SNAPSHOT_DIR), env, model, num_docs)
        if model is None:
            from ..retrieval.bm25 import BM25Retriever

            ids, texts = [], []
            for batch_ids, titles, bodies in _corpus_batches(corpus, opts.batch_rows):
                ids += batch_ids
                texts += [format_document(t, x) for t, x in zip(titles, bodies)]
            BM25Retriever(ids, texts, show_progress=opts.progress).save(out.file(BM25_DIR))
        manifest = IndexManifest(
            index_id=uuid.uuid4().hex,
            kind=opts.retriever,
            num_docs=num_docs,
            num_shards=opts.num_shards,
            env={k: v for k, v in env.to_dict().items() if k not in ("name", "namespace", "num_cpus", "detached", "progress")},
            model=os.path.abspath(opts.model) if opts.model else None,
            model_fingerprint=model.fingerprint if model is not None else None,
            query_prefix=opts.query_prefix,
            document_prefix=opts.document_prefix,
            max_length=opts.max_length,
            build={
                "created_by": f"verl-search-r3 {version('verl-search-r3')}",
                "options": asdict(opts),
                "input_sha256": sha256_path(opts.input),
                "skipped": issues.as_dict(),
                "seconds": round(time.perf_counter() - start, 1),
            },
        )
        manifest.save(out.tmp)
        out.commit()
    return manifest


def parser() -> argparse.ArgumentParser:
    """The command line (every option documented in ``--help``)."""
    d = BuildIndexOptions.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python -m verl_search_r3.search_r1.build_index",
        description="Build the search index of the Search-R1 tool and HTTP server from a passage collection.",
        epilog=f"output folder: {INDEX_MANIFEST}, {CORPUS_FILE}, {SNAPSHOT_DIR}/ (sharded corpus-index snapshot), "
        f"{BM25_DIR}/ (BM25 only)\n\nskipped rows (a warning each; errors with --strict):\n"
        + "\n".join(f"  {k:17s}  {v}" for k, v in SKIP_REASONS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, metavar="PATH", help="Search-R1 JSON-lines file, BEIR folder or corpus.parquet")
    p.add_argument("--output", required=True, metavar="DIR", help="index folder; created, and must be empty unless --overwrite")
    p.add_argument("--format", choices=FORMATS, default=d["format"].default,
                   help="search-r1: {id, contents} lines, title on the first line of contents; beir: folder with "
                   "corpus.jsonl (_id, title, text); parquet: doc_id, title, text (default: %(default)s)")
    p.add_argument("--retriever", choices=KINDS, default=d["retriever"].default, help="how documents are indexed (default: %(default)s)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="encoder folder: a sentence-transformers model (e.g. E5) or a Search-R3 checkpoint")
    p.add_argument("--id-field", default=d["id_field"].default, help="search-r1 format: id field (default: %(default)s)")
    p.add_argument("--contents-field", default=d["contents_field"].default, help="search-r1 format: contents field (default: %(default)s)")
    p.add_argument("--num-shards", type=int, default=d["num_shards"].default,
                   help="corpus-index shards, one Ray actor each when searching (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default=d["dtype"].default, help="vector storage (default: %(default)s)")
    p.add_argument("--index-type", choices=INDEX_TYPES, default=d["index_type"].default,
                   help="flat = exact inner product; ivf / hnsw approximate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="documents per forward (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=d["max_length"].default, help="document token budget (default: %(default)s)")
    p.add_argument("--device", default=None, help="encoder device (default: cuda if available, else cpu)")
    p.add_argument("--model-dtype", default=None, help="Search-R3 model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--query-prefix", default="", help="sentence-transformers query prefix, stored for search time (E5: 'query: ')")
    p.add_argument("--document-prefix", default="", help="sentence-transformers document prefix (E5: 'passage: ')")
    p.add_argument("--strict", action="store_true", help="make every skipped row an error (exit 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder (only after the new one is complete; an output that is, "
                   "contains or lies inside an input is always refused)")
    p.add_argument("--batch-rows", type=int, default=d["batch_rows"].default, help="rows per parquet batch (default: %(default)s)")
    p.add_argument("--max-warnings", type=int, default=d["max_warnings"].default, help="skip warnings shown per reason (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 bad data or paths, 2 bad options, 130 interrupted (Ctrl-C), 143
    terminated (SIGTERM); an interrupted run leaves nothing behind."""
    p = parser()
    args = p.parse_args(argv)
    try:
        opts = BuildIndexOptions(
            input=args.input, output=args.output, format=args.format, retriever=args.retriever, model=args.model,
            id_field=args.id_field, contents_field=args.contents_field, num_shards=args.num_shards, dtype=args.dtype,
            index_type=args.index_type, batch_size=args.batch_size, max_length=args.max_length, device=args.device,
            model_dtype=args.model_dtype, query_prefix=args.query_prefix, document_prefix=args.document_prefix,
            strict=args.strict, overwrite=args.overwrite, batch_rows=args.batch_rows, max_warnings=args.max_warnings,
            progress=not args.no_progress,
        )
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        with sigterm_as_interrupt():
            manifest = build_index(opts)
    except (OSError, ValueError) as e:  # DataFormatError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the temporary output is already removed
        print("interrupted; nothing was written", file=sys.stderr)
        return exit_status(e)
    skipped = manifest.build["skipped"]
    print(f"wrote {opts.output}: {manifest.kind} index of {manifest.num_docs:,} documents in {manifest.num_shards} shard(s), "
          f"{sum(skipped.values()):,} rows skipped {skipped or ''}, {manifest.build['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
