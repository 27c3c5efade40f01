"""The CPU recipes compose with hydra (``--cfg job``, as a user runs them) into verl configs for the CPU
backend that pass verl's ``validate_config``; the Ray-attach overrides compose too. (The e2e tests run
all three recipes for real; this checks their defaults.)"""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from verl_search_r3.cpu.launch import attach_overrides

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ENV = {"DATA_DIR": "/data/d", "INDEX_DIR": "/indexes/bm25", "MODEL_PATH": "/models/m", "CKPT_DIR": "/ckpt/run"}


def _compose(script: str, *overrides: str) -> OmegaConf:
    env = {**os.environ, **ENV, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    res = subprocess.run(["bash", os.path.join(ROOT, "recipes", script), *overrides, "--cfg", "job", "--resolve"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = OmegaConf.create(res.stdout)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    return cfg


@pytest.mark.parametrize("script,trainer_mode,agent", [
    ("run_grpo_cpu.sh", "search_r3", "search_r3_agent"),
    ("run_search_r1_cpu.sh", "sync", "search_r1_agent"),
])
def test_cpu_recipe_is_the_gpu_recipe_on_the_cpu_backend(script, trainer_mode, agent):
    attach = attach_overrides({"VERL_FILE_LOGGER_PATH": "/runs/m.jsonl"})
    cfg = _compose(script, "trainer.n_gpus_per_node=2", *attach)
    arr = cfg.actor_rollout_ref
    assert cfg.trainer.v1.trainer_mode == trainer_mode and arr.rollout.agent.default_agent_loop == agent
    assert arr.rollout.name == "hf" and arr.rollout.tensor_model_parallel_size == 1
    assert arr.actor.strategy == arr.ref.strategy == arr.actor.fsdp_config.strategy == arr.ref.fsdp_config.strategy == "fsdp2"
    assert arr.actor.fsdp_config.mixed_precision.param_dtype == arr.ref.fsdp_config.mixed_precision.param_dtype == "fp32"
    assert arr.model.override_config.attn_implementation == "sdpa" and not arr.model.use_remove_padding
    assert arr.model.path == "/models/m" and cfg.trainer.device == "cpu" and cfg.trainer.default_local_dir == "/ckpt/run"
    assert arr.rollout.agent.num_workers == cfg.reward.num_workers == cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1
    ray_init = cfg.ray_kwargs.ray_init
    assert ray_init.num_cpus is None and ray_init.num_gpus is None  # attached: the cluster's resources count
    assert dict(ray_init.runtime_env.env_vars) == {
        "VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "verl_search_r3.cpu", "VERL_FILE_LOGGER_PATH": "/runs/m.jsonl",
    }
    # on its own cluster: one logical GPU per training process
    backend = OmegaConf.load(os.path.join(ROOT, "recipes", "config", "backend", "cpu.yaml"))
    assert OmegaConf.to_container(backend.ray_kwargs.ray_init)["num_gpus"] == "${trainer.n_gpus_per_node}"


def test_sft_cpu_recipe_composes():
    env = {**os.environ, **ENV, "LAUNCH": sys.executable, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    res = subprocess.run(["bash", os.path.join(ROOT, "recipes", "run_sft_cpu.sh"), "--cfg", "job"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = OmegaConf.create(res.stdout)
    assert cfg.engine.strategy == "fsdp2" and cfg.engine.mixed_precision.param_dtype == "fp32" and cfg.trainer.device == "cpu"
    assert cfg.model.path == "/models/m" and cfg.model.override_config.attn_implementation == "sdpa"
    assert cfg.data.train_files == "/data/d/pairs.parquet" and cfg.search_r3.export_dir == os.path.expanduser("~/models/search_r3_stage1_cpu")
