"""Search-R3 GRPO through verl's real trainer (``recipes/run_grpo_cpu.sh``) on the CPU backend.

Two steps with validation and a checkpoint (with the environment snapshot), then a second run that
resumes from that checkpoint for one more step. The policy is a scripted tiny model
(:func:`verl_search_r3.tiny.tiny_policy`) that ends every analysis with ``<|embed_token|>``, so the embedding,
reward and contrastive paths all carry real values.
"""

from __future__ import annotations

import math
import os
import time

import pytest
from e2e_run import PPO_TINY, run_recipe

from verl_search_r3.env.actor import shard_name
from verl_search_r3.env.config import EnvConfig

pytestmark = pytest.mark.e2e

SEARCH_R3_TINY = [
    *PPO_TINY,
    "data.max_response_length=16",
    "search_r3.doc_max_length=64",
    "search_r3.reward_candidates=20",
    "search_r3.contrastive.num_negatives=3",
    "search_r3.env.candidates_k=8",
    "search_r3.env.expand_top=2",
    "search_r3.env.graph_k=4",
    "trainer.save_freq=2",
    "trainer.test_freq=2",
    "trainer.total_epochs=2",  # 9 training queries: 2 batches per epoch
]


def test_grpo_two_steps_then_resume_from_the_checkpoint(search_r3_data, search_r3_policy, ray_cluster, tmp_path):
    env = dict(DATA_DIR=search_r3_data, MODEL_PATH=search_r3_policy, CKPT_DIR=str(tmp_path / "ckpt"))
    metrics, log = run_recipe("run_grpo_cpu.sh", tmp_path / "run", [*SEARCH_R3_TINY, "trainer.total_training_steps=2"],
                              timeout=420, ray_address=ray_cluster, **env)

    assert sorted(metrics) == [1, 2]
    for step, m in metrics.items():
        assert m["training/global_step"] == step
        assert m["search_r3/format_ok"] == 1.0, "the scripted policy always ends with the embed token"
        assert m["search_r3/forced"] == 0.0, "... by itself: search_r3_agent appended none"
        assert m["actor/embed_found_frac"] == 1.0
        assert math.isfinite(m["actor/contrastive_loss"]) and m["actor/contrastive_loss"] > 0
        assert 0.0 <= m["search_r3/ndcg"] <= 1.0 and m["search_r3/first_relevant_rank"] >= 1
        assert m["training/rollout_probs_diff_max"] < 1e-3, "hf rollout and FSDP log-probs disagree"
    assert "full encode v0" in log, "the corpus is encoded by the initial policy at start-up"
    assert metrics[1]["env/n_encoded"] == 0, "step 1 runs the policy that encoded the corpus: nothing is stale"
    assert metrics[2]["env/n_encoded"] > 0, "step 2 re-encodes the candidates the step-1 update made stale"
    assert any(k.startswith("val-core/search_r3/") and k.endswith("/reward/mean@1") for k in metrics[2]), sorted(metrics[2])
    assert any(k.startswith("val-search_r3/") for k in metrics[2]), "validation metrics of the search_r3 reward (issue 15)"
    assert os.path.isdir(tmp_path / "ckpt" / "global_step_2" / "search_r3_env")
    assert _shard_gone(), "the recipe's environment shards must end with the run, not live on in the shared cluster"

    resumed, log = run_recipe("run_grpo_cpu.sh", tmp_path / "resume", [*SEARCH_R3_TINY, "trainer.total_training_steps=3"],
                              timeout=300, ray_address=ray_cluster, **env)
    assert sorted(resumed) == [3], "the resumed run continues at step 3"
    m = resumed[3]
    assert m["training/global_step"] == 3
    assert "full encode" not in log, "the environment must come from the snapshot, not be encoded again"
    # restored vectors keep the versions they had at step 2 (0 or 1), so the step-3 policy (version 2)
    # finds them stale; a fresh encode at start-up would have made them all version 2
    assert m["env/requested_max_age"] >= 1 and m["env/n_encoded"] > 0
    assert m["actor/embed_found_frac"] == 1.0 and math.isfinite(m["actor/contrastive_loss"])


def _shard_gone(seconds: float = 30.0) -> bool:
    """Whether the recipe's environment shard is gone from the test run's Ray cluster (the death of
    the run's processes reaches Ray shortly after they exit)."""
    import ray

    cfg = EnvConfig()  # the recipe's name and namespace
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get_actor(shard_name(cfg, 0), namespace=cfg.namespace)
        except ValueError:
            return True
        time.sleep(0.5)
    return False
