"""Stage 1 on verl's SFT trainer (``recipes/run_sft_cpu.sh``, torchrun, gloo) → its Hugging Face
export with ``<|embed_token|>`` → Search-R3 GRPO from that export on two FSDP2 ranks over gloo
(``recipes/run_grpo_cpu.sh``), which splits ``encode_documents`` and the contrastive fields of
the actor update across the ranks (verl's data-parallel dispatch)."""

from __future__ import annotations

import json
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from e2e_run import PPO_TINY, run_recipe
from transformers import AutoTokenizer

from verl_search_r3.tokens import embed_token_id

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reasoning_data(search_r3_data, tmp_path_factory) -> str:
    """``search_r3_data`` with an analysis for every query (what ``build_reasoning`` adds), so SFT and KL have tokens."""
    out = tmp_path_factory.mktemp("reasoning_data")
    for name in os.listdir(search_r3_data):
        shutil.copy(os.path.join(search_r3_data, name), out / name)
    pairs = pq.read_table(out / "pairs.parquet")
    analyses = [f"It asks about {q.split()[0]}." for q in pairs.column("query").to_pylist()]
    pq.write_table(pairs.append_column("reasoning", pa.array(analyses)), out / "pairs.parquet")
    return str(out)


def test_stage1_export_then_grpo_on_two_ranks(reasoning_data, search_r3_data, stage1_base, ray_cluster, tmp_path):
    export = tmp_path / "export"
    sft, _ = run_recipe(
        "run_sft_cpu.sh", tmp_path / "sft",
        ["trainer.total_training_steps=3", "trainer.test_freq=3", "trainer.save_freq=3", "trainer.logger=[console,file]",
         "data.train_batch_size=4", "data.max_token_len_per_gpu=2048", "data.search_r3.num_negatives=2",
         "data.search_r3.query_max_length=320", "data.search_r3.doc_max_length=128"],  # the tiny tokenizer spells the reasoning prompt in ~230 tokens
        timeout=300, DATA_DIR=reasoning_data, MODEL_PATH=stage1_base, EXPORT_DIR=str(export), CKPT_DIR=str(tmp_path / "sft_ckpt"),
    )
    assert {1, 2, 3} <= set(sft)
    for step in (1, 2, 3):
        for key in ("search_r3/sft", "search_r3/infonce", "search_r3/triplet"):
            assert math.isfinite(sft[step][key]), (step, key)
    assert max(sft[step]["search_r3/sft"] for step in (1, 2, 3)) > 0  # the reasoning form of half the queries is trained
    assert "val/loss" in sft[3]

    tok = AutoTokenizer.from_pretrained(export)
    token = embed_token_id(tok)  # Stage 1 added it: the base model lacks it
    with open(export / "config.json") as f:
        assert json.load(f)["vocab_size"] > token
    with pytest.raises(ValueError):
        embed_token_id(AutoTokenizer.from_pretrained(stage1_base))

    metrics, log = run_recipe(
        "run_grpo_cpu.sh", tmp_path / "grpo",
        [*PPO_TINY, "trainer.n_gpus_per_node=2", "trainer.total_training_steps=2", "trainer.save_freq=-1", "trainer.test_freq=-1",
         "data.max_response_length=16", "search_r3.doc_max_length=64", "search_r3.reward_candidates=20",
         "search_r3.contrastive.num_negatives=3", "search_r3.env.candidates_k=8", "search_r3.env.graph_k=4",
         # the export never samples the token yet: append it (loss mask 0) so every rollout is embedded
         "search_r3.rollout.on_missing_token=force"],
        timeout=420, ray_address=ray_cluster, DATA_DIR=search_r3_data, MODEL_PATH=str(export), CKPT_DIR=str(tmp_path / "ckpt"),
    )
    assert sorted(metrics) == [1, 2]
    assert "full encode v0" in log and metrics[1]["env/index_n_vectors"] > 0
    assert metrics[2]["env/n_encoded"] > 0, "encode_documents during a step, split over the two ranks"
    for m in metrics.values():
        assert m["actor/embed_found_frac"] == 1.0
        assert math.isfinite(m["actor/contrastive_loss"]) and m["actor/contrastive_loss"] > 0
        assert m["search_r3/format_ok"] == 1.0
        assert m["search_r3/forced"] > 0.5, "a random export rarely samples the token: search_r3_agent appends it"
