"""Shared fixtures: a tiny random Qwen2 with a real (offline) Qwen tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from verl_search_r3.tiny import build_tiny_qwen2, load_qwen_tokenizer  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen():
    """(model, tokenizer): random tied Qwen2 (hidden 64, 2 layers) with <|embed_token|>. Do not mutate."""
    return build_tiny_qwen2()


@pytest.fixture()
def qwen_tokenizer():
    """A fresh Qwen tokenizer with <|embed_token|> (safe to mutate)."""
    return load_qwen_tokenizer()


@pytest.fixture(scope="session")
def cranfield_dir():
    path = os.path.abspath(os.path.join(SHARED_DATA, "cranfield"))
    if not os.path.isdir(path):
        pytest.skip("../shared/data/cranfield is not present")
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tiny_qwen, tmp_path_factory):
    """The tiny model and its tokenizer saved as an HF folder (usable as actor_rollout_ref.model.path)."""
    model, tok = tiny_qwen
    path = tmp_path_factory.mktemp("tiny_qwen")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
