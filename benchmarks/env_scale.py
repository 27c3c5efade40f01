"""Benchmark the Search-R3 RL environment at real scale: seconds per step by phase, documents
encoded, memory, ANN recall and reward agreement with a full re-encode.

A synthetic clustered corpus (``--corpus-size`` documents, features in ``--feature-dim`` dims
lifted to ``--dim``-dim embeddings, see ``env_sim.py``) is encoded once at policy version 0;
the encoder then drifts ``--warmup-steps`` versions (the index is that stale when the run
starts, as late in training) and every step after drifts once more. Each step's
``--prompts x --rollouts`` query vectors are refreshed by ``RefreshPlanner`` on a
``CorpusIndex`` built as each ``--variant`` says, and their rewards (nDCG@k) are compared with
the reference: the whole corpus re-encoded by the current encoder and ranked exactly, streamed
in chunks. All variants replay the same seeded run (same queries, same drift). The first
variant also scores a no-refresh baseline (its index's candidates ranked with their stored,
stale vectors), which shows how much the refresh matters on this data.

Per variant it reports the environment's own seconds per step (``total - encode``: the search,
graph, write and scoring phases; the encode callback is the policy's work) with their median and
spread over the steps, documents encoded per step, the index's array bytes and the process's
peak RSS, the ANN structure's build seconds and recall@10 against exact search on the same
stored vectors (at the first step and, after the refreshes' updates, at the last), and the
reward agreement with the reference. ``--search-only`` measures search latency instead
(Search-R1: a frozen index, batches of ``--search-batch`` queries, p50/p99). The run ends with
an extrapolation to ``--plan-corpus`` documents: shards and memory per shard for each variant.

Variants: ``<index_type>[+graph][:key=value,...]`` with index_type flat|ivf|hnsw; ``+graph``
turns the neighbour-graph expansion on (``--graph-k``, ``--expand-top``); ``key=value`` sets any
other ``EnvConfig`` field, e.g. ``ivf:candidates_k=80,budget_per_query=none``.

Prints ONE JSON object on stdout; progress per step and a markdown table go to stderr. The
timings depend on the machine's load (report it: ``machine.loadavg_*``). Never downloads anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other jobs a
# spinning FAISS thread waits for a descheduled partner (2 threads ran 2-3x slower than 1 here)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from env_sim import (  # noqa: E402
    Simulation,
    _score_ranking,
    add_data_args,
    add_policy_args,
    corpus_rewards,
    peak_rss_bytes,
    peak_rss_reset,
    pool_rewards,
    set_threads,
    synthetic_task,
)

from verl_search_r3.env import CorpusIndex, EnvConfig, RefreshPlanner, full_encode  # noqa: E402

GIB = 1024**3
PHASES = ("search", "graph", "write", "score")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, corpus_size=1_000_000, dim=1536, topics=None)
    p.set_defaults(feature_dim=128)
    add_policy_args(p, steps=3, prompts=64, rollouts=5, adapter_hidden=128)
    g = p.add_argument_group("environment")
    g.add_argument("--variant", action="append", default=None,
                   help="an environment to measure, repeatable: <flat|ivf|hnsw>[+graph][:key=value,...] "
                        "(default: flat, ivf, ivf+graph, hnsw)")
    g.add_argument("--warmup-steps", type=int, default=8,
                   help="policy versions the encoder drifts after the initial encode, before step 1 (default: %(default)s)")
    g.add_argument("--candidates-k", type=int, default=EnvConfig.candidates_k, help="top-K candidates per query (default: %(default)s)")
    g.add_argument("--graph-k", type=int, default=8, help="neighbours per document for +graph variants (default: %(default)s)")
    g.add_argument("--expand-top", type=int, default=5, help="best candidates expanded by +graph variants (default: %(default)s)")
    g.add_argument("--graph-refresh-age", type=int, default=EnvConfig.graph_refresh_age,
                   help="versions after which a graph row is recomputed (default: %(default)s)")
    g.add_argument("--budget-per-query", type=lambda v: None if v.lower() == "none" else int(v),
                   default=EnvConfig.budget_per_query, help="encode cap per query vector; 'none' = no cap (default: %(default)s)")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16", help="vector storage (default: %(default)s)")
    g.add_argument("--ivf-nlist", type=int, default=EnvConfig.ivf_nlist, help="IVF lists (default: %(default)s)")
    g.add_argument("--ivf-nprobe", type=int, default=EnvConfig.ivf_nprobe, help="IVF lists probed (default: %(default)s)")
    g.add_argument("--ann-codes", choices=("sq8", "fp16", "flat"), default=EnvConfig.ann_codes,
                   help="vector codes of the IVF/HNSW structure (default: %(default)s)")
    g.add_argument("--ann-train-size", type=int, default=EnvConfig.ann_train_size,
                   help="vectors sampled to train IVF/HNSW (default: %(default)s)")
    g.add_argument("--hnsw-m", type=int, default=EnvConfig.hnsw_m, help="HNSW links per node (default: %(default)s)")
    g.add_argument("--hnsw-ef-construction", type=int, default=EnvConfig.hnsw_ef_construction,
                   help="HNSW insertion width (default: %(default)s)")
    g.add_argument("--hnsw-ef-search", type=int, default=EnvConfig.hnsw_ef_search, help="HNSW search width (default: %(default)s)")
    g.add_argument("--encode-batch-size", type=int, default=4096, help="texts per encode call (default: %(default)s)")
    g.add_argument("--threads", type=int, default=0,
                   help="FAISS OpenMP threads; 0 = the CPUs this process may use (default: %(default)s)")
    g = p.add_argument_group("Search-R1 (search only)")
    g.add_argument("--search-only", action="store_true",
                   help="no refresh: time searches of a frozen index (p50/p99 of --search-repeats batches)")
    g.add_argument("--search-batch", type=int, default=512, help="queries per search call (default: %(default)s)")
    g.add_argument("--search-k", type=int, default=3, help="results per query (Search-R1's topk) (default: %(default)s)")
    g.add_argument("--search-repeats", type=int, default=10, help="timed batches per variant (default: %(default)s)")
    g = p.add_argument_group("extrapolation")
    g.add_argument("--plan-corpus", type=int, default=21_000_000, help="corpus size to plan shards for (default: %(default)s)")
    g.add_argument("--plan-shard-docs", default="1000000,2000000,4000000",
                   help="documents per shard to plan with, comma-separated (default: %(default)s)")
    g.add_argument("--plan-text-bytes", type=int, default=650,
                   help="text bytes held per document (a wiki-18 passage of ~100 words: ~650) (default: %(default)s)")
    g.add_argument("--plan-bookkeeping-bytes", type=int, default=260,
                   help="Python objects per document: id string, dict and list entries (measured ~260) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.prompts * args.rollouts < 1:
        p.error("--steps, --prompts and --rollouts must be >= 1")
    args.variant = args.variant or ["flat", "ivf", "ivf+graph", "hnsw"]
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _value(text: str):
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def variant_config(args: argparse.Namespace, spec: str) -> EnvConfig:
    """The ``EnvConfig`` of a ``--variant`` spec on top of the command-line knobs."""
    base, _, overrides = spec.partition(":")
    index_type, plus, extra = base.partition("+")
    if plus and extra != "graph":
        raise SystemExit(f"--variant {spec!r}: only '+graph' may follow the index type")
    graph = dict(graph_k=args.graph_k, expand_top=args.expand_top) if plus else dict(graph_k=0, expand_top=0)
    fields = {f.name for f in dataclasses.fields(EnvConfig)}
    changes = {}
    for item in filter(None, overrides.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise SystemExit(f"--variant {spec!r}: {item!r} is not key=value with an EnvConfig key")
        changes[key] = _value(value)
    return EnvConfig(
        dtype=args.dtype, index_type=index_type, candidates_k=args.candidates_k, graph_refresh_age=args.graph_refresh_age,
        budget_per_query=args.budget_per_query, ivf_nlist=args.ivf_nlist, ivf_nprobe=args.ivf_nprobe,
        ann_codes=args.ann_codes, ann_train_size=args.ann_train_size, hnsw_m=args.hnsw_m, hnsw_ef_construction=args.hnsw_ef_construction,
        hnsw_ef_search=args.hnsw_ef_search, encode_batch_size=args.encode_batch_size, progress=False, **graph,
    ).replace(**changes)


def recall_at_10(index: CorpusIndex, queries: np.ndarray) -> tuple[float, float, float]:
    """Recall@10 of ``index.search`` against exact search on the same stored vectors, and the
    seconds of each search."""
    t = time.perf_counter()
    got = index.search(queries, 10)[0]
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    want = index.search(queries, 10, exact=True)[0]
    t_exact = time.perf_counter() - t
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])), t_index, t_exact


def spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def build_index(args: argparse.Namespace, task, sim: Simulation, config: EnvConfig) -> tuple[CorpusIndex, dict]:
    """A ``CorpusIndex`` holding the whole corpus encoded at version 0, its search structure built."""
    index = CorpusIndex(config)
    index.add_texts(task.doc_ids, task.doc_texts)
    t = time.perf_counter()
    full_encode(index, sim.encode, 0, config.encode_batch_size, progress=True)
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    index.search(np.ones((1, task.dim), np.float32), 1)  # the first search builds an IVF/HNSW structure
    build_s = time.perf_counter() - t if config.index_type != "flat" else 0.0
    log(f"  initial encode {encode_s:.1f}s, {config.index_type} build {build_s:.1f}s")
    return index, {"initial_encode_seconds": encode_s, "build_seconds": build_s}


def run_refresh(args: argparse.Namespace, task, spec: str, reference: dict) -> dict:
    """One variant: initial encode and build, warm-up drift, ``--steps`` refreshes vs the reference."""
    config = variant_config(args, spec)
    peak_rss_reset()
    sim = Simulation(args, task, np.random.default_rng(args.seed + 1))
    index, out = build_index(args, task, sim, config)
    for _ in range(args.warmup_steps):
        sim.enc.step()
    planner = RefreshPlanner(config)
    # the no-refresh baseline: rank the stale index's candidates with their stored vectors
    no_refresh = RefreshPlanner(config.replace(budget=0, staleness_tolerance=1 << 30, expand_top=0, full_refresh_every=0))
    steps, errors, recall = [], [], {}
    for step in range(1, args.steps + 1):
        sim.enc.step()
        queries, relevance = sim.queries(args.prompts)
        key = float(np.abs(queries).sum())
        relevant_ids = [list(r) for r in relevance]
        version = args.warmup_steps + step
        if step not in reference:  # the first variant computes the reference and the no-refresh baseline
            t = time.perf_counter()
            rewards = corpus_rewards(queries, sim.encode_rows, len(task.doc_ids), task.doc_ids, sim.row_of, relevance, args.reward_k)
            seconds = time.perf_counter() - t
            stale = no_refresh.refresh(index, queries, relevant_ids, version, sim.encode)
            reference[step] = {"key": key, "rewards": rewards, "seconds": seconds,
                               "stale_rewards": pool_rewards(stale, relevance, args.reward_k)}
        ref = reference[step]
        if abs(ref["key"] - key) > 1e-3 * key:
            raise RuntimeError("variants did not replay the same run (queries differ)")
        r_full = ref["rewards"]
        if step in (1, args.steps):  # before this step's refresh: recall of the structure as it is
            recall[step] = recall_at_10(index, queries)
        result = planner.refresh(index, queries, relevant_ids, version, sim.encode)
        err = [abs(a - b) for a, b in zip(r_full, pool_rewards(result, relevance, args.reward_k))]
        errors += err
        s = result.stats
        env_s = s.seconds["total"] - s.seconds["encode"]
        steps.append({"step": step, "version": version, "env_seconds": env_s, "seconds": s.seconds,
                      "n_encoded": s.n_encoded, "n_requested": s.n_requested, "n_neighbours": s.n_neighbours,
                      "n_over_budget": s.n_over_budget, "pool": len(result.doc_ids),
                      "agreement": float(np.mean(np.array(err) < 1e-9)), "reference_seconds": ref["seconds"]})
        log(f"  step {step}/{args.steps}: env {env_s:.2f}s (search {s.seconds['search']:.2f} graph {s.seconds['graph']:.2f} "
            f"write {s.seconds['write']:.2f} score {s.seconds['score']:.2f}), encode {s.seconds['encode']:.2f}s, "
            f"encoded {s.n_encoded} (+{s.n_neighbours} graph), agreement {steps[-1]['agreement']:.3f}, "
            f"reference {ref['seconds']:.1f}s")
    out.update(summarise(args, config, spec, index, steps))
    out.update({"reward_agreement": float(np.mean(np.array(errors) < 1e-9)), "reward_mae": float(np.mean(errors)),
                "recall_at_10_first": recall[1][0], "recall_at_10_last": recall[args.steps][0],
                "exact_search_seconds_recall_batch": recall[1][2], "steps": steps})
    del index
    gc.collect()
    return out


def run_search(args: argparse.Namespace, task, spec: str) -> dict:
    """One variant, search only: latency of ``--search-batch``-query batches, recall@10 vs exact."""
    config = variant_config(args, spec)
    peak_rss_reset()
    sim = Simulation(args, task, np.random.default_rng(args.seed + 1))
    index, out = build_index(args, task, sim, config)
    latencies = []
    for r in range(args.search_repeats):
        queries, _ = sim.queries(args.search_batch, rollouts=1)
        t = time.perf_counter()
        index.search(queries, args.search_k)
        latencies.append(time.perf_counter() - t)
        log(f"  batch {r + 1}/{args.search_repeats}: {latencies[-1]:.3f}s")
    rec, _, exact_s = recall_at_10(index, queries)
    out.update(summarise(args, config, spec, index, []))
    out.update({"search_batch": args.search_batch, "search_k": args.search_k, "latencies": latencies,
                "latency_p50": float(np.percentile(latencies, 50)), "latency_p99": float(np.percentile(latencies, 99)),
                "recall_at_10": rec, "exact_search_seconds": exact_s})
    del index
    gc.collect()
    return out


def summarise(args: argparse.Namespace, config: EnvConfig, spec: str, index: CorpusIndex, steps: list[dict]) -> dict:
    mem = index.memory_bytes()
    out = {"variant": spec, "config": {k: v for k, v in config.to_dict().items() if k in (
               "index_type", "dtype", "candidates_k", "graph_k", "expand_top", "budget", "budget_per_query", "ivf_nlist",
               "ivf_nprobe", "ann_codes", "ann_train_size", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search")},
           "memory_bytes": mem, "array_bytes_per_doc": mem["total"] / len(index), "peak_rss_bytes": peak_rss_bytes()}
    if steps:
        out["env_seconds"] = spread([s["env_seconds"] for s in steps])
        out["phase_seconds_median"] = {p: float(np.median([s["seconds"][p] for s in steps])) for p in PHASES}
        out["encode_callback_seconds_median"] = float(np.median([s["seconds"]["encode"] for s in steps]))
        out["encoded_per_step"] = float(np.mean([s["n_encoded"] for s in steps]))
        out["encoded_fraction"] = out["encoded_per_step"] / len(index)
    return out


def plan(args: argparse.Namespace, variants: list[dict], n_docs: int) -> list[dict]:
    """Shards and memory per shard for ``--plan-corpus`` documents: the measured array bytes per
    document, plus ``--plan-text-bytes`` of text and ``--plan-bookkeeping-bytes`` of Python
    objects (ids, dict entries) per document. Search seconds per shard (one step's queries, or
    one search batch) are scaled linearly with the shard size for flat and IVF (at a fixed
    nprobe/nlist fraction), by log(size) for HNSW: an extrapolation, not a measurement."""
    out = []
    extra = args.plan_text_bytes + args.plan_bookkeeping_bytes
    for v in variants:
        search_s = v["phase_seconds_median"]["search"] if "phase_seconds_median" in v else v["latency_p50"]
        for shard_docs in (int(x) for x in args.plan_shard_docs.split(",")):
            scale = math.log(shard_docs) / math.log(n_docs) if v["config"]["index_type"] == "hnsw" else shard_docs / n_docs
            out.append({"variant": v["variant"], "corpus": args.plan_corpus, "docs_per_shard": shard_docs,
                        "shards": math.ceil(args.plan_corpus / shard_docs),
                        "array_gib_per_shard": v["array_bytes_per_doc"] * shard_docs / GIB,
                        "memory_gib_per_shard": (v["array_bytes_per_doc"] + extra) * shard_docs / GIB,
                        "search_seconds_per_shard_estimate": search_s * scale})
    return out


def table(args: argparse.Namespace, variants: list[dict]) -> str:
    if args.search_only:
        rows = ["| variant | build s | p50 s | p99 s | recall@10 | arrays GiB | peak RSS GiB |", "|---|---|---|---|---|---|---|"]
        for v in variants:
            rows.append(f"| {v['variant']} | {v['build_seconds']:.1f} | {v['latency_p50']:.3f} | {v['latency_p99']:.3f} | "
                        f"{v['recall_at_10']:.3f} | {v['memory_bytes']['total'] / GIB:.2f} | {v['peak_rss_bytes'] / GIB:.2f} |")
        return "\n".join(rows)
    rows = ["| variant | build s | env s/step median (min-max) | search | graph | write | encoded/step | agreement | "
            "recall@10 first/last | arrays GiB | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        e, ph = v["env_seconds"], v["phase_seconds_median"]
        rows.append(f"| {v['variant']} | {v['build_seconds']:.1f} | {e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f}) | "
                    f"{ph['search']:.2f} | {ph['graph']:.2f} | {ph['write']:.2f} | {v['encoded_per_step']:.0f} | "
                    f"{v['reward_agreement']:.3f} | {v['recall_at_10_first']:.3f}/{v['recall_at_10_last']:.3f} | "
                    f"{v['memory_bytes']['total'] / GIB:.2f} | {v['peak_rss_bytes'] / GIB:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    log(f"generating {args.corpus_size} documents ({args.feature_dim}-dim features -> {args.dim}-dim embeddings)")
    task = synthetic_task(args, np.random.default_rng(args.seed))
    _score_ranking()  # import the reward (and verl) now, not inside the first timed step
    for spec in args.variant:
        variant_config(args, spec)  # fail on a bad spec before any long work
    variants, reference = [], {}
    for spec in args.variant:
        log(f"variant {spec}")
        variants.append(run_search(args, task, spec) if args.search_only else run_refresh(args, task, spec, reference))
    out = {
        "machine": {"nproc": os.cpu_count(), "faiss_threads": threads, "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(), "note": "2-core machine shared with other jobs: timings vary with their load"},
        "data": {"corpus_size": args.corpus_size, "dim": args.dim, "feature_dim": args.feature_dim, **task.info,
                 "queries_per_step": args.prompts * args.rollouts, "steps": args.steps, "warmup_steps": args.warmup_steps,
                 "drift": args.drift, "reward": f"ndcg@{args.reward_k}", "seed": args.seed},
        "mode": "search_only" if args.search_only else "refresh",
        "variants": variants,
        "plan": plan(args, variants, args.corpus_size),
        "wall_seconds": time.perf_counter() - t0,
    }
    if reference:
        out["reference_seconds_per_step"] = spread([r["seconds"] for r in reference.values()])
        stale_err = [abs(a - b) for r in reference.values() for a, b in zip(r["rewards"], r["stale_rewards"])]
        out["no_refresh_reward_agreement"] = float(np.mean(np.array(stale_err) < 1e-9))
    log(table(args, variants))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
