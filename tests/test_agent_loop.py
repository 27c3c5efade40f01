"""search_r3_agent, instantiated as verl's AgentLoopWorker does, against a scripted LLM server."""

import hydra
import pytest
from hydra import compose, initialize_config_module
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap, _agent_loop_registry
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from verl_search_r3.prompts import query_reasoning_messages
from verl_search_r3.rl.agent_loop import RolloutConfig, SearchR3AgentLoop
from verl_search_r3.tokens import embed_token_id


class ScriptedServer:
    """Returns a fixed completion and records the sampling params it was called with."""

    def __init__(self, token_ids):
        self.token_ids, self.calls = token_ids, []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.calls.append(dict(sampling_params))
        return TokenOutput(token_ids=self.token_ids, log_probs=[-0.5] * len(self.token_ids), stop_reason="completed")


def _loop(model_dir, tok, server, *overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.rollout.response_length=6", *overrides],
        )
    return hydra.utils.instantiate(
        config=_agent_loop_registry["search_r3_agent"],
        trainer_config=DictConfigWrap(cfg),
        server_manager=server,
        tokenizer=tok,
        processor=None,
        hf_model_type="qwen2",
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(cfg.data),
        tools=ToolListWrap([]),
    )


def _run(loop):
    # the agent loop binds verl's event loop at construction (as AgentLoopWorker does)
    return loop.loop.run_until_complete(loop.run({"temperature": 1.0, "top_p": 1.0}, raw_prompt=query_reasoning_messages("what is lift?")))


def test_stops_at_the_embed_token_and_keeps_sampled_tokens(tiny_qwen_dir, qwen_tokenizer):
    tok, eid = qwen_tokenizer, embed_token_id(qwen_tokenizer)
    words = tok("lift is an aerodynamic force", add_special_tokens=False)["input_ids"][:4]
    server = ScriptedServer(words + [eid])
    loop = _loop(tiny_qwen_dir, tok, server)
    assert isinstance(loop, SearchR3AgentLoop)
    out = _run(loop)
    assert server.calls[0]["stop_token_ids"] == [eid]
    assert out.response_ids == words + [eid] and out.response_mask == [1] * 5
    assert out.extra_fields["search_r3_forced"] is False
    assert eid in out.prompt_ids  # the system prompt quotes the token; the embedding ignores the prompt


def test_missing_token_penalize_keeps_response_force_appends_masked(tiny_qwen_dir, qwen_tokenizer):
    tok, eid = qwen_tokenizer, embed_token_id(qwen_tokenizer)
    words = tok("one two three four five six seven", add_special_tokens=False)["input_ids"][:6]  # at the limit
    out = _run(_loop(tiny_qwen_dir, tok, ScriptedServer(words)))
    assert out.response_ids == words and eid not in out.response_ids
    forced = _run(_loop(tiny_qwen_dir, tok, ScriptedServer(words[:3]), "+search_r3.rollout.on_missing_token=force"))
    assert forced.response_ids == words[:3] + [eid] and forced.response_mask == [1, 1, 1, 0]
    assert forced.response_logprobs == [-0.5, -0.5, -0.5, 0.0] and forced.extra_fields["search_r3_forced"]
    full = _run(_loop(tiny_qwen_dir, tok, ScriptedServer(words), "+search_r3.rollout.on_missing_token=force"))
    assert len(full.response_ids) == 6 and full.response_ids[-1] == eid and full.response_mask[-1] == 0
    assert full.response_ids[:5] == words[:5]
    nostop = _loop(tiny_qwen_dir, tok, ScriptedServer(words), "+search_r3.rollout.stop_at_embed_token=false")
    _run(nostop)
    assert "stop_token_ids" not in nostop.server_manager.calls[0]
    with pytest.raises(ValueError, match="on_missing_token"):
        RolloutConfig(on_missing_token="truncate")
