"""The Stage-1 recipes compose with hydra's ``--cfg job`` into a config the trainer accepts."""

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import yaml
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass

from verl_search_r3.stage1.data import GroupDataConfig
from verl_search_r3.stage1.trainer import Stage1Config, _check_config

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """``--cfg job`` output of both scripts (run side by side), parsed."""
    home = str(tmp_path_factory.mktemp("home"))
    env = {**os.environ, "HOME": home, "LAUNCH": sys.executable, "HF_HUB_OFFLINE": "1"}
    procs = {
        name: subprocess.Popen(
            ["bash", os.path.join(RECIPES, f"run_sft_{name}.sh"), "trainer.total_epochs=3", "--cfg", "job"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in ("qwen7b", "qwen1.5b")
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = yaml.safe_load(stdout)
    return home, out


def test_recipes_compose_with_the_expected_keys(composed):
    home, cfgs = composed
    big, small = cfgs["qwen7b"], cfgs["qwen1.5b"]
    for cfg in (big, small):
        assert cfg["data"]["train_files"] == os.path.join(home, "data/search_r3/pairs.parquet")
        assert cfg["data"]["pad_mode"] == "no_padding" and cfg["model"]["lora_rank"] == 0
        assert "hf_model" in cfg["checkpoint"]["save_contents"]
        assert cfg["engine"]["ulysses_sequence_parallel_size"] == 1
        assert cfg["trainer"]["total_epochs"] == 3  # extra arguments reach hydra last
        assert cfg["data"]["search_r3"] == big["data"]["search_r3"]
        assert cfg["search_r3"]["loss"] == asdict(Stage1Config().loss)
    assert big["model"]["path"] == os.path.join(home, "models/Qwen2.5-7B-Instruct")
    assert big["search_r3"]["export_dir"] == os.path.join(home, "models/search_r3_stage1_qwen2.5_7b")
    assert big["trainer"]["n_gpus_per_node"] == 8 and big["data"]["train_batch_size"] == 128
    assert small["model"]["path"] == os.path.join(home, "models/Qwen2.5-1.5B-Instruct")
    assert small["search_r3"]["export_dir"] == os.path.join(home, "models/search_r3_stage1_qwen2.5_1.5b")
    assert small["trainer"]["n_gpus_per_node"] == 1 and small["data"]["train_batch_size"] == 32
    assert small["search_r3"]["ref_param_offload"] is False and small["trainer"]["experiment_name"] == "sft_qwen2.5_1.5b"


def test_composed_configs_pass_the_trainer_checks_and_verl_dataclasses(composed):
    for cfg in composed[1].values():
        conf = OmegaConf.create(cfg)
        stage1 = Stage1Config.from_config(conf.search_r3)
        data = GroupDataConfig.from_config(conf.data.search_r3)
        _check_config(conf, stage1, data)
        omega_conf_to_dataclass(conf.engine)
        omega_conf_to_dataclass(conf.optim)
        omega_conf_to_dataclass(conf.checkpoint)


def test_config_file_defaults_are_the_code_defaults():
    with open(os.path.join(RECIPES, "config", "search_r3_sft.yaml"), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    assert raw["search_r3"] == asdict(Stage1Config())
    assert raw["data"]["search_r3"] == asdict(GroupDataConfig())


def test_trainer_refuses_settings_it_cannot_honour():
    base = {
        "checkpoint": {"save_contents": ["model", "hf_model"]},
        "model": {"lora_rank": 0, "use_fused_kernels": False},
        "engine": {"pad_to_length": False},
        "data": {"pad_mode": "no_padding", "use_dynamic_bsz": True, "max_token_len_per_gpu": 16384},
    }
    stage1, data = Stage1Config(), GroupDataConfig()
    _check_config(OmegaConf.create(base), stage1, data)
    for key, value, match in [
        ("checkpoint.save_contents", ["model"], "hf_model"),
        ("model.lora_rank", 8, "lora_rank=0"),
        ("model.use_fused_kernels", True, "use_fused_kernels"),
        ("engine.ulysses_sequence_parallel_size", 2, "ulysses_sequence_parallel_size=1"),
        ("data.max_token_len_per_gpu", 1024, "longest possible group"),
    ]:
        conf = OmegaConf.create(base)
        OmegaConf.update(conf, key, value)
        with pytest.raises(ValueError, match=match):
            _check_config(conf, stage1, data)
