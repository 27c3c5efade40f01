"""The offline tiny models: the small BPE tokenizer round-trips text and a scripted policy follows its script."""

import torch

from verl_search_r3.tiny import tiny_policy, tiny_tokenizer, transitions
from verl_search_r3.tokens import EMBED_TOKEN, add_embed_token

TEXTS = ["The boundary layer of a flat plate in supersonic flow.", "Heat transfer at the stagnation point."] * 20


def test_tiny_tokenizer_round_trips_and_has_a_chat_template():
    tok = tiny_tokenizer(TEXTS, vocab_size=300, words=("<search>",))
    text = "Wing flutter at Mach 2 <search> ümlaut"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode("<search>", add_special_tokens=False)) == 1
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_scripted_policy_samples_its_script():
    tok = tiny_tokenizer(TEXTS + ["The query"])
    add_embed_token(tok)
    reply = f" The query{EMBED_TOKEN}"
    model = tiny_policy(tok, transitions(tok, ["\n"], reply), seed=1)
    prompt = tok.apply_chat_template([{"role": "user", "content": "boundary layer"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    torch.manual_seed(0)
    out = model.generate(ids, do_sample=True, temperature=1.0, max_new_tokens=len(tok.encode(reply)), pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:]) == reply
