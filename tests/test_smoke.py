"""``scripts/gpu_smoke.sh``: the GPU runs compose into valid verl configs for every backend choice, and the
``--cpu`` dry run passes through the real recipes on the CPU backend."""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from verl_search_r3.smoke import SmokeConfig, main, recipe, search_r1_overrides, search_r3_overrides, stage1_overrides

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _cfg_job(script, overrides, **env):
    env = {**os.environ, "DATA_DIR": "/data/x", "MODEL_PATH": "/models/m", "INDEX_DIR": "/indexes/x", "LAUNCH": "python3",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env}
    res = subprocess.run(["bash", script, *overrides, "--cfg", "job"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return OmegaConf.create(res.stdout)


@pytest.mark.parametrize("rollout,strategy,remove_padding", [("vllm", "fsdp2", True), ("hf", "fsdp", False)])
def test_gpu_runs_compose_and_validate(rollout, strategy, remove_padding):
    cfg = SmokeConfig(rollout=rollout, strategy=strategy, remove_padding=remove_padding)
    for kind, overrides in (("grpo", search_r3_overrides(cfg, "/ckpt/x")), ("search_r1", search_r1_overrides(cfg, "/ckpt/y"))):
        job = _cfg_job(recipe(cfg, kind), [*overrides, "trainer.total_training_steps=3"])
        validate_config(job, use_reference_policy=need_reference_policy(job), use_critic=need_critic(job))
        arr = job.actor_rollout_ref
        assert (job.trainer.n_gpus_per_node, arr.rollout.tensor_model_parallel_size, arr.rollout.name) == (1, 1, rollout)
        assert arr.actor.strategy == arr.actor.fsdp_config.strategy == arr.ref.fsdp_config.strategy == strategy
        assert arr.model.use_remove_padding is remove_padding and job.data.train_batch_size == 4
        env_vars = job.ray_kwargs.ray_init.get("runtime_env", {}).get("env_vars", {})
        assert (env_vars.get("VERL_USE_EXTERNAL_MODULES") == "verl_search_r3.cpu.hf") is (rollout == "hf")
    sft = _cfg_job(recipe(cfg, "sft"), stage1_overrides(cfg), N_GPUS="1")
    assert sft.trainer.n_gpus_per_node == 1 and sft.engine.strategy == strategy and sft.model.use_remove_padding is remove_padding
    assert sft.trainer.total_training_steps == 5


def test_hf_rollout_registers_without_the_cpu_platform():
    """verl_search_r3.cpu.hf (what --rollout hf loads on a GPU node) registers the hf rollout and no CPU platform."""
    code = ("import os, verl\n"
            "from verl.workers.rollout.replica import RolloutReplicaRegistry\n"
            "from verl.plugin.platform import get_platform\n"
            "print(RolloutReplicaRegistry.get('hf').__name__, get_platform().device_name)")
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    env["VERL_USE_EXTERNAL_MODULES"] = "verl_search_r3.cpu.hf"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    replica, device = res.stdout.split()[-2:]
    assert replica == "HFReplica" and device != "cpu"


@pytest.mark.e2e
def test_cpu_dry_run_passes(cranfield_dir, ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)  # the PPO runs join the test run's cluster
    out = tmp_path / "smoke"
    assert main(["--cpu", "--data", cranfield_dir, "--output", str(out)]) == 0, capsys.readouterr().out
    report = json.loads((out / "smoke.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["stage1", "search_r3", "search_r3 resume", "search_r1", "overhead"]
    assert all(r["ok"] and not r["failed_checks"] for r in runs.values())
    assert runs["stage1"]["figures"]["export has token"] is True
    assert runs["search_r3"]["figures"]["env encoded"] > 0 and runs["search_r3"]["figures"]["snapshot"] is True
    assert runs["search_r3 resume"]["figures"] == {"steps": [4], "env restored": True}
    assert runs["search_r1"]["figures"]["searches/rollout"] == 2.0
    assert runs["overhead"]["figures"]["search_r3 / plain"] > 0
    assert runs["overhead"]["figures"]["embedded"] == 1.0, "the benchmark forces the token: every rollout is embedded"
    table = (out / "smoke.md").read_text()
    assert table.count("| ok |") == 5 and table in capsys.readouterr().out
