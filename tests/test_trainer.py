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
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from verl_search_r3.data.beir import load_beir
from verl_search_r3.embedding import gather_embeddings, last_hidden_states, last_token_positions, pad_sequences
from verl_search_r3.prompts import embed_prompt_ids, format_document, render_generation_prompt
from verl_search_r3.rl.agent_loop import FORCED_KEY
from verl_search_r3.rl.engine import DOC_IDS_KEY, DOC_MASK_KEY, DOCS_KEY, EMBEDDING_KEY, add_embedding_outputs, dense
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
    """Stands in for the GPU worker group: the tiny model through verl's engine methods.

    ``compute_log_prob`` splits the batch over ``dp`` ranks as verl's dispatch does
    (``KVBatchMeta.chunk``) and each rank's shard into micro-batches with verl's real
    ``prepare_micro_batches`` (fixed size ``micro``), so a batch that does not split evenly fails
    as on the GPU workers.
    """

    def __init__(self, model, token_id, dp=1, micro=4):
        eng = object.__new__(FSDPEngineWithLMHead)
        eng.pad_to_length, eng.use_ulysses_sp, eng.ulysses_sequence_parallel_size = False, False, 1
        eng.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
        eng.module = model
        add_embedding_outputs(eng, model, token_id)
        self.engine, self.model, self.micro = eng, model, micro
        self._dispatch_info = {"actor": list(range(dp))}
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

    def compute_log_prob(self, batch):
        import transfer_queue as tq
        from verl.workers.engine.utils import prepare_micro_batches

        for shard in batch.chunk(len(self._dispatch_info["actor"])):
            assert len(shard), "an empty data-parallel shard"
            data = tq.kv_batch_get(keys=shard.keys, partition_id=shard.partition_id, select_fields=["input_ids", "position_ids", "prompts"])
            tu.assign_non_tensor(data, use_dynamic_bsz=False, micro_batch_size_per_gpu=self.micro)
            micro_batches, _ = prepare_micro_batches(data)  # asserts the shard splits into whole micro-batches
            emb = torch.cat([self.embed(mb, self.micro) for mb in micro_batches])
            tq.kv_batch_put(keys=shard.keys, partition_id=shard.partition_id,
                            fields=tu.get_tensordict({EMBEDDING_KEY: torch.nested.as_nested_tensor(list(emb), layout=torch.jagged)}))
        return batch


class SpyEnv:
    """The real environment client, recording what each refresh was asked."""

    def __init__(self, env):
        self.env, self.calls = env, []

    def refresh(self, query_vecs, relevant_ids, version, encode):
        self.calls.append({"n_queries": len(query_vecs), "version": version, "vecs": np.array(query_vecs)})
        return self.env.refresh(query_vecs, relevant_ids, version, encode)

    def __getattr__(self, name):
        return getattr(self.env, name)


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """TransferQueue on the test run's Ray cluster."""
    import transfer_queue as tq
    from omegaconf import OmegaConf

    tq.init(OmegaConf.create({"enable": True, "metrics": {"enabled": False, "port": 0},
                              "backend": {"storage_backend": "SimpleStorage",
                                          "SimpleStorage": {"total_storage_size": 1000, "num_data_storage_units": 1}}}))
    yield tq
    tq.close()


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


def _config(tiny_qwen_dir, corpus_path, *overrides):
    with initialize_config_dir(config_dir=os.path.abspath(RECIPE_CONFIG), version_base=None):
        return compose(config_name="search_r3_grpo", overrides=[
            f"actor_rollout_ref.model.path={tiny_qwen_dir}", "reward.num_workers=1",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            f"search_r3.corpus_path={corpus_path}", "search_r3.doc_max_length=64",
            f"search_r3.env.name=test-env-{uuid.uuid4().hex[:6]}", "search_r3.env.num_cpus=1",
            "search_r3.env.candidates_k=20", "search_r3.env.dtype=float32", "search_r3.env.progress=false",
            "search_r3.contrastive.num_negatives=3", *overrides,
        ])


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
    t.env = SpyEnv(CorpusIndexClient(t.search_r3.env))
    return t


@pytest.fixture(scope="module")
def started(cluster, small_cranfield, tiny_qwen, tiny_qwen_dir):
    """A search_r3 trainer (fake GPU worker group) with its environment filled and encoded."""
    model, tok = tiny_qwen
    data, doc_ids, queries, corpus_path = small_cranfield
    trainer = _trainer(_config(tiny_qwen_dir, corpus_path), tok, model)
    trainer._start_environment()
    assert trainer.actor_rollout_wg.encoded >= len(doc_ids)
    doc_prompts = [embed_prompt_ids(tok, format_document(*data.corpus[d]), "document", 64) for d in doc_ids]
    ids_pad, mask = pad_sequences(doc_prompts, tok.pad_token_id, side="left")
    with torch.no_grad():
        hidden = last_hidden_states(model, ids_pad, mask)
    doc_vecs = gather_embeddings(hidden, *last_token_positions(ids_pad, embed_token_id(tok), mask)).numpy()
    yield SimpleNamespace(trainer=trainer, model=model, tok=tok, data=data, doc_ids=doc_ids, queries=queries, doc_vecs=doc_vecs)
    trainer.env.shutdown()


def independent_ndcg(s, qid, query_vec):
    """nDCG@10 of one query vector over the whole corpus, every document encoded fresh (pytrec_eval)."""
    sims = s.doc_vecs @ query_vec
    run = {qid: {d: float(x) for d, x in zip(s.doc_ids, sims)}}
    return pytrec_eval.RelevanceEvaluator({qid: s.data.qrels[qid]}, {"ndcg_cut.10"}).evaluate(run)[qid]["ndcg_cut_10"]


def _rollouts(s, n_per_query=2, drop_token=((2, 1),)):
    """Per query ``n_per_query`` rollouts ending with the embed token, except (query, rollout) in ``drop_token``."""
    E = embed_token_id(s.tok)
    words = s.tok("the flow over a flat plate", add_special_tokens=False)["input_ids"]
    rows = []
    for qi, q in enumerate(s.queries):
        rel = s.data.qrels[q]
        ranked = sorted(rel.items(), key=lambda x: -x[1])
        gt = {"doc_ids": [d for d, g in ranked if g > 0], "grades": [g for _, g in ranked if g > 0]}
        prompt = s.tok(render_generation_prompt(s.tok, s.data.queries[q]), add_special_tokens=False)["input_ids"]
        for r in range(n_per_query):
            response = words[: 3 + r] + ([] if (qi, r) in drop_token else [E])
            rows.append(SimpleNamespace(qid=q, prompt=prompt, response=response, gt=gt))
    return rows


def _nj(seqs):
    return torch.nested.as_nested_tensor([torch.tensor(x) for x in seqs], layout=torch.jagged)


def _put_rollouts(s, rows, keys, partition_id, with_embeddings):
    import transfer_queue as tq

    fields = {
        "prompts": _nj([r.prompt for r in rows]), "responses": _nj([r.response for r in rows]),
        "input_ids": _nj([r.prompt + r.response for r in rows]),
        "position_ids": _nj([list(range(len(r.prompt) + len(r.response))) for r in rows]),
        "reward_model": [{"style": "rule", "ground_truth": r.gt} for r in rows],
        "data_source": ["search_r3/cranfield"] * len(rows),
        # as search_r3_agent records it: every third rollout had its token appended
        "extra_fields": [{"turn_scores": [], FORCED_KEY: i % 3 == 0} for i in range(len(rows))],
    }
    if with_embeddings:
        emb = s.trainer.actor_rollout_wg.embed(TensorDict({k: fields[k] for k in ("input_ids", "position_ids", "prompts")}, batch_size=[len(rows)]))
        fields[EMBEDDING_KEY] = torch.nested.as_nested_tensor(list(emb), layout=torch.jagged)
    tq.kv_batch_put(keys=keys, partition_id=partition_id, fields=tu.get_tensordict(fields),
                    tags=[{"seq_len": len(r.prompt) + len(r.response)} for r in rows])
    return fields


def test_rank_and_reward_matches_an_independent_full_ranking(cluster, started):
    tq, s = cluster, started
    rows = _rollouts(s)
    keys = [f"{r.qid}_{i}_0" for i, r in enumerate(rows)]
    fields = _put_rollouts(s, rows, keys, "train", with_embeddings=True)
    from transfer_queue import KVBatchMeta

    batch = KVBatchMeta(keys=keys, tags=[{}] * len(keys), partition_id="train")
    s.trainer.global_steps = 1
    metrics = s.trainer._rank_and_reward(batch, refresh=True, version=0, training=True).metrics()

    out = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["rm_scores", "ndcg", DOCS_KEY, DOC_IDS_KEY, DOC_MASK_KEY])
    scores = [row[-1].item() for row in out["rm_scores"].unbind()]
    # independent: every document encoded fresh, brute-force cosine, pytrec_eval nDCG@10
    q = dense(fields[EMBEDDING_KEY]).numpy()
    for i, r in enumerate(rows):
        if np.linalg.norm(q[i]) == 0:
            assert scores[i] == RewardConfig().missing_token_score
            continue
        assert scores[i] == pytest.approx(independent_ndcg(s, r.qid, q[i]), abs=1e-4), keys[i]
    assert sum(x < 0 for x in scores) == 1

    # contrastive documents: row 0 is the fresh vector of the best-graded relevant document
    docs = out[DOCS_KEY].to_padded_tensor(0.0).numpy()
    doc_keys = out[DOC_IDS_KEY].to_padded_tensor(0).numpy()
    assert docs.shape == (len(keys), 4, 64)
    best = rows[0].gt["doc_ids"][0]
    assert doc_keys[0, 0] == doc_key(best)
    np.testing.assert_allclose(docs[0, 0], s.doc_vecs[s.doc_ids.index(best)], atol=1e-4)
    assert metrics["env/n_encoded"] == 0  # everything was fresh: nothing re-encoded
    assert "search_r3/ndcg" in metrics and "search_r3/format_ok" in metrics
    assert metrics["search_r3/forced"] == pytest.approx(np.mean([i % 3 == 0 for i in range(len(rows))]))
    tq.kv_clear(keys=keys, partition_id="train")


def test_padding_and_tokenless_rows_stay_out_of_the_environment_and_metrics(cluster, started):
    """verl's padding rows (here one padded by verl's own upsample, carrying a copied, non-zero
    embedding) and rollouts without the token never reach env.refresh nor the ranking metrics."""
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size

    tq, s = cluster, started
    rows = _rollouts(s, drop_token=((2, 1),))
    keys = [f"{r.qid}_{i}_1" for i, r in enumerate(rows)]
    _put_rollouts(s, rows, keys, "train", with_embeddings=True)
    batch = upsample_batch_to_divisible_size(KVBatchMeta(keys=keys, tags=[{}] * len(keys), partition_id="train"), 8, s.tok.eos_token_id)
    assert len(batch) == 8 and batch.tags[-1]["is_padding"]
    s.trainer.global_steps = 4
    metrics = s.trainer._rank_and_reward(batch, refresh=True, version=s.trainer.policy_version, training=True).metrics()

    call = s.trainer.env.calls[-1]
    assert call["n_queries"] == 5 and call["version"] == 3  # 6 real rollouts, one without the token
    out = tq.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["rm_scores", "ndcg", "format_ok", DOC_MASK_KEY])
    scores = [row[-1].item() for row in out["rm_scores"].unbind()]
    assert scores[-1] == 0.0 and scores[5] == RewardConfig().missing_token_score
    ndcg, format_ok = np.asarray(out["ndcg"], dtype=float), np.asarray(out["format_ok"], dtype=float)
    assert metrics["search_r3/format_ok"] == pytest.approx(5 / 6)
    assert metrics["search_r3/ndcg"] == pytest.approx(ndcg[[0, 1, 2, 3, 4]].mean())
    assert format_ok[5] == 0
    mask = out[DOC_MASK_KEY].to_padded_tensor(0).numpy()
    assert not mask[5].any() and not mask[7].any() and mask[:5, 0].all()
    tq.kv_clear(keys=batch.keys, partition_id="train")


class _FakeAgentLoop:
    """verl's agent-loop manager for validation: writes the prepared rollouts of each prompt to TransferQueue."""

    def __init__(self, s, rows):
        self.s, self.rows, self.keys = s, rows, []

    def generate_sequences(self, batch):
        keys = [f"{uid}_0_0" for uid in batch["uid"]]
        fields = _put_rollouts(self.s, self.rows, keys, "val", with_embeddings=False)
        import transfer_queue as tq

        tq.kv_batch_put(keys=keys, partition_id="val", fields=tu.get_tensordict({
            "uid": list(batch["uid"]), "num_turns": torch.ones(len(keys), dtype=torch.long),
            "extra_fields": [{"turn_scores": []} for _ in keys]}))
        self.keys, self.fields = keys, fields


def _validate(s, rows, dp, micro):
    from transfer_queue import KVBatchMeta

    t = s.trainer
    t.actor_rollout_wg._dispatch_info["actor"], t.actor_rollout_wg.micro = list(range(dp)), micro
    t.config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu = micro
    t.agent_loop_manager = _FakeAgentLoop(s, rows)
    t.val_dataloader = [{
        "raw_prompt": np.array([[{"role": "user", "content": s.data.queries[r.qid]}] for r in rows] + [None], dtype=object)[:-1],
        "data_source": np.array(["search_r3/cranfield"] * len(rows), dtype=object),
    }]
    t.replay_buffer = SimpleNamespace(sample=lambda global_steps, partition_id, batch_size: (
        KVBatchMeta(keys=t.agent_loop_manager.keys, tags=[{"seq_len": 1}] * batch_size, partition_id=partition_id), {}))
    t.checkpoint_manager = SimpleNamespace(sleep_replicas=lambda: None, update_weights=lambda: None)
    return t._validate()


def test_validation_reports_search_r3_and_env_figures_at_the_current_version(cluster, started):
    """Through verl's real _validate: val-search_r3/* (nDCG of the validation queries, computed
    independently), val-env/* and verl's own val-aux per-data-source extras reach the returned
    metrics; the environment refreshes at policy version global_steps (after the step's update)."""
    s = started
    rows = _rollouts(s, n_per_query=1, drop_token=((1, 0),))
    s.trainer.global_steps = 2
    metrics = _validate(s, rows, dp=1, micro=1)

    call = s.trainer.env.calls[-1]
    assert call["version"] == 2 and call["n_queries"] == 2
    want = [independent_ndcg(s, r.qid, v) for r, v in zip([rows[0], rows[2]], call["vecs"])]
    assert metrics["val-search_r3/ndcg"] == pytest.approx(np.mean(want), abs=1e-4)
    assert metrics["val-search_r3/format_ok"] == pytest.approx(2 / 3)
    assert metrics["val-env/n_requested"] > 0 and "val-env/index_mean_age" in metrics or "val-env/n_encoded" in metrics
    assert metrics["val-aux/search_r3/cranfield/ndcg/mean@1"] == pytest.approx(np.sum(want) / 3, abs=1e-4)
    assert metrics["val-core/search_r3/cranfield/reward/mean@1"] == pytest.approx((np.sum(want) + RewardConfig().missing_token_score) / 3, abs=1e-4)


def test_validation_batch_is_padded_to_the_actor_split(cluster, started):
    """3 validation rollouts over 2 ranks with micro-batches of 2: padded to 4 (a padding row is
    never ranked), the pad keys are removed from TransferQueue afterwards."""
    import transfer_queue as tq

    s = started
    rows = _rollouts(s, n_per_query=1, drop_token=())
    s.trainer.global_steps = 2
    metrics = _validate(s, rows, dp=2, micro=2)
    assert s.trainer.env.calls[-1]["n_queries"] == 3
    assert metrics["val-search_r3/format_ok"] == 1.0
    left = tq.kv_list("val") or {}
    assert not [k for k in left.get("val", {}) if k.startswith("pad")]


def test_candidate_and_contrastive_selection_by_hand():
    vecs = np.eye(5, dtype=np.float32)
    fresh = np.array([True, True, True, True, False])  # "e" was over the refresh budget
    # the fields of env.RefreshResult these functions read
    result = SimpleNamespace(doc_ids=["a", "b", "c", "d", "e"], doc_vecs=vecs, fresh=fresh,
                             scores=np.array([[0.9, 0.1, 0.5, 0.7, 0.3]], np.float32))
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


# ---------------------------------------------------------------- checkpoints and refusals (no Ray)


def _plain_config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=os.path.abspath(RECIPE_CONFIG), version_base=None):
        return compose(config_name="search_r3_grpo", overrides=[
            "search_r3.corpus_path=unused.parquet", f"trainer.default_local_dir={tmp_path}/ckpt", *overrides])


class _CheckpointFakes:
    """The pieces verl's real _save_checkpoint / _load_checkpoint touch, recording what they see."""

    def __init__(self, root):
        self.root, self.snapshots, self.actor_saves, self.actor_loads = root, [], [], []

    # actor worker group
    def save_checkpoint(self, local_path, hdfs_path, global_step, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        self.actor_saves.append((global_step, max_ckpt_to_keep))

    def load_checkpoint(self, local_path, del_local_after_load=False):
        self.actor_loads.append(local_path)

    # environment
    def snapshot(self, path):
        latest = os.path.join(self.root, "latest_checkpointed_iteration.txt")
        self.snapshots.append((path, open(latest).read() if os.path.exists(latest) else None))
        os.makedirs(path)


def _checkpoint_trainer(cfg, fakes, global_steps=0):
    t = object.__new__(SearchR3Trainer)
    t.config, t.global_steps, t.trainer_mode, t.use_critic = cfg, global_steps, "sync", False
    t.actor_rollout_wg = t.env = fakes
    t._saved_env_snapshots = []
    t.train_dataloader = SimpleNamespace(state_dict=lambda: {}, load_state_dict=lambda state: None)
    t.checkpoint_callback = SimpleNamespace(on_save=lambda **kwargs: None)
    return t


def _save_steps(tmp_path, steps, *overrides):
    cfg = _plain_config(tmp_path, *overrides)
    fakes = _CheckpointFakes(cfg.trainer.default_local_dir)
    trainer = _checkpoint_trainer(cfg, fakes)
    for step in steps:
        trainer.global_steps = step
        trainer._save_checkpoint()  # verl's real method around ours
    return trainer, fakes, cfg.trainer.default_local_dir


def test_env_snapshot_is_written_before_verl_marks_the_checkpoint(tmp_path):
    trainer, fakes, root = _save_steps(tmp_path, (1, 2, 3))
    assert [latest for _, latest in fakes.snapshots] == [None, "1", "2"]  # the tracker still named the previous step

    # a crash while snapshotting leaves the tracker on the last complete checkpoint
    def crash(path):
        raise OSError("disk full")

    trainer.env = SimpleNamespace(snapshot=crash)
    trainer.global_steps = 4
    with pytest.raises(OSError):
        trainer._save_checkpoint()
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read() == "3"


@pytest.mark.parametrize(("override", "kept"), [
    ("trainer.max_actor_ckpt_to_keep=2", [2, 3]),
    ("+trainer.remove_previous_ckpt_in_save=true", [3]),
    ("trainer.max_actor_ckpt_to_keep=null", [1, 2, 3]),
])
def test_env_snapshots_are_pruned_with_the_actor_checkpoints(tmp_path, override, kept):
    _, fakes, root = _save_steps(tmp_path, (1, 2, 3), override)
    have = sorted(int(n.split("_")[-1]) for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, "search_r3_env")))
    assert have == kept
    assert {keep for _, keep in fakes.actor_saves} == {None if kept == [1, 2, 3] else len(kept)}  # what verl keeps of the actor


def test_resume_restores_the_env_snapshot_of_the_resumed_folder(tmp_path):
    other = tmp_path / "elsewhere" / "global_step_5"
    (other / "search_r3_env").mkdir(parents=True)
    (other / "actor").mkdir()
    cfg = _plain_config(tmp_path, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={other}")
    fakes = _CheckpointFakes(cfg.trainer.default_local_dir)
    trainer = _checkpoint_trainer(cfg, fakes)
    trainer._load_checkpoint()  # verl's real method around ours
    assert trainer.global_steps == 5 and fakes.actor_loads == [str(other / "actor")]
    assert trainer._resume_env_snapshot == str(other / "search_r3_env")

    # auto: the latest checkpoint under default_local_dir
    auto = _plain_config(tmp_path)
    step = tmp_path / "ckpt" / "global_step_2"
    (step / "search_r3_env").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    trainer = _checkpoint_trainer(auto, _CheckpointFakes(auto.trainer.default_local_dir))
    trainer._load_checkpoint()
    assert trainer.global_steps == 2 and trainer._resume_env_snapshot == str(step / "search_r3_env")


@pytest.mark.parametrize(
    ("override", "named"),
    [("algorithm.rollout_correction.bypass_mode=true", "bypass_mode"), ("algorithm.filter_groups.enable=true", "filter_groups")],
)
def test_incompatible_verl_options_are_refused_at_construction(tmp_path, override, named):
    cfg = _plain_config(tmp_path, override)
    with pytest.raises(ValueError, match=f"search_r3 does not support algorithm.*{named}"):
        SearchR3Trainer(cfg)


def test_validation_figures_merge_over_batches():
    from verl_search_r3.rl.trainer import StepFigures

    a = StepFigures({"ndcg": np.array([0.5, 1.0]), "format_ok": np.array([1.0, 1.0, 0.0])},
                    {"n_encoded": 3.0, "seconds_total": 0.5, "requested_max_age": 2.0, "requested_mean_age": 1.0,
                     "budget_hit": 0.0, "index_fraction_stale": 0.4})
    b = StepFigures({"ndcg": np.array([0.0]), "format_ok": np.array([1.0])},
                    {"n_encoded": 1.0, "seconds_total": 0.25, "requested_max_age": 1.0, "requested_mean_age": 0.0,
                     "budget_hit": 1.0, "index_fraction_stale": 0.1})
    m = StepFigures.merge([a, b]).metrics(validation=True)
    assert m == {"val-search_r3/ndcg": pytest.approx(0.5), "val-search_r3/format_ok": 0.75, "val-env/n_encoded": 4.0,
                 "val-env/seconds_total": 0.75, "val-env/requested_max_age": 2.0, "val-env/requested_mean_age": 0.5,
                 "val-env/budget_hit": 1.0, "val-env/index_fraction_stale": 0.1}
    assert StepFigures({"ndcg": np.zeros(0)}).metrics() == {}  # no rollout with the token: no ranking figure
