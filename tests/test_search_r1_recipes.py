"""The Search-R1 recipes compose with hydra (`--cfg job`, as a user runs them) and pass verl's validate_config."""

import dataclasses
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from verl_search_r3.search_r1.config import ProtocolConfig, RetrieverConfig, RewardConfig, SearchR1Settings

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ENV = {"DATA_DIR": "/data/sr1", "INDEX_DIR": "/indexes/wiki18", "MODEL_PATH": "/models/qwen3b", "CKPT_DIR": "/ckpt/run"}


def _cfg_job(script, *overrides, **env):
    full_env = {**os.environ, **ENV, **env, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    res = subprocess.run(["bash", os.path.join(ROOT, "recipes", script), *overrides, "--cfg", "job"],
                         capture_output=True, text=True, timeout=300, env=full_env, cwd=ROOT)
    return res


def _compose(script, *overrides, **env):
    res = _cfg_job(script, *overrides, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = OmegaConf.create(res.stdout)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    return cfg


def test_grpo_qwen3b_recipe_has_the_papers_settings():
    cfg = _compose("run_search_r1_grpo_qwen3b.sh", "trainer.total_training_steps=3")
    rollout, actor = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor
    assert rollout.agent.default_agent_loop == "search_r1_agent" and cfg.reward.reward_manager.name == "search_r1"
    assert cfg.algorithm.adv_estimator == "grpo" and rollout.n == 5 and rollout.name == "vllm"
    assert actor.use_kl_loss and actor.kl_loss_coef == 0.001 and actor.kl_loss_type == "low_var_kl"
    assert actor.optim.lr == 1e-6 and actor.optim.lr_warmup_steps_ratio == 0.285 and actor.entropy_coeff == 0.001
    assert cfg.data.train_batch_size == 512 and actor.ppo_mini_batch_size == 256
    assert rollout.temperature == 1.0 and rollout.top_p == 1.0
    assert cfg.data.train_files == "/data/sr1/train.parquet" and cfg.actor_rollout_ref.model.path == "/models/qwen3b"
    assert cfg.trainer.total_training_steps == 3  # caller overrides come last and win
    settings = SearchR1Settings.from_config(cfg)
    p = settings.protocol
    assert (p.max_turns, p.topk, p.turn_max_tokens, p.max_obs_tokens, p.final_turn) == (4, 3, 500, 500, True)
    assert settings.retriever.index_dir == "/indexes/wiki18" and settings.retriever.placement == "ray"
    assert settings.reward == RewardConfig()


@pytest.mark.parametrize("mode", ["frozen", "policy"])
def test_unified_recipe(mode):
    cfg = _compose("run_search_r1_unified.sh", RETRIEVER=mode)
    settings = SearchR1Settings.from_config(cfg)
    assert cfg.trainer.n_gpus_per_node == 7 and settings.retriever.num_gpus == 1 and settings.retriever.reasoning
    assert cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n % 7 == 0
    assert cfg.trainer.default_local_dir == "/ckpt/run"
    if mode == "policy":
        assert settings.retriever.model == "policy" and settings.retriever.policy_checkpoint_dir == "/ckpt/run"
        assert "hf_model" in cfg.actor_rollout_ref.actor.checkpoint.save_contents
    else:
        assert settings.retriever.model is None and "hf_model" not in cfg.actor_rollout_ref.actor.checkpoint.save_contents
    bad = _cfg_job("run_search_r1_unified.sh", RETRIEVER="both")
    assert bad.returncode == 2 and "RETRIEVER must be" in bad.stderr


def test_yaml_lists_every_search_r1_key():
    """Every config field is in the YAML, so `search_r1.<block>.<key>=...` works without '+'."""
    cfg = OmegaConf.load(os.path.join(ROOT, "recipes", "config", "search_r1_grpo.yaml")).search_r1
    for block, cls in (("protocol", ProtocolConfig), ("retriever", RetrieverConfig), ("reward", RewardConfig)):
        assert set(cfg[block]) == {f.name for f in dataclasses.fields(cls)}, block
    defaults = OmegaConf.to_container(cfg.protocol)
    assert ProtocolConfig.from_dict(defaults) == ProtocolConfig()


def test_misspelled_key_is_refused():
    res = _cfg_job("run_search_r1_grpo_qwen3b.sh", "search_r1.protocol.max_turn=3")
    assert res.returncode != 0 and "Could not override 'search_r1.protocol.max_turn'" in res.stderr
