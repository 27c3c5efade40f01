"""The GRPO recipes compose with hydra (`--cfg job`, as a user runs them) and pass verl's validate_config."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from verl_search_r3.env import EnvConfig
from verl_search_r3.rl.trainer import SearchR3Settings

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _cfg_job(script, *overrides):
    env = {**os.environ, "DATA_DIR": "/data/sr3", "MODEL_PATH": "/models/stage1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    res = subprocess.run(["bash", os.path.join(ROOT, "recipes", script), *overrides, "--cfg", "job"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return OmegaConf.create(res.stdout)


@pytest.mark.parametrize("script,gpus,tp", [("run_grpo_qwen7b.sh", 8, 2), ("run_grpo_qwen1.5b.sh", 1, 1)])
def test_grpo_recipe_composes_and_validates(script, gpus, tp):
    cfg = _cfg_job(script, "trainer.total_training_steps=3")
    assert cfg.trainer.v1.trainer_mode == "search_r3"
    assert cfg.reward.reward_manager.name == "search_r3"
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "search_r3_agent"
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.actor_rollout_ref.rollout.n >= 5
    assert cfg.actor_rollout_ref.actor.use_kl_loss and cfg.actor_rollout_ref.actor.use_dynamic_bsz
    assert cfg.trainer.n_gpus_per_node == gpus and cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == tp
    assert cfg.actor_rollout_ref.model.path == "/models/stage1"
    assert cfg.search_r3.corpus_path == "/data/sr3/corpus.parquet"
    assert cfg.trainer.total_training_steps == 3  # caller overrides come last and win
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    settings = SearchR3Settings.from_config(cfg)
    assert settings.reward.k == 10 and settings.contrastive.coef > 0


def test_recipe_env_block_lists_every_env_key():
    """Every EnvConfig field is in the YAML, so `search_r3.env.<key>=...` works without '+'."""
    cfg = OmegaConf.load(os.path.join(ROOT, "recipes", "config", "search_r3_grpo.yaml"))
    assert set(cfg.search_r3.env) == set(EnvConfig().to_dict())


def test_misspelled_key_is_refused():
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    res = subprocess.run(["bash", os.path.join(ROOT, "recipes", "run_grpo_qwen7b.sh"), "search_r3.reward.kk=3", "--cfg", "job"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode != 0 and "Could not override 'search_r3.reward.kk'" in res.stderr
