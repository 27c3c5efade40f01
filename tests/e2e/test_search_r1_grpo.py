"""Search-R1 GRPO through verl's real trainer (``recipes/run_search_r1_cpu.sh``) on the CPU backend:
multi-turn rollouts with BM25 search over a Cranfield slice, observations masked from the loss.

The policy is a scripted tiny model (:func:`verl_search_r3.tiny.tiny_policy`) that opens every turn with
``<search> boundary layer</search>``: each rollout searches twice (``max_turns=2``), then has a
final turn (where a search is refused), so the ``hf`` rollout's stop strings, the search tool, the BM25 retriever actor and the
observation masking all run.
"""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
import pytest
from e2e_run import PPO_TINY, SEARCH_QUERY, run_recipe

from verl_search_r3.retrieval.bm25 import BM25Retriever

pytestmark = pytest.mark.e2e


def test_search_r1_grpo_multi_turn_with_bm25(search_r1_data, search_r1_policy, cranfield_slice, ray_cluster, tmp_path):
    data, index = search_r1_data
    metrics, _ = run_recipe(
        "run_search_r1_cpu.sh", tmp_path / "run",
        [*PPO_TINY, "data.max_response_length=256", "search_r1.protocol.turn_max_tokens=32",
         "search_r1.protocol.max_obs_tokens=64", "actor_rollout_ref.actor.entropy_coeff=0",
         "trainer.total_training_steps=2", "trainer.test_freq=2", "trainer.save_freq=-1",
         f"trainer.rollout_data_dir={tmp_path / 'rollouts'}"],
        timeout=420, ray_address=ray_cluster, DATA_DIR=data, INDEX_DIR=index, MODEL_PATH=search_r1_policy,
        CKPT_DIR=str(tmp_path / "ckpt"),
    )
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        # prompt, then per search round a generation and an observation, then the final generation
        assert m["training/num_turns/min"] == 6
        # observation tokens have rollout log-prob 0 (probability 1); were any in the response mask,
        # the rollout/trainer probability gap would be about 1 there
        assert m["training/rollout_probs_diff_max"] < 1e-3
    val = metrics[2]
    assert [v for k, v in val.items() if k.endswith("/searches/mean@1")] == [2.0]
    assert [v for k, v in val.items() if k.endswith("/invalid_actions/mean@1")] == [0.0]

    # what the policy read: BM25's best document for its query, in each of its two <information> blocks
    ids, _ = BM25Retriever.load(os.path.join(index, "bm25")).search([SEARCH_QUERY], 1)
    title = {r["doc_id"]: r["title"] for r in pq.read_table(os.path.join(index, "corpus.parquet")).to_pylist()}[ids[0][0]]
    rows = []
    for path in glob.glob(str(tmp_path / "rollouts" / "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    assert len(rows) == 2 * 4 * 2, "two steps of 4 queries x 2 rollouts dumped"
    for row in rows:
        text = row["output"]
        assert text.count(f"<search> {SEARCH_QUERY}</search>") == 3, text  # two searches, then one refused in the final turn
        assert text.count("<information>") == 2 and text.count(f"(Title: {title}") == 2, text
