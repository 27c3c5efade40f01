"""The ``hf`` rollout server (``verl_search_r3.cpu.server.HFServer``) in-process: batching of concurrent
requests, verl's token budget, weight updates, and the lifecycle calls verl's trainer makes."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from verl_search_r3.cpu.sampling import SamplingParams, generate
from verl_search_r3.cpu.server import HFEngineOptions, HFServer, token_budget

pytest.importorskip("verl")
from verl.workers.config import RolloutConfig  # noqa: E402


def _config(**kw) -> RolloutConfig:
    return RolloutConfig(name="hf", prompt_length=32, response_length=6, tensor_model_parallel_size=1, **kw)


@pytest.fixture()
def server(tiny_qwen_dir):
    return HFServer(_config(), {"path": tiny_qwen_dir, "override_config": {"attn_implementation": "sdpa"}}, replica_rank=0)


def _prompt(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_token_budget_is_verls():
    cfg = _config()
    assert token_budget(cfg, 10, None) == 6  # response_length
    assert token_budget(cfg, 35, None) == 3  # prompt + response budget left
    assert token_budget(cfg, 35, 100) == 3  # clamped to max_model_len - prompt
    assert token_budget(cfg, 10, 0) == 1
    with pytest.raises(ValueError, match="no room"):
        token_budget(cfg, 38, None)


def test_engine_options_are_checked():
    assert HFEngineOptions.from_config(None) == HFEngineOptions()
    with pytest.raises(ValueError, match="batch_wait"):
        HFEngineOptions.from_config({"batch_wait": 5})
    with pytest.raises(ValueError, match="dtype"):
        HFEngineOptions.from_config({"dtype": "int8"})


def test_concurrent_requests_are_served_as_generate_would(server):
    tok, model = server.tokenizer, server.model
    prompts = [_prompt(tok, "boundary layer"), _prompt(tok, "heat transfer in a hypersonic nozzle")]
    requests = [
        (prompts[0], {"temperature": 0, "max_tokens": 3, "logprobs": True}),
        (prompts[1], {"temperature": 0}),
        (prompts[1], {"temperature": 0, "max_tokens": 2}),
    ]

    async def run():
        server.global_steps = 7
        return await asyncio.gather(*[server.generate(p, sp, request_id=str(i)) for i, (p, sp) in enumerate(requests)])

    out = asyncio.run(run())
    assert [len(o.token_ids) for o in out] == [3, 6, 2]
    for o, (p, _) in zip(out, requests):
        ref = generate(model, tok, [p], [len(o.token_ids)], SamplingParams(temperature=0.0))[0]
        assert o.token_ids == ref.token_ids and o.stop_reason == "completed" and o.extra_fields["global_steps"] == 7
    assert len(out[0].log_probs) == 3 and out[1].log_probs is None
    with pytest.raises(ValueError, match="text-only"):
        asyncio.run(server.generate(prompts[0], {}, request_id="x", image_data=[1]))


def test_weight_updates_change_the_policy_and_a_missing_step_keeps_the_version(server, tiny_qwen_dir):
    tok = server.tokenizer
    p = _prompt(tok, "wing")
    other = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    want = generate(other, tok, [p], [6], SamplingParams(temperature=0.0))[0].token_ids
    before = asyncio.run(server.generate(p, {"temperature": 0}, request_id="a")).token_ids
    assert before != want

    state = dict(other.named_parameters())  # tied: no lm_head.weight, which the server accepts
    asyncio.run(server.update_weights({k: v.detach() for k, v in state.items()}, global_steps=3))
    after = asyncio.run(server.generate(p, {"temperature": 0}, request_id="b"))
    assert after.token_ids == want and after.extra_fields["global_steps"] == 3
    asyncio.run(server.update_weights({k: v.detach() for k, v in state.items()}, global_steps=None))  # verl's sync after validation
    assert server.global_steps == 3

    with pytest.raises(ValueError, match="not in the model"):
        asyncio.run(server.update_weights({"model.nope.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="lacks weights"):
        asyncio.run(server.update_weights({"model.norm.weight": state["model.norm.weight"].detach()}))


def test_sleep_wake_abort_and_resume(server):
    p = _prompt(server.tokenizer, "flow")

    async def run():
        await server.sleep()
        with pytest.raises(RuntimeError, match="asleep"):
            await server.generate(p, {}, request_id="a")
        await server.wake_up(tags=["weights"])
        await server.abort_all_requests(reject_request=True)
        rejected = await server.generate(p, {}, request_id="b")
        await server.resume_generation()
        served = await server.generate(p, {"max_tokens": 2}, request_id="c")
        # without reject_request, a request waits behind the closed gate until resume_generation
        await server.abort_all_requests()
        parked = asyncio.create_task(server.generate(p, {"max_tokens": 2}, request_id="d"))
        await asyncio.sleep(0.05)
        assert not parked.done()
        await server.resume_generation()
        return rejected, served, await parked

    rejected, served, parked = asyncio.run(run())
    assert rejected.stop_reason == "aborted" and rejected.token_ids == []
    assert served.stop_reason == "completed" and len(served.token_ids) == 2
    assert parked.stop_reason == "completed" and len(parked.token_ids) == 2
