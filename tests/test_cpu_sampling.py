"""The ``hf`` rollout's sampling core (``verl_search_r3.cpu.sampling``) against independent references:
a hand-written greedy loop and teacher-forced log-softmax over the model's own logits."""

from __future__ import annotations

import pytest
import torch

from verl_search_r3.cpu.sampling import Completion, SamplingParams, generate


def _prompt(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _teacher_forced_logprobs(model, prompt: list[int], out: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(out)[:, None]).squeeze(1)


def test_request_parameters_follow_vllm_and_refuse_what_is_not_implemented():
    p, max_tokens = SamplingParams.from_request(
        {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True, "max_tokens": 7,
         "stop": "</search>", "stop_token_ids": [5, 3], "include_stop_str_in_output": True, "n": 1}
    )
    assert max_tokens == 7 and p.temperature == 0.0 and p.logprobs and p.stop == ("</search>",) and p.stop_token_ids == (5, 3)
    assert SamplingParams.from_request({"max_new_tokens": 4, "logprobs": None}) == (SamplingParams(), 4)
    assert SamplingParams.from_request({"logprobs": 0})[0].logprobs  # vLLM: 0 = the sampled token's log-prob
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams.from_request({"presence_penalty": 0.5})
    with pytest.raises(ValueError, match=r"\['best_of'\]"):
        SamplingParams.from_request({"best_of": 2})


def test_greedy_matches_a_hand_written_loop_and_logprobs_match_teacher_forcing(tiny_qwen):
    model, tok = tiny_qwen
    prompts = [_prompt(tok, "boundary layer"), _prompt(tok, "a much longer query about shock waves on wings")]
    out = generate(model, tok, prompts, [6, 6], SamplingParams(temperature=0.0, logprobs=True))
    for p, c in zip(prompts, out):
        assert c.token_ids == _greedy_reference(model, p, 6)  # left padding does not change the result
        assert c.finish_reason == "length"
        ref = _teacher_forced_logprobs(model, p, c.token_ids, 1.0)
        assert torch.allclose(torch.tensor(c.log_probs), ref, atol=1e-5)


def test_sampled_logprobs_are_those_of_the_temperature_scaled_distribution(tiny_qwen):
    model, tok = tiny_qwen
    p = _prompt(tok, "heat transfer")
    torch.manual_seed(0)
    (c,) = generate(model, tok, [p], [5], SamplingParams(temperature=0.7, top_k=50, top_p=0.9, logprobs=True))
    # before top-k/top-p, as verl's actor computes them (logits / temperature)
    assert torch.allclose(torch.tensor(c.log_probs), _teacher_forced_logprobs(model, p, c.token_ids, 0.7), atol=1e-5)
    # top_k = 1 samples the argmax
    (g,) = generate(model, tok, [p], [5], SamplingParams(temperature=1.0, top_k=1))
    assert g.token_ids == _greedy_reference(model, p, 5) and g.log_probs is None


def test_each_row_stops_at_its_own_limit_stop_token_or_stop_string(tiny_qwen):
    model, tok = tiny_qwen
    p = _prompt(tok, "supersonic flow")

    def sample(**kw):  # batch of one, same seed: the same tokens until a stop
        torch.manual_seed(1)
        return generate(model, tok, [p], [8], SamplingParams(**kw))[0]

    free = sample().token_ids
    assert len(set(free)) == 8, "pick a seed whose sample has distinct tokens"
    assert sample(stop_token_ids=(free[3],)) == Completion(free[:4], None, "stop")  # the stop token is kept, as vLLM does
    short, long = generate(model, tok, [p, p], [2, 5], SamplingParams(temperature=0.0))
    assert (len(short.token_ids), len(long.token_ids)) == (2, 5) and short.token_ids == long.token_ids[:2]

    text = tok.decode(free)
    stop = text[len(tok.decode(free[:2])) : len(tok.decode(free[:4]))]  # a string completed by token 4
    c = sample(stop=(stop,))
    assert c == Completion(free[:4], None, "stop") and tok.decode(c.token_ids).endswith(stop)
    # only the generated text counts: the prompt ends with a newline, a lone newline is no "\n\n"
    newline = generate(model, tok, [p], [3], SamplingParams(temperature=0.0, stop=("\n\n",)))[0]
    assert newline.token_ids[:1] == [tok.encode("\n")[0]] and newline.finish_reason == "stop" and len(newline.token_ids) == 2


def test_abort_ends_the_group_with_partial_tokens(tiny_qwen):
    model, tok = tiny_qwen
    calls = iter(range(100))
    (c,) = generate(model, tok, [_prompt(tok, "wing")], [20], SamplingParams(temperature=0.0), should_abort=lambda: next(calls) >= 3)
    assert c.finish_reason == "aborted" and 0 < len(c.token_ids) < 20
