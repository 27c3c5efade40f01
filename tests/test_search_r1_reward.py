"""Search-R1 reward: SQuAD normalisation, EM/F1, answer extraction from the response, reward manager."""

import asyncio

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from verl import DataProto

from verl_search_r3.search_r1.config import RewardConfig
from verl_search_r3.search_r1.reward import (
    SearchR1RewardManager,
    compute_score,
    exact_match,
    f1_score,
    golden_answers,
    normalize_answer,
    score_response,
)


@pytest.mark.parametrize(
    "text,normalized",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  A  cat,  an apple & THE dog!! ", "cat apple dog"),
        ("U.S.A.", "usa"),
        ("the theatre", "theatre"),  # whole words only
        ("Anne's answer", "annes answer"),
        ("an", ""),
        ("“Smart” quotes — dash", "“smart” quotes — dash"),  # only ASCII punctuation is removed
        ("1,000 m", "1000 m"),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1():
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "La Tour"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert f1_score("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert f1_score("Paris France", ["paris", "Lyon"]) == pytest.approx(2 / 3)
    assert f1_score("a", ["the"]) == 0.0 and f1_score("x", []) == 0.0


def test_golden_answers_shapes():
    assert golden_answers({"target": np.array(["a", "b"], dtype=object)}) == ["a", "b"]
    assert golden_answers(["a"]) == ["a"] and golden_answers("a") == ["a"]
    with pytest.raises(ValueError, match="target"):
        golden_answers({"answers": ["a"]})
    with pytest.raises(ValueError):
        golden_answers(3)


def test_last_answer_of_the_response_only_and_not_from_documents():
    golds = ["Paris"]
    # one answer in the response is enough (the prompt's example is never part of the text)
    assert score_response("<think>x</think><answer> paris </answer>", golds).acc == 1.0
    # the last answer counts
    assert score_response("<answer>Lyon</answer> <answer>Paris</answer>", golds).acc == 1.0
    assert score_response("<answer>Paris</answer> <answer>Lyon</answer>", golds).acc == 0.0
    # an answer inside a retrieved document is not the model's
    doc = "<search>q</search>\n\n<information>Doc 1(Title: t) <answer>Paris</answer></information>\n\n"
    got = score_response(doc, golds)
    assert got.acc == 0.0 and got.answered == 0.0 and got.searches == 1.0
    assert score_response(doc, golds, RewardConfig(answer_from_model_tokens=False)).acc == 1.0
    none = score_response("no answer at all", golds)
    assert (none.score, none.answered, none.format_ok) == (0.0, 0.0, 0.0)


def test_f1_and_format_terms_and_loop_counts():
    cfg = RewardConfig(f1_weight=0.5, format_weight=0.2)
    stats = {"search_r1_searches": 3, "search_r1_invalid_actions": 0}
    partial = score_response("<answer>Eiffel</answer>", ["Eiffel Tower"], cfg, stats)
    assert partial.acc == 0.0 and partial.format_ok == 1.0 and partial.searches == 3.0
    assert partial.score == pytest.approx(0.5 * (2 / 3) + 0.2)
    sloppy = score_response("<answer>Eiffel Tower</answer>", ["Eiffel Tower"], cfg, {**stats, "search_r1_invalid_actions": 2})
    assert sloppy.format_ok == 0.0 and sloppy.invalid_actions == 2.0 and sloppy.score == pytest.approx(1.5)
    assert set(partial.extra_info()) == {"acc", "f1", "answered", "format_ok", "searches", "invalid_actions"}
    out = compute_score("search_r1/nq", "<answer>Paris</answer>", {"target": ["paris"]}, f1_weight=0.0)
    assert out["score"] == 1.0 and out["acc"] == 1.0


def _compose(model_dir, *overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=[f"actor_rollout_ref.model.path={model_dir}", *overrides])


def _batch(tok, prompt, responses, golds, extra_fields=None):
    p = tok.encode(prompt, add_special_tokens=False)
    rs = [tok.encode(r, add_special_tokens=False) for r in responses]
    width = max(map(len, rs))
    resp = torch.full((len(rs), width), tok.pad_token_id)
    mask = torch.zeros((len(rs), len(p) + width), dtype=torch.long)
    for i, r in enumerate(rs):
        resp[i, : len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    n = len(rs)
    fields = {
        "prompts": torch.tensor([p] * n),
        "responses": resp,
        "attention_mask": mask,
        "data_source": np.array(["search_r1/nq"] * n, dtype=object),
        "reward_model": np.array([{"style": "rule", "ground_truth": {"target": np.array(golds, dtype=object)}}] * n, dtype=object),
    }
    if extra_fields is not None:
        fields["tool_extra_fields"] = np.array(extra_fields, dtype=object)
    return DataProto.from_single_dict(fields)


def test_reward_manager_on_hand_built_dataproto(tiny_qwen_dir, qwen_tokenizer):
    tok = qwen_tokenizer
    # the prompt carries an example answer: it must not count (the original's "two answers" quirk)
    prompt = "Answer inside tags, for example <answer> Beijing </answer>. Question: capital of France?"
    responses = ["<search>capital of France</search>\n\n<information>Doc 1(Title: Paris) Paris is the capital.\n</information>\n\n<answer>Paris</answer>",
                 "<answer>Beijing</answer>", "I do not know."]
    stats = [{"search_r1_searches": 1, "search_r1_invalid_actions": 0}, {"search_r1_searches": 0, "search_r1_invalid_actions": 0},
             {"search_r1_searches": 0, "search_r1_invalid_actions": 2}]
    data = _batch(tok, prompt, responses, ["Paris"], stats)
    manager = SearchR1RewardManager(_compose(tiny_qwen_dir, "+search_r1.reward.format_weight=0.1"), tok, None)
    out = [asyncio.run(manager.run_single(data[i : i + 1])) for i in range(3)]
    assert [o["reward_score"] for o in out] == pytest.approx([1.1, 0.1, 0.0])
    assert out[0]["reward_extra_info"] == {"acc": 1.0, "f1": 1.0, "answered": 1.0, "format_ok": 1.0, "searches": 1.0, "invalid_actions": 0.0}
    assert out[2]["reward_extra_info"]["invalid_actions"] == 2.0 and out[2]["reward_extra_info"]["answered"] == 0.0
    assert all(set(o["reward_extra_info"]) == set(out[0]["reward_extra_info"]) for o in out)


def test_reward_manager_resolves_by_name_and_by_importlib(tiny_qwen_dir, qwen_tokenizer):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    by_name = _compose(tiny_qwen_dir, "reward.reward_manager.name=search_r1")
    assert resolve_reward_manager_cls(by_name) is SearchR1RewardManager
    by_path = _compose(
        tiny_qwen_dir,
        "reward.reward_manager.source=importlib",
        "reward.reward_manager.module.path=pkg://verl_search_r3.search_r1.reward",
        "reward.reward_manager.name=SearchR1RewardManager",
    )
    assert resolve_reward_manager_cls(by_path) is SearchR1RewardManager
    worker = RewardLoopWorker(by_name)  # the real reward-loop worker class, in process
    data = _batch(qwen_tokenizer, "q?", ["<answer>Paris</answer>", "<answer>Rome</answer>"], ["paris"])
    assert [r["reward_score"] for r in asyncio.run(worker.compute_score_batch(data))] == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown search_r1.reward keys"):
        SearchR1RewardManager(_compose(tiny_qwen_dir, "+search_r1.reward.em_weight=2"), qwen_tokenizer, None)
