#!/usr/bin/env python
"""Build Stage-1 pairs, RL parquets and a corpus from a dataset you already have (no downloads).

    python data_prep/build_pairs.py --format beir --input ../shared/data/cranfield --output out/cranfield \
        --negatives bm25 --num-negatives 7

The work is done by :func:`verl_search_r3.data.build.build_pairs`; this script only maps flags to
:class:`~verl_search_r3.data.build.BuildOptions` and prints the summary. Exit status: 0 done,
1 bad input data or paths (message names file, line and field), 2 bad options, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM); an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from verl_search_r3.atomic import exit_status, sigterm_as_interrupt  # noqa: E402
from verl_search_r3.data.build import FORMATS, GROUND_TRUTH_DOC, BuildOptions, BuildReport, build_pairs  # noqa: E402
from verl_search_r3.data.generic import FieldNames  # noqa: E402
from verl_search_r3.data.issues import SKIP_REASONS  # noqa: E402
from verl_search_r3.data.negatives import NegativeOptions  # noqa: E402

EPILOG = f"""\
outputs (in --output, written atomically):
  corpus.parquet     doc_id, title, text
  pairs.parquet      query_id, query, pos_id, pos_text, grade, neg_ids, neg_texts, split, source
  rl_train.parquet   verl RLHFDataset rows: data_source, prompt, ability, reward_model, extra_info
  rl_val.parquet     the same for the validation queries
  manifest.json      counts, options, skipped rows by reason, SHA-256 of inputs and outputs
  {GROUND_TRUTH_DOC}

skipped rows (a warning each, counted in the summary; errors with --strict):
""" + "\n".join(f"  {k:17s}  {v}" for k, v in SKIP_REASONS.items())


def parser() -> argparse.ArgumentParser:
    """The command line (every option documented in ``--help``)."""
    fields, negs, opts = FieldNames(), NegativeOptions(), BuildOptions.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="build_pairs.py",
        description="Convert a retrieval dataset into Stage-1 (query, positive, hard negatives) pairs, "
        "verl RL parquets and a corpus parquet.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--format", required=True, choices=FORMATS,
                    help="beir: folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv; "
                    "msmarco: folder with collection.tsv, queries.<split>.tsv, qrels.<split>.tsv; "
                    "jsonl / parquet: a file of generic rows (see the field options); "
                    "hf-disk: a folder written by datasets' save_to_disk")
    io.add_argument("--input", required=True, metavar="PATH", help="the dataset folder or file")
    io.add_argument("--output", required=True, metavar="DIR",
                    help="output folder; created, and must be empty unless --overwrite")
    io.add_argument("--split", default=None,
                    help="qrels/queries split (default: test for beir, train for msmarco) or the split of "
                    "a saved DatasetDict (hf-disk); not used for jsonl/parquet files")
    io.add_argument("--name", default=None,
                    help="dataset name; rows get data_source=search_r3/<name> (default: input base name)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty output folder (only after the new one is complete; an output that is, "
                    "contains or lies inside an input is always refused)")
    io.add_argument("--triples", default=None, metavar="FILE",
                    help="msmarco only: TSV of qid, positive pid, negative pid; its negatives are used first")

    gen = p.add_argument_group("generic rows (jsonl, parquet, hf-disk)")
    gen.add_argument("--query-field", default=fields.query, help="query text field (default: %(default)s)")
    gen.add_argument("--query-id-field", default=fields.query_id,
                     help="query id field (default: none, ids come from a hash of the query text, so rows "
                     "repeating a query merge)")
    gen.add_argument("--positive-field", default=fields.positive,
                     help="relevant passage(s): a string, an object, or a list of either (default: %(default)s)")
    gen.add_argument("--negative-field", default=fields.negative,
                     help="hard negative passage(s), optional per row; '' ignores negatives (default: %(default)s)")
    gen.add_argument("--doc-id-field", default=fields.doc_id,
                     help="passage id inside passage objects, or row id with --title-as-query; passages "
                     "without one get an id from a hash of their text (default: %(default)s)")
    gen.add_argument("--title-field", default=fields.title, help="passage title field, optional (default: %(default)s)")
    gen.add_argument("--text-field", default=fields.text, help="passage text field (default: %(default)s)")
    gen.add_argument("--title-as-query", action="store_true",
                     help="weak supervision: every titled document becomes a query (its title) whose "
                     "positive is the document's text without the title (beir corpus.jsonl, or generic "
                     "rows with --doc-id-field/--title-field/--text-field)")

    neg = p.add_argument_group("hard negatives")
    neg.add_argument("--negatives", default=negs.method, metavar="none|bm25|dense:PATH",
                     help="mine negatives with BM25 (bm25s, English stemming and stop words) or a "
                     "sentence-transformers model folder; 'none' uses only negatives the input names "
                     "(default: %(default)s)")
    neg.add_argument("--num-negatives", type=int, default=negs.num_negatives, metavar="N",
                     help="negatives per (query, positive) pair, at most (default: %(default)s)")
    neg.add_argument("--negative-min-rank", type=int, default=negs.min_rank, metavar="R",
                     help="shallowest retriever rank a negative may come from, 1-based (default: %(default)s)")
    neg.add_argument("--negative-max-rank", type=int, default=negs.max_rank, metavar="R",
                     help="deepest retriever rank searched, inclusive (default: %(default)s)")
    neg.add_argument("--negative-sampling", choices=("top", "random"), default=negs.sampling,
                     help="take the highest-ranked candidates or a seeded random subset (default: %(default)s)")
    neg.add_argument("--false-negative-margin", type=float, default=negs.false_negative_margin, metavar="F",
                     help="drop candidates scoring above (1-F) x the positive's score, e.g. 0.05 "
                     "(default: off); relevant documents are always excluded")
    neg.add_argument("--search-batch-size", type=int, default=negs.search_batch_size,
                     help="queries per retrieval call (default: %(default)s)")
    neg.add_argument("--dense-batch-size", type=int, default=negs.dense_batch_size,
                     help="texts per encoder batch (default: %(default)s)")
    neg.add_argument("--dense-corpus-chunk", type=int, default=negs.dense_corpus_chunk,
                     help="documents encoded and searched at a time; bounds memory (default: %(default)s)")
    neg.add_argument("--dense-device", default=negs.dense_device,
                     help="torch device of the encoder (default: cuda if available, else cpu)")
    neg.add_argument("--dense-query-prefix", default=negs.dense_query_prefix,
                     help="text put before each query, e.g. 'query: ' for E5 (default: none)")
    neg.add_argument("--dense-document-prefix", default=negs.dense_document_prefix,
                     help="text put before each document, e.g. 'passage: ' for E5 (default: none)")

    run = p.add_argument_group("split and run")
    run.add_argument("--val-fraction", type=float, default=opts["val_fraction"].default, metavar="F",
                     help="share of queries for rl_val.parquet and split=val pairs (default: %(default)s)")
    run.add_argument("--seed", type=int, default=opts["seed"].default,
                     help="seed of the query split and random negative sampling (default: %(default)s)")
    run.add_argument("--ability", default=opts["ability"].default, help="ability column of the RL rows (default: %(default)s)")
    run.add_argument("--strict", action="store_true", help="make every skipped row an error (exit 1)")
    run.add_argument("--batch-rows", type=int, default=opts["batch_rows"].default,
                     help="rows per streamed parquet batch; bounds memory (default: %(default)s)")
    run.add_argument("--max-warnings", type=int, default=opts["max_warnings"].default,
                     help="skip warnings shown per reason; all are counted (default: %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def options(args: argparse.Namespace) -> BuildOptions:
    """Map parsed flags to :class:`BuildOptions` (raises ``ValueError`` on inconsistent values)."""
    return BuildOptions(
        format=args.format,
        input=args.input,
        output=args.output,
        split=args.split,
        name=args.name,
        title_as_query=args.title_as_query,
        fields=FieldNames(
            query=args.query_field,
            query_id=args.query_id_field or None,
            positive=args.positive_field,
            negative=args.negative_field or None,
            doc_id=args.doc_id_field,
            title=args.title_field,
            text=args.text_field,
        ),
        triples=args.triples,
        negatives=NegativeOptions(
            method=args.negatives,
            num_negatives=args.num_negatives,
            min_rank=args.negative_min_rank,
            max_rank=args.negative_max_rank,
            sampling=args.negative_sampling,
            false_negative_margin=args.false_negative_margin,
            search_batch_size=args.search_batch_size,
            dense_batch_size=args.dense_batch_size,
            dense_corpus_chunk=args.dense_corpus_chunk,
            dense_device=args.dense_device,
            dense_query_prefix=args.dense_query_prefix,
            dense_document_prefix=args.dense_document_prefix,
        ),
        val_fraction=args.val_fraction,
        seed=args.seed,
        ability=args.ability,
        strict=args.strict,
        overwrite=args.overwrite,
        batch_rows=args.batch_rows,
        max_warnings=args.max_warnings,
        progress=not args.no_progress,
    )


def summary(report: BuildReport) -> str:
    """The closing lines: counts, skipped rows by reason, time and peak memory."""
    m = report.manifest
    lines = [f"wrote {report.output} ({m['data_source']})"]
    lines += [f"  {k:28s} {v:>12,}" for k, v in m["counts"].items()]
    skipped = m["skipped"]
    lines.append(f"  {'skipped rows':28s} {sum(skipped.values()):>12,}")
    lines += [f"    {k:26s} {v:>12,}" for k, v in skipped.items()]
    lines.append(f"  {'time':28s} {report.seconds:>11.1f}s")
    lines.append(f"  {'peak memory (RSS)':28s} {report.peak_rss_mb:>10,.0f}MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        opts = options(args)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    for handler in logging.getLogger().handlers:  # bm25s sets its own logger to DEBUG; show warnings only
        handler.setLevel(logging.WARNING)
    try:
        with sigterm_as_interrupt():
            report = build_pairs(opts)
    except (ValueError, OSError) as e:  # DataFormatError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the temporary output is already removed
        print("interrupted; nothing was written", file=sys.stderr)
        return exit_status(e)
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
