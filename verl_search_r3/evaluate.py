"""Evaluate retrievers on a BEIR folder: nDCG@10, Recall@100, MRR@10 with pytrec_eval.

    python -m verl_search_r3.evaluate --data BEIR_DIR [--split test] [--model PATH]
        [--reasoning on|off|both] [--baseline bm25] [--baseline st:MODEL_DIR] [--output results.json]

Every system ranks the whole corpus (documents as ``title + " " + text``) for every judged query
(at least one positive grade); one row per system goes into a markdown table (printed), a JSON
file and a bar plot. Metrics are computed by ``pytrec_eval`` (trec_eval): ``ndcg_cut`` with the
graded judgements, ``recall``, and ``recip_rank`` on each query's top ``mrr_k`` documents (trec_eval
order: score, then document id, descending), i.e. MRR@k.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pytrec_eval

from .atomic import atomic_write, check_writable, exit_status, sigterm_as_interrupt, write_json
from .data.beir import BeirData, load_beir
from .prompts import format_document
from .retrieval.bm25 import BM25Retriever
from .retrieval.dense import (
    DenseRetriever,
    Retriever,
    SearchR3Queries,
    VectorCache,
    search_r3_index,
    sentence_transformer_retriever,
)
from .retrieval.encoder import SearchR3Encoder

__all__ = [
    "SystemResult",
    "corpus_texts",
    "metric_names",
    "score_run",
    "evaluate_retriever",
    "markdown_table",
    "plot_results",
    "main",
    "cli",
]


@dataclass
class SystemResult:
    """One evaluated system: mean metrics over ``n_queries`` and what else is worth reporting."""

    name: str
    metrics: dict[str, float]
    n_queries: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def corpus_texts(data: BeirData) -> tuple[list[str], list[str]]:
    """Document ids and texts (``title + " " + text``) in file order."""
    ids = list(data.corpus)
    return ids, [format_document(*data.corpus[i]) for i in ids]


def metric_names(ndcg_k: int = 10, recall_k: int = 100, mrr_k: int = 10) -> list[str]:
    """Column names of :func:`score_run`'s metrics."""
    return [f"nDCG@{ndcg_k}", f"Recall@{recall_k}", f"MRR@{mrr_k}"]


def score_run(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    ndcg_k: int = 10,
    recall_k: int = 100,
    mrr_k: int = 10,
) -> dict[str, float]:
    """Mean nDCG@``ndcg_k``, Recall@``recall_k`` and MRR@``mrr_k`` over the queries of ``run``.

    Every query of ``run`` must be judged in ``qrels`` (trec_eval silently skips the others).
    """
    missing = [q for q in run if q not in qrels]
    if missing:
        raise ValueError(f"{len(missing)} run queries have no judgements, e.g. {missing[0]!r}")
    judged = {q: qrels[q] for q in run}
    main_scores = pytrec_eval.RelevanceEvaluator(judged, {f"ndcg_cut.{ndcg_k}", f"recall.{recall_k}"}).evaluate(run)
    top = {q: dict(sorted(docs.items(), key=lambda d: (d[1], d[0]), reverse=True)[:mrr_k]) for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top)
    names = metric_names(ndcg_k, recall_k, mrr_k)
    return {
        names[0]: float(np.mean([r[f"ndcg_cut_{ndcg_k}"] for r in main_scores.values()])),
        names[1]: float(np.mean([r[f"recall_{recall_k}"] for r in main_scores.values()])),
        names[2]: float(np.mean([r["recip_rank"] for r in rr.values()])),
    }


def evaluate_retriever(
    name: str,
    retriever: Retriever,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    ndcg_k: int = 10,
    recall_k: int = 100,
    mrr_k: int = 10,
) -> SystemResult:
    """Search all ``queries`` (depth = the largest cutoff) and score the run."""
    qids = list(queries)
    start = time.perf_counter()
    hits, scores = retriever.search([queries[q] for q in qids], k=max(ndcg_k, recall_k, mrr_k))
    seconds = time.perf_counter() - start
    run = {q: {d: float(s) for d, s in zip(h, sc)} for q, h, sc in zip(qids, hits, scores)}
    return SystemResult(name, score_run(qrels, run, ndcg_k, recall_k, mrr_k), len(qids), seconds)


def markdown_table(results: Sequence[SystemResult]) -> str:
    """One row per system: metrics (3 decimals), queries, seconds indexing the corpus and searching
    (query encoding included), generations without the embed token (``forced``) and the share
    that wrote it unforced (``emission``)."""
    metrics = list(results[0].metrics) if results else []
    head = ["system", *metrics, "queries", "index s", "search s", "forced", "emission"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        forced, emission = r.details.get("forced"), r.details.get("emission_rate")
        index_seconds = r.details.get("index_seconds")
        cells = [r.name, *(f"{r.metrics[m]:.3f}" for m in metrics), str(r.n_queries),
                 "" if index_seconds is None else f"{index_seconds:.1f}", f"{r.seconds:.1f}", "" if forced is None else str(forced),
                 "" if emission is None else f"{emission:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: Sequence[SystemResult], path: str, title: str = "") -> None:
    """Grouped bar chart (metrics on x, one bar per system) saved as PNG, atomically (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(results[0].metrics)
    fig = Figure(figsize=(2.0 + 1.6 * len(metrics), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    x = np.arange(len(metrics))
    for i, r in enumerate(results):
        bars = ax.bar(x + (i - (len(results) - 1) / 2) * width, [r.metrics[m] for m in metrics], width, label=r.name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=min(len(results), 3), fontsize=8)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")


# ---------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m verl_search_r3.evaluate",
        description="Evaluate Search-R3 models and baselines on a BEIR folder (nDCG@10, Recall@100, MRR@10 via pytrec_eval).",
    )
    p.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p.add_argument("--model", help="Search-R3 model folder (optional when only baselines are asked for)")
    p.add_argument("--gguf-file", help="GGUF file inside --model (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--reasoning", choices=["on", "off", "both"], default="both", help="query mode(s) of --model (default: both)")
    p.add_argument("--baseline", action="append", default=[], metavar="SPEC",
                   help="'bm25' or 'st:MODEL_DIR' (sentence-transformers folder; 'st:NAME=MODEL_DIR' sets the row name); repeatable")
    p.add_argument("--output", help="results JSON (written atomically)")
    p.add_argument("--plot", help="bar plot PNG (default: --output with .png, if --output is given)")
    p.add_argument("--analyses", help="JSONL of the generated query analyses (qid, query, analysis, forced)")
    p.add_argument("--cache-dir", help="cache document vectors here (keyed by model, corpus, prompt, max length)")
    p.add_argument("--max-queries", type=int, help="evaluate only the first N judged queries (quick runs)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per batch for every encoder (default: 16)")
    p.add_argument("--max-length", type=int, default=512, help="token budget of Search-R3 document/query prompts (default: 512)")
    p.add_argument("--st-max-length", type=int, help="override the sentence-transformers max_seq_length")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reasoning generation budget (default: 256)")
    p.add_argument("--on-missing", choices=["append", "zero"], default="append",
                   help="generations without <|embed_token|>: append it and embed there, or a zero vector (default: append)")
    p.add_argument("--backend", choices=["auto", "transformers", "vllm"], default="auto", help="reasoning generation backend")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="Search-R3 model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.model is None and not args.baseline:
        p.error("nothing to evaluate: give --model and/or at least one --baseline")
    for spec in args.baseline:
        if spec != "bm25" and not spec.startswith("st:"):
            p.error(f"unknown baseline {spec!r}; use 'bm25' or 'st:MODEL_DIR'")
    if args.max_queries is not None and args.max_queries < 1:
        p.error("--max-queries must be >= 1")
    return args


def _st_name_and_path(spec: str) -> tuple[str, str]:
    """``st:DIR`` -> (``st:<basename>``, DIR); ``st:NAME=DIR`` -> (``st:NAME``, DIR)."""
    body = spec[len("st:") :]
    name, sep, path = body.partition("=")
    if sep and os.sep not in name:
        return f"st:{name}", path
    return f"st:{os.path.basename(os.path.normpath(body))}", body


def _build_systems(
    args: argparse.Namespace, ids: list[str], texts: list[str]
) -> tuple[list[tuple[str, Retriever, float]], dict[str, SearchR3Queries]]:
    """The requested systems as ``(name, retriever, seconds spent indexing the corpus)``, and the
    query sides of the Search-R3 rows (they keep the generated analyses)."""
    progress = not args.no_progress
    cache = VectorCache(args.cache_dir) if args.cache_dir else None
    systems: list[tuple[str, Retriever, float]] = []
    for spec in args.baseline:
        start = time.perf_counter()
        if spec == "bm25":
            name, retriever = "BM25", BM25Retriever(ids, texts)
        else:
            name, path = _st_name_and_path(spec)
            retriever = sentence_transformer_retriever(path, ids, texts, cache, device=args.device, batch_size=args.batch_size,
                                                       max_length=args.st_max_length, show_progress=progress)
        systems.append((name, retriever, time.perf_counter() - start))
    r3_queries: dict[str, SearchR3Queries] = {}
    if args.model is not None:
        encoder = SearchR3Encoder.from_pretrained(args.model, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype,
                                                  backend=args.backend, show_progress=progress)
        start = time.perf_counter()
        index = search_r3_index(encoder, ids, texts, batch_size=args.batch_size, max_length=args.max_length, cache=cache)
        seconds = time.perf_counter() - start
        label = os.path.basename(os.path.normpath(args.model)) if args.gguf_file is None else args.gguf_file
        for reasoning in {"on": [True], "off": [False], "both": [False, True]}[args.reasoning]:
            name = f"search-r3:{label} ({'reasoning' if reasoning else 'direct'})"
            r3_queries[name] = SearchR3Queries(encoder, reasoning, args.max_new_tokens, args.batch_size, args.max_length, args.on_missing)
            systems.append((name, DenseRetriever(index, r3_queries[name]), seconds))
    return systems, r3_queries


def main(argv: Sequence[str] | None = None) -> list[SystemResult]:
    """Run the command line; returns the results (also printed and written).

    Output paths are checked before anything is evaluated; errors are raised (see :func:`cli`
    for the exit-status contract).
    """
    args = _parse_args(argv)
    for what, path in (("--output", args.output), ("--plot", args.plot), ("--analyses", args.analyses)):
        if path:
            check_writable(path, what)
    if args.output and not args.plot:
        check_writable(os.path.splitext(args.output)[0] + ".png", "plot")
    data = load_beir(args.data, args.split)
    queries = data.judged_queries()
    if args.max_queries is not None:
        queries = dict(list(queries.items())[: args.max_queries])
    ids, texts = corpus_texts(data)

    systems, r3_queries = _build_systems(args, ids, texts)
    results = []
    for name, retriever, index_seconds in systems:
        result = evaluate_retriever(name, retriever, queries, data.qrels)
        result.details["index_seconds"] = round(index_seconds, 2)
        encoding = r3_queries[name].last if name in r3_queries else None
        if encoding is not None and encoding.forced is not None:
            result.details["forced"] = encoding.n_forced
            result.details["emission_rate"] = encoding.emission_rate
        results.append(result)

    print(markdown_table(results))
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "plot", "analyses", "no_progress")}
    if args.output:
        write_json(args.output, {"data": data.name, "split": args.split, "n_queries": len(queries), "settings": settings,
                                 "systems": [asdict(r) for r in results]})
    plot = args.plot or (os.path.splitext(args.output)[0] + ".png" if args.output else None)
    if plot:
        plot_results(results, plot, title=f"{data.name} ({args.split}, {len(queries)} queries)")
    if args.analyses:
        rows = [
            {"system": name, "qid": qid, "query": queries[qid], "analysis": analysis, "forced": bool(forced)}
            for name, q in r3_queries.items() if q.last is not None and q.last.analyses is not None
            for qid, analysis, forced in zip(queries, q.last.analyses, q.last.forced)
        ]
        atomic_write(args.analyses, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    """:func:`main` with the command-line contract: exit 0 done, 1 bad data, paths or model (a
    message, no traceback), 2 bad options, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""
    try:
        with sigterm_as_interrupt():
            main(argv)
    except (OSError, ValueError) as e:  # DataFormatError and SnapshotError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("interrupted; no result file was written", file=sys.stderr)
        return exit_status(e)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
