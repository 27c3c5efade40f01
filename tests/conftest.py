"""Shared fixtures: a tiny random Qwen2 with a real (offline) Qwen tokenizer, and one Ray cluster per run."""

from __future__ import annotations

import os
import shutil
import tempfile

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


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test run; yields its address (``RAY_ADDRESS`` for subprocesses).

    In-process tests use it directly (this process is its driver); the end-to-end runs' ``main_ppo``
    processes attach to it (``verl_search_r3.cpu.launch.attach_overrides``) instead of starting a
    cluster each. Resources are logical: 32 CPUs (verl's placement groups ask 3 per training
    process, our actors 1-2 each; leftovers of one test never starve the next) and 2 GPUs (one per
    FSDP rank of the CPU backend). Its own temporary folder; shut down and removed at the end.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="sr3ray")
    ray.init(num_cpus=32, num_gpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
