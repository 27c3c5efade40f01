import asyncio
import math

import numpy as np
import pytest
import pytrec_eval
import torch
from hydra import compose, initialize_config_module
from verl import DataProto

from verl_search_r3.rl.reward import (
    CANDIDATES_KEY,
    RewardConfig,
    SearchR3RewardManager,
    rank_candidates,
    relevance_from_ground_truth,
    score_ranking,
)
from verl_search_r3.tokens import EMBED_TOKEN, embed_token_id


def test_ndcg_hand_computed():
    # ranking by score: d2 (grade 1), d1 (0), d3 (grade 2)
    ids, scores = ["d1", "d2", "d3"], [0.5, 0.9, 0.1]
    rel = {"d2": 1, "d3": 2}
    got = score_ranking(ids, scores, rel, RewardConfig(k=10))
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert got.ndcg == pytest.approx(dcg / idcg)
    assert got.score == pytest.approx(dcg / idcg)
    assert got.first_relevant_rank == 1 and got.reciprocal_rank == 1.0
    assert got.recall_at_k == 1.0 and got.format_ok == 1
    assert got.margin == pytest.approx(0.9 - 0.5)
    # cut at k=2: only d2 counts, recall 1/2
    cut = score_ranking(ids, scores, rel, RewardConfig(k=2))
    assert cut.ndcg == pytest.approx(1 / idcg) and cut.recall_at_k == 0.5


def test_rr_mode_and_margin_weight():
    ids, scores = ["a", "b", "c"], [0.9, 0.8, 0.7]
    rel = {"c": 3}
    rr = score_ranking(ids, scores, rel, RewardConfig(mode="rr"))
    assert rr.score == pytest.approx(1 / 3) and rr.first_relevant_rank == 3
    assert score_ranking(ids, scores, rel, RewardConfig(mode="rr", k=2)).score == 0.0
    m = score_ranking(ids, scores, rel, RewardConfig(mode="rr", margin_weight=0.5))
    assert m.margin == pytest.approx(0.7 - 0.9)
    assert m.score == pytest.approx(1 / 3 + 0.5 * (0.7 - 0.9))


def test_ties_are_broken_against_relevant_documents():
    # a collapsed embedding: every candidate has the same score -> worst possible rank
    ids, scores = ["r", "x", "y"], [0.3, 0.3, 0.3]
    got = score_ranking(ids, scores, {"r": 1})
    assert got.first_relevant_rank == 3
    assert got.ndcg == pytest.approx(1 / math.log2(4))
    assert list(rank_candidates([0.3, 0.3, 0.5], [True, False, False])) == [2, 1, 0]


def test_grades_below_min_grade_and_absent_relevant_docs():
    got = score_ranking(["a", "b"], [0.9, 0.1], {"a": 0, "b": 2, "zz": 1})
    # "a" has grade 0 (not relevant); "zz" is relevant but not a candidate: it still counts in IDCG
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert got.ndcg == pytest.approx((2 / math.log2(3)) / idcg)
    assert got.recall_at_k == pytest.approx(0.5)
    none = score_ranking(["a"], [0.1], {"q": 1})
    assert none.first_relevant_rank == 2 and none.ndcg == 0.0 and none.margin == 0.0


def test_ndcg_equals_pytrec_eval_on_random_rankings():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 40))
        ids = [f"d{i}" for i in range(n)]
        scores = rng.permutation(n).astype(float) / n  # distinct scores: no tie semantics involved
        rel = {ids[i]: int(rng.integers(1, 5)) for i in rng.choice(n, size=int(rng.integers(1, 6)), replace=False)}
        run = {"q": {d: float(s) for d, s in zip(ids, scores)}}
        ev = pytrec_eval.RelevanceEvaluator({"q": rel}, {"ndcg_cut.10", "recip_rank"}).evaluate(run)["q"]
        got = score_ranking(ids, scores, rel, RewardConfig(k=10))
        assert got.ndcg == pytest.approx(ev["ndcg_cut_10"], abs=1e-9), trial
        assert 1 / got.first_relevant_rank == pytest.approx(ev["recip_rank"], abs=1e-9)


def test_relevance_from_ground_truth_shapes():
    assert relevance_from_ground_truth({"doc_ids": ["a", 7], "grades": [2, 1]}) == {"a": 2, "7": 1}
    assert relevance_from_ground_truth({"a": 3}) == {"a": 3}
    assert relevance_from_ground_truth(["a", "b"]) == {"a": 1, "b": 1}
    assert relevance_from_ground_truth({"doc_ids": np.array(["a"]), "grades": np.array([4])}) == {"a": 4}
    with pytest.raises(ValueError, match="grades"):
        relevance_from_ground_truth({"doc_ids": ["a"], "grades": [1, 2]})
    with pytest.raises(ValueError):
        RewardConfig(mode="dcg")


def _compose(model_dir, *overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=[f"actor_rollout_ref.model.path={model_dir}", *overrides])


def _batch(tok, responses, candidates, ground_truth):
    prompt = tok("what is lift?", add_special_tokens=False)["input_ids"]
    width = max(len(r) for r in responses)
    resp = torch.full((len(responses), width), tok.pad_token_id)
    mask = torch.zeros((len(responses), len(prompt) + width), dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r)
        mask[i, : len(prompt) + len(r)] = 1
    n = len(responses)
    return DataProto.from_single_dict(
        {
            "prompts": torch.tensor([prompt] * n),
            "responses": resp,
            "attention_mask": mask,
            "data_source": np.array(["search_r3/test"] * n, dtype=object),
            "reward_model": np.array([{"style": "rule", "ground_truth": ground_truth}] * n, dtype=object),
            CANDIDATES_KEY: np.array(candidates, dtype=object),
        }
    )


def test_reward_manager_on_hand_built_dataproto(tiny_qwen_dir, qwen_tokenizer):
    tok = qwen_tokenizer
    eid = embed_token_id(tok)
    words = tok("lift is a force", add_special_tokens=False)["input_ids"]
    cfg = _compose(tiny_qwen_dir, "+search_r3.reward.k=2", "+search_r3.reward.missing_token_score=-0.5")
    gt = {"doc_ids": ["d1", "d3"], "grades": [2, 1]}
    cands = [
        {"doc_ids": ["d1", "d2", "d3"], "scores": [0.9, 0.5, 0.1]},  # d1 first, d3 at rank 3 (> k)
        {"doc_ids": ["d1", "d2", "d3"], "scores": [0.2, 0.2, 0.2]},  # all tied: pessimistic
        {"doc_ids": ["d1", "d2", "d3"], "scores": [0.9, 0.5, 0.1]},  # no embed token
    ]
    data = _batch(tok, [words + [eid], words + [eid], words], cands, gt)
    rm = SearchR3RewardManager(cfg, tok, None)
    out = [asyncio.run(rm.run_single(data[i : i + 1])) for i in range(3)]
    idcg = 2 + 1 / math.log2(3)
    assert out[0]["reward_score"] == pytest.approx(2 / idcg)
    assert out[0]["reward_extra_info"]["first_relevant_rank"] == 1
    assert out[0]["reward_extra_info"]["recall_at_k"] == pytest.approx(0.5)
    assert out[1]["reward_extra_info"]["first_relevant_rank"] == 2  # d2 ranked above both ties
    assert out[1]["reward_score"] == pytest.approx((2 / math.log2(3)) / idcg)
    assert out[2]["reward_score"] == -0.5 and out[2]["reward_extra_info"]["format_ok"] == 0
    assert set(out[0]["reward_extra_info"]) == set(out[2]["reward_extra_info"])  # same keys for every sample

    # an embed token quoted in the prompt does not count: only the response is checked
    with pytest.raises(KeyError, match="search_r3 trainer"):
        bad = _batch(tok, [words + [eid]], cands[:1], gt)
        bad.non_tensor_batch.pop(CANDIDATES_KEY)
        asyncio.run(rm.run_single(bad[0:1]))


def test_reward_manager_resolves_by_name_and_by_importlib(tiny_qwen_dir, qwen_tokenizer):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    by_name = _compose(tiny_qwen_dir, "reward.reward_manager.name=search_r3")
    assert resolve_reward_manager_cls(by_name) is SearchR3RewardManager
    by_path = _compose(
        tiny_qwen_dir,
        "reward.reward_manager.source=importlib",
        "reward.reward_manager.module.path=pkg://verl_search_r3.rl.reward",
        "reward.reward_manager.name=SearchR3RewardManager",
    )
    assert resolve_reward_manager_cls(by_path) is SearchR3RewardManager
    # the real reward-loop worker class, in process
    worker = RewardLoopWorker(by_name)
    tok = qwen_tokenizer
    data = _batch(
        tok,
        [tok(f"x {EMBED_TOKEN}", add_special_tokens=False)["input_ids"]] * 2,
        [{"doc_ids": ["a", "b"], "scores": [0.1, 0.9]}, {"doc_ids": ["a", "b"], "scores": [0.9, 0.1]}],
        {"doc_ids": ["a"], "grades": [1]},
    )
    res = asyncio.run(worker.compute_score_batch(data))
    assert [r["reward_score"] for r in res] == pytest.approx([1 / math.log2(3), 1.0])
