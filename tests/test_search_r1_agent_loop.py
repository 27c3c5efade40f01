"""search_r1_agent against a scripted LLM server, searching the real Cranfield index (BM25).

The loop is instantiated as verl's AgentLoopWorker does it (registry entry + hydra). Checks: the
token-level loss mask (observation tokens 0, sampled tokens 1), token-in/token-out contexts,
stop strings and budgets, the invalid-action feedback, the final turn, observation truncation,
and the reward of the finished trajectory. Also what verl's own ``tool_agent`` does with our
parser and tool: tool-response tokens get mask 0 there too.
"""

import asyncio

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap, _agent_loop_registry
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from verl_search_r3.search_r1.agent_loop import SearchR1AgentLoop
from verl_search_r3.search_r1.build_index import BuildIndexOptions, build_index
from verl_search_r3.search_r1.config import DEFAULT_INVALID_ACTION_MESSAGE
from verl_search_r3.search_r1.data import DEFAULT_INSTRUCTION
from verl_search_r3.search_r1.reward import SearchR1RewardManager
from verl_search_r3.search_r1.tool import SearchR1Tool

QUESTION = "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft?"
GOLD = ["similarity laws for aerothermoelastic testing"]


@pytest.fixture(scope="module")
def bm25_index(cranfield_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sr1") / "cranfield_bm25")
    build_index(BuildIndexOptions(input=cranfield_dir, output=out, format="beir", retriever="bm25", progress=False))
    return out


class ScriptedServer:
    """Plays back one completion per call (ignoring stop strings, like an engine without them) and
    records every request."""

    def __init__(self, turns):
        self.turns, self.calls = list(turns), []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.calls.append({"request_id": request_id, "prompt_ids": list(prompt_ids), "sampling_params": dict(sampling_params)})
        ids = self.turns.pop(0)
        step = len(self.calls)  # as if the weights were updated between turns (partial rollouts)
        fields = {"global_steps": step, "min_global_steps": step, "max_global_steps": step}
        return TokenOutput(token_ids=ids, log_probs=[-0.25] * len(ids), stop_reason="completed", extra_fields=fields)


def _config(model_dir, index_dir, *overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model_dir}",
                "actor_rollout_ref.rollout.response_length=3000",
                f"+search_r1.retriever.index_dir={index_dir}",
                "+search_r1.retriever.placement=local",
                *overrides,
            ],
        )


def _loop(name, cfg, tok, server, tools=()):
    return hydra.utils.instantiate(
        config=_agent_loop_registry[name],
        trainer_config=DictConfigWrap(cfg),
        server_manager=server,
        tokenizer=tok,
        processor=None,
        hf_model_type="qwen2",
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(cfg.data),
        tools=ToolListWrap(list(tools)),
    )


def _run(loop, question=QUESTION):
    prompt = [{"role": "user", "content": DEFAULT_INSTRUCTION.format(question=question)}]
    return loop.loop.run_until_complete(loop.run({"temperature": 1.0, "top_p": 1.0, "logprobs": True}, raw_prompt=prompt))


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _spans(mask):
    """Runs of equal mask values as (value, start, end)."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


def test_search_invalid_answer_masks_and_reward(tiny_qwen_dir, qwen_tokenizer, bm25_index):
    tok = qwen_tokenizer
    t1 = _enc(tok, "<think>I need the laws.</think><search> similarity laws aeroelastic models heated high speed aircraft </search>")
    t2 = _enc(tok, "<think>Let me think again, without an action.</think>")
    t3_kept = _enc(tok, "<think>Doc 2 says it.</think><answer> Similarity laws for aerothermoelastic testing </answer>")
    t3 = t3_kept + _enc(tok, " and then the model rambles on")  # the engine ignored the stop strings
    server = ScriptedServer([t1, t2, t3])
    loop = _loop("search_r1_agent", _config(tiny_qwen_dir, bm25_index), tok, server)
    assert isinstance(loop, SearchR1AgentLoop) and isinstance(loop.tool, SearchR1Tool)
    out = _run(loop)

    # three generations: each one's sampled tokens are kept exactly (the third cut after </answer>)
    spans = _spans(out.response_mask)
    assert [v for v, _, _ in spans] == [1, 0, 1, 0, 1]
    model = [out.response_ids[s:e] for v, s, e in spans if v == 1]
    assert model == [t1, t2, t3_kept]
    obs1 = tok.decode(out.response_ids[spans[1][1] : spans[1][2]])
    obs2 = tok.decode(out.response_ids[spans[3][1] : spans[3][2]])
    # the real index answered: BM25's top 3 for this Cranfield query, numbered and titled, cut to
    # the 500-token budget (the three abstracts are longer) with the closing tag kept
    assert obs1.startswith("\n\n<information>Doc 1(Title: similarity laws for aerothermoelastic testing .) the similarity laws")
    assert "Doc 2(Title: some structural and aerelastic considerations of high speed flight .)" in obs1
    assert "Doc 3(Title: theory of aircraft structural models subjected to aerodynamic heating" in obs1 and "Doc 4" not in obs1
    assert obs1.endswith("</information>\n\n") and spans[1][2] - spans[1][1] == 500
    assert obs2 == DEFAULT_INVALID_ACTION_MESSAGE
    assert out.response_logprobs == [(-0.25 if m else 0.0) for m in out.response_mask]
    assert out.response_mask[-1] == 1  # the reward lands on a sampled token

    # token-in/token-out: each call's context is the prompt plus exactly the tokens so far
    assert [c["prompt_ids"] for c in server.calls] == [
        out.prompt_ids,
        out.prompt_ids + out.response_ids[: spans[1][2]],
        out.prompt_ids + out.response_ids[: spans[3][2]],
    ]
    params = server.calls[0]["sampling_params"]
    assert params["stop"] == ["</answer>", "</search>"] and params["include_stop_str_in_output"] is True
    assert params["max_tokens"] == 500 and server.calls[1]["sampling_params"]["max_tokens"] == 500
    assert len({c["request_id"] for c in server.calls}) == 1  # one sticky session per trajectory
    assert out.extra_fields == {"search_r1_searches": 1, "search_r1_invalid_actions": 1, "search_r1_answered": 1, "search_r1_turns": 3,
                                "search_r1_refused_searches": 0, "search_r1_truncated_observations": 1, "search_r1_failed_searches": 0,
                                "global_steps": 1, "min_global_steps": 1, "max_global_steps": 3, "turn_scores": [], "tool_rewards": []}
    assert out.num_turns == 6

    # the reward of this trajectory, on the DataProto verl's agent loop builds for the reward loop
    n = len(out.prompt_ids) + len(out.response_ids)
    data = DataProto.from_single_dict({
        "prompts": torch.tensor([out.prompt_ids]),
        "responses": torch.tensor([out.response_ids]),
        "attention_mask": torch.ones((1, n), dtype=torch.long),
        "reward_model": np.array([{"style": "rule", "ground_truth": {"target": np.array(GOLD, dtype=object)}}], dtype=object),
        "tool_extra_fields": np.array([out.extra_fields], dtype=object),
    })
    result = asyncio.run(SearchR1RewardManager(loop.config, tok, None).run_single(data))
    assert result["reward_score"] == 1.0
    assert result["reward_extra_info"] == {"acc": 1.0, "f1": 1.0, "answered": 1.0, "format_ok": 0.0, "searches": 1.0, "invalid_actions": 1.0}


def test_turn_budget_final_turn_and_truncated_observations(tiny_qwen_dir, qwen_tokenizer, bm25_index):
    tok = qwen_tokenizer
    search = _enc(tok, "<search> boundary layer transition </search>")
    cfg = _config(tiny_qwen_dir, bm25_index, "+search_r1.protocol.max_turns=2", "+search_r1.protocol.max_obs_tokens=40")
    server = ScriptedServer([search, search, search])
    out = _run(_loop("search_r1_agent", cfg, tok, server))
    spans = _spans(out.response_mask)
    assert [v for v, _, _ in spans] == [1, 0, 1, 0, 1]  # two searches run, the third (final turn) is refused
    for _, s, e in spans[1::2]:
        assert e - s == 40 and tok.decode(out.response_ids[s:e]).endswith("</information>\n\n")
    assert out.extra_fields["search_r1_searches"] == 2 and out.extra_fields["search_r1_refused_searches"] == 1
    assert out.extra_fields["search_r1_truncated_observations"] == 2 and out.extra_fields["search_r1_answered"] == 0
    assert not server.turns

    # without a final turn the max_turns-th search is not run, and the trajectory ends on sampled tokens
    cfg = _config(tiny_qwen_dir, bm25_index, "+search_r1.protocol.max_turns=2", "+search_r1.protocol.final_turn=false")
    out = _run(_loop("search_r1_agent", cfg, tok, ScriptedServer([search, search])))
    assert [v for v, _, _ in _spans(out.response_mask)] == [1, 0, 1] and out.extra_fields["search_r1_refused_searches"] == 1

    # the response budget: a turn gets what is left, an observation is dropped when nothing could follow it
    long_turn = _enc(tok, "word " * 300)
    n_msg = len(_enc(tok, DEFAULT_INVALID_ACTION_MESSAGE))
    cfg = _config(tiny_qwen_dir, bm25_index, f"actor_rollout_ref.rollout.response_length={len(long_turn) + n_msg + 5}")
    server = ScriptedServer([long_turn, long_turn])
    out = _run(_loop("search_r1_agent", cfg, tok, server))
    assert server.calls[1]["sampling_params"]["max_tokens"] == 5
    assert out.response_mask == [1] * len(long_turn) + [0] * n_msg + [1] * 5 and out.response_ids[-5:] == long_turn[:5]
    cfg = _config(tiny_qwen_dir, bm25_index, f"actor_rollout_ref.rollout.response_length={len(long_turn) + n_msg}")
    server = ScriptedServer([long_turn])
    out = _run(_loop("search_r1_agent", cfg, tok, server))
    assert out.response_ids == long_turn and out.extra_fields["search_r1_invalid_actions"] == 1


def test_a_tool_from_the_tool_yaml_is_used(tiny_qwen_dir, qwen_tokenizer, bm25_index, tmp_path):
    from verl.tools.tool_registry import initialize_tools_from_config

    yaml = tmp_path / "tools.yaml"
    yaml.write_text(
        "tools:\n  - class_name: verl_search_r3.search_r1.tool.SearchR1Tool\n"
        f"    config: {{type: native, topk: 1, retriever: {{index_dir: {bm25_index}, placement: local}}}}\n"
    )
    tools = initialize_tools_from_config(str(yaml))
    tok = qwen_tokenizer
    server = ScriptedServer([_enc(tok, "<search> heat transfer </search>"), _enc(tok, "<answer>x</answer>")])
    out = _run(_loop("search_r1_agent", _config(tiny_qwen_dir, bm25_index), tok, server, tools))
    obs = tok.decode([t for t, m in zip(out.response_ids, out.response_mask) if m == 0])
    assert "Doc 1(Title:" in obs and "Doc 2" not in obs  # topk 1 from the YAML tool


@pytest.mark.parametrize("fmt", ["search_r1", "hermes"])
def test_verl_tool_agent_masks_tool_responses(tiny_qwen_dir, qwen_tokenizer, bm25_index, fmt):
    """verl's own ToolAgentLoop with our tool (and our parser, or hermes): tool-response tokens get mask 0."""
    tok = qwen_tokenizer
    tool = SearchR1Tool({"type": "native", "topk": 2, "retriever": {"index_dir": bm25_index, "placement": "local"}})
    end = tok.convert_tokens_to_ids("<|im_end|>")
    call = {
        "search_r1": "<search> supersonic flow over wings </search>",
        "hermes": '<tool_call>\n{"name": "search", "arguments": {"query": "supersonic flow over wings"}}\n</tool_call>',
    }[fmt]
    t1 = _enc(tok, call) + [end]
    t2 = _enc(tok, "<answer> lift </answer>") + [end]
    cfg = _config(tiny_qwen_dir, bm25_index, f"actor_rollout_ref.rollout.multi_turn.format={fmt}",
                  "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=4000")
    out = _run(_loop("tool_agent", cfg, tok, ScriptedServer([t1, t2]), [tool]))
    spans = _spans(out.response_mask)
    assert [v for v, _, _ in spans] == [1, 0, 1]
    assert out.response_ids[spans[0][1] : spans[0][2]] == t1 and out.response_ids[spans[2][1] : spans[2][2]] == t2
    tool_text = tok.decode(out.response_ids[spans[1][1] : spans[1][2]])
    assert "<tool_response>" in tool_text and "Doc 1(Title:" in tool_text and "Doc 2(Title:" in tool_text
