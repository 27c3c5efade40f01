"""The search_r3 trainer's driver-side step, on a local Ray cluster with real TransferQueue,
the real corpus-index shard actors and verl's real reward-loop workers.

Only the GPU worker group is replaced: a fake whose ``encode_documents`` runs the tiny model
through verl's FSDP engine methods (as the real worker does). The rewards written to
TransferQueue must equal nDCG@10 computed independently (brute-force cosine over the whole
corpus + pytrec_eval), since the environment is fully fresh at policy version 0.
"""

import os
import uuid
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytrec_eval
import ray
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from verl_search_r3.data.beir import load_beir
from verl_search_r3.embedding import gather_embeddings, last_hidden_states, last_token_positions, pad_sequences
from verl_search_r3.prompts import embed_prompt_ids, format_document, render_generation_prompt
from verl_search_r3.rl.engine import DOC_IDS_KEY, DOC_MASK_KEY, DOCS_KEY, EMBEDDING_KEY, add_embedding_outputs
from verl_search_r3.rl.reward import RewardConfig, score_ranking
from verl_search_r3.rl.trainer import (
    SearchR3Settings,
    SearchR3Trainer,
    contrastive_documents,
    doc_key,
    pool_grades,
    reward_candidates,
)
from verl_search_r3.tokens import embed_token_id

RECIPE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "recipes", "config")


class FakeActorWorkerGroup:
    """Stands in for the GPU worker group: the tiny model through verl's engine methods."""

    def __init__(self, model, token_id):
        eng = object.__new__(FSDPEngineWithLMHead)
        eng.pad_to_length, eng.use_ulysses_sp, eng.ulysses_sequence_parallel_size = False, False, 1
        eng.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
        eng.module = model
        add_embedding_outputs(eng, model, token_id)
        self.engine, self.model = eng, model
        self._dispatch_info = {"actor": [0]}
        self.encoded = 0

    def embed(self, batch: TensorDict, micro_batch_size: int = 4) -> torch.Tensor:
        """Micro-batched like the engine: full-vocabulary logits of a whole batch would not fit."""
        parts = []
        for start in range(0, len(batch), micro_batch_size):
            micro = tu.index_select_tensor_dict(batch, torch.arange(start, min(start + micro_batch_size, len(batch))))
            tu.assign_non_tensor(micro, use_remove_padding=False, temperature=1.0)
            with torch.no_grad():
                inputs, args = self.engine.prepare_model_inputs(micro)
                out = self.model(**inputs, use_cache=False)
                parts.append(self.engine.prepare_model_outputs(out, args, micro, None)[EMBEDDING_KEY])
        return torch.cat(parts)

    def encode_documents(self, batch: TensorDict) -> TensorDict:
        self.encoded += len(batch)
        emb = self.embed(batch)
        return TensorDict({EMBEDDING_KEY: torch.nested.as_nested_tensor(list(emb), layout=torch.jagged)}, batch_size=[len(batch)])


@pytest.fixture(scope="module")
def cluster():
    import transfer_queue as tq
    from omegaconf import OmegaConf

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, namespace="test_trainer")
    tq.init(OmegaConf.create({"enable": True, "metrics": {"enabled": False, "port": 0},
                              "backend": {"storage_backend": "SimpleStorage",
                                          "SimpleStorage": {"total_storage_size": 1000, "num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def small_cranfield(cranfield_dir, tmp_path_factory):
    """Three Cranfield queries with few judgements, their relevant documents and filler documents (80 in all)."""
    data = load_beir(cranfield_dir)
    queries = sorted((q for q in data.qrels if data.qrels[q]), key=lambda q: (len(data.qrels[q]), int(q)))[:3]
    relevant = sorted({d for q in queries for d in data.qrels[q]})
    ids = relevant + [d for d in data.corpus if d not in relevant][: 80 - len(relevant)]
    path = tmp_path_factory.mktemp("env") / "corpus.parquet"
    pq.write_table(pa.table({"doc_id": ids, "title": [data.corpus[i][0] for i in ids], "text": [data.corpus[i][1] for i in ids]}), path)
    return data, ids, queries, str(path)


def _trainer(cfg, tok, model):
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager

    t = object.__new__(SearchR3Trainer)
    t.config, t.tokenizer, t.global_steps = cfg, tok, 1
    t.actor_rollout_wg = FakeActorWorkerGroup(model, embed_token_id(tok))
    t.reward_loop_manager = RewardLoopManager(config=cfg)
    from verl_search_r3.env.actor import CorpusIndexClient
    from verl_search_r3.rl.trainer import _RewardAfterLogProb

    t.reward_loop_manager.__class__ = _RewardAfterLogProb
    t.search_r3 = SearchR3Settings.from_config(cfg)
    t.env = CorpusIndexClient(t.search_r3.env)
    return t


def test_rank_and_reward_matches_an_independent_full_ranking(cluster, small_cranfield, tiny_qwen, tiny_qwen_dir):
    tq = cluster
    model, tok = tiny_qwen
    data, doc_ids, queries, corpus_path = small_cranfield
    E = embed_token_id(tok)
    env_name = f"test-env-{uuid.uuid4().hex[:6]}"
    with initialize_config_dir(config_dir=os.path.abspath(RECIPE_CONFIG), version_base=None):
        cfg = compose(config_name="search_r3_grpo", overrides=[
            f"actor_rollout_ref.model.path={tiny_qwen_dir}", "reward.num_workers=1",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            f"search_r3.corpus_path={corpus_path}", "search_r3.doc_max_length=64",
            f"search_r3.env.name={env_name}", "search_r3.env.num_cpus=1", "search_r3.env.detached=false",
            "search_r3.env.candidates_k=20", "search_r3.env.dtype=float32", "search_r3.env.progress=false",
            "search_r3.contrastive.num_negatives=3",
        ])
    trainer = _trainer(cfg, tok, model)
    trainer._start_environment()
    assert trainer.actor_rollout_wg.encoded >= len(doc_ids)

    # rollouts: 2 per query, the second of the last query never emits the embed token
    words = tok("the flow over a flat plate", add_special_tokens=False)["input_ids"]
    keys, prompts, responses, gts = [], [], [], []
    for qi, q in enumerate(queries):
        rel = data.qrels[q]
        gt = {"doc_ids": [d for d, g in sorted(rel.items(), key=lambda x: -x[1]) if g > 0],
              "grades": [g for _, g in sorted(rel.items(), key=lambda x: -x[1]) if g > 0]}
        prompt = tok(render_generation_prompt(tok, data.queries[q]), add_special_tokens=False)["input_ids"]
        for r in range(2):
            resp = words[: 3 + r] + ([E] if not (qi == len(queries) - 1 and r == 1) else [])
            keys.append(f"{q}_{r}_0"); prompts.append(prompt); responses.append(resp); gts.append(gt)
    nj = lambda seqs: torch.nested.as_nested_tensor([torch.tensor(s) for s in seqs], layout=torch.jagged)
    seqs = TensorDict({"input_ids": nj([p + r for p, r in zip(prompts, responses)]),
                       "position_ids": nj([list(range(len(p) + len(r))) for p, r in zip(prompts, responses)]),
                       "prompts": nj(prompts)}, batch_size=[len(keys)])
    query_emb = trainer.actor_rollout_wg.embed(seqs)
    fields = {"prompts": nj(prompts), "responses": nj(responses),
              EMBEDDING_KEY: torch.nested.as_nested_tensor(list(query_emb), layout=torch.jagged),
              "reward_model": [{"style": "rule", "ground_truth": gt} for gt in gts],
              "data_source": ["search_r3/cranfield"] * len(keys)}
    tq.kv_batch_put(keys=keys, partition_id="train", fields=tu.get_tensordict(fields))
    from transfer_queue import KVBatchMeta

    batch = KVBatchMeta(keys=keys, tags=[{}] * len(keys), partition_id="train")
    metrics = {}
    trainer._rank_and_reward(batch, metrics, refresh=True, training=True)

    out = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["rm_scores", "ndcg", DOCS_KEY, DOC_IDS_KEY, DOC_MASK_KEY])
    scores = [row[-1].item() for row in out["rm_scores"].unbind()]

    # independent: every document encoded fresh, brute-force cosine, pytrec_eval nDCG@10
    doc_prompts = [embed_prompt_ids(tok, format_document(*data.corpus[d]), "document", 64) for d in doc_ids]
    ids_pad, mask = pad_sequences(doc_prompts, tok.pad_token_id, side="left")
    with torch.no_grad():
        hidden = last_hidden_states(model, ids_pad, mask)
    doc_vecs = gather_embeddings(hidden, *last_token_positions(ids_pad, E, mask)).numpy()
    q = query_emb.numpy()
    for i, key in enumerate(keys):
        qid = key.split("_")[0]
        if np.linalg.norm(q[i]) == 0:
            assert scores[i] == RewardConfig().missing_token_score
            continue
        sims = doc_vecs @ q[i]
        run = {qid: {d: float(s) for d, s in zip(doc_ids, sims)}}
        want = pytrec_eval.RelevanceEvaluator({qid: data.qrels[qid]}, {"ndcg_cut.10"}).evaluate(run)[qid]["ndcg_cut_10"]
        assert scores[i] == pytest.approx(want, abs=1e-4), key
    assert sum(s < 0 for s in scores) == 1

    # contrastive documents: row 0 is the fresh vector of the best-graded relevant document
    docs = out[DOCS_KEY].to_padded_tensor(0.0).numpy()
    doc_keys = out[DOC_IDS_KEY].to_padded_tensor(0).numpy()
    assert docs.shape == (len(keys), 4, 64)
    best = gts[0]["doc_ids"][0]
    assert doc_keys[0, 0] == doc_key(best)
    np.testing.assert_allclose(docs[0, 0], doc_vecs[doc_ids.index(best)], atol=1e-4)
    assert metrics["env/n_encoded"] == 0  # everything was fresh: nothing re-encoded
    assert "search_r3/ndcg" in metrics and "search_r3/format_ok" in metrics
    trainer.env.shutdown()


def test_candidate_and_contrastive_selection_by_hand():
    from verl_search_r3.env import RefreshResult, RefreshStats

    vecs = np.eye(5, dtype=np.float32)
    fresh = np.array([True, True, True, True, False])  # "e" was over the refresh budget
    result = RefreshResult(doc_ids=["a", "b", "c", "d", "e"], doc_vecs=vecs, doc_versions=np.zeros(5, np.int64), fresh=fresh,
                           scores=np.array([[0.9, 0.1, 0.5, 0.7, 0.3]], np.float32), stats=RefreshStats(version=0, n_queries=1))
    rel = {"b": 2, "c": 2, "e": 1, "not-in-pool": 3}
    np.testing.assert_array_equal(pool_grades(result, rel), [0, 2, 2, 0, 1])
    cand = reward_candidates(result, 0, pool_grades(result, rel), top=2)
    assert cand["doc_ids"] == ["a", "b", "c", "d", "e"]  # top-2 (a, d) + every relevant doc
    cand1 = reward_candidates(result, 0, pool_grades(result, {"e": 1}), top=1)
    assert cand1 == {"doc_ids": ["a", "e"], "scores": pytest.approx([0.9, 0.3])}
    # nDCG@1 over the reduced set equals nDCG@1 over the full pool
    full = score_ranking(result.doc_ids, result.scores[0].tolist(), {"e": 1}, RewardConfig(k=1))
    assert score_ranking(cand1["doc_ids"], cand1["scores"], {"e": 1}, RewardConfig(k=1)).ndcg == full.ndcg
    v, ids, mask = contrastive_documents(result, 0, pool_grades(result, {"b": 2, "c": 2}), num_negatives=4)
    assert ids == ["c", "a", "d", "", ""]  # best grade (b, c tie -> c ranks higher), then fresh hard negatives
    assert mask.tolist() == [True, True, True, False, False]
    np.testing.assert_array_equal(v[0], vecs[2])
    _, ids_e, _ = contrastive_documents(result, 0, pool_grades(result, {"e": 1, "b": 2}), num_negatives=1)
    assert ids_e == ["b", "a"]  # the higher grade wins over the higher score
    with pytest.raises(ValueError, match="relevant"):
        contrastive_documents(result, 0, pool_grades(result, {"zz": 1}), 2)
    assert doc_key("d1") == doc_key("d1") != doc_key("d2") and doc_key("x") >= 0
