"""The CPU backend as verl sees it, in fresh processes: nothing changes unless ``VERL_PLATFORM=cpu``
selects it; selected, verl's registries resolve to the CPU pieces and gloo is the default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STATE = """
import json, verl
from verl.plugin.platform import PlatformRegistry, get_platform
from verl.workers.engine import EngineRegistry
from verl.workers.rollout import base
from verl.workers.rollout.replica import RolloutReplicaRegistry
import verl.utils.distributed as dist
print(json.dumps({
    "platforms": sorted(PlatformRegistry.registered_names()),
    "device": get_platform().device_name,
    "lm_engine_devices": sorted(map(str, EngineRegistry._engines["language_model"]["fsdp2"])),
    "rollouts": sorted(map(str, base._ROLLOUT_REGISTRY)),
    "replicas": sorted(RolloutReplicaRegistry._registry),
    "process_group": dist.initialize_global_process_group_ray.__module__,
}))
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=300)


def _state(**env: str) -> dict:
    res = _python(STATE, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_verl_is_unchanged_unless_the_cpu_platform_is_selected():
    plain = _state()
    loaded = _state(VERL_USE_EXTERNAL_MODULES="verl_search_r3.cpu")  # loaded, not selected
    assert loaded == plain
    assert "cpu" not in plain["platforms"] and "cpu" not in plain["lm_engine_devices"]
    assert not any("hf" in r for r in plain["rollouts"]) and "hf" not in plain["replicas"]
    assert plain["process_group"] == "verl.utils.distributed"


def test_selected_backend_resolves_through_verls_own_lookups():
    code = """
import json, os, torch
import verl
from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_torch_device, get_resource_name
from verl.workers.engine import EngineRegistry
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import get_rollout_replica_class
from verl.utils.distributed import initialize_global_process_group_ray
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
initialize_global_process_group_ray()
x = torch.ones(3); torch.distributed.all_reduce(x)
dev = get_torch_device(); dev.empty_cache(); dev.synchronize(); dev.manual_seed(0)
print(json.dumps({
    "device": get_device_name(), "device_id": get_device_id(), "collective": get_nccl_backend(), "ray_resource": get_resource_name(),
    "memory": [dev.memory_allocated(), dev.max_memory_reserved()], "free": dev.mem_get_info()[0] > 0,
    "engine": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
    "critic": EngineRegistry.get_engine_cls("value_model", "fsdp2").__name__,
    "adapter": get_rollout_class("hf", "async").__name__, "replica": get_rollout_replica_class("hf").__name__,
    "backend": torch.distributed.get_backend(), "sum": x.tolist(),
}))
"""
    res = _python(code, VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_MODULES="verl_search_r3.cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {
        "device": "cpu", "device_id": "cpu", "collective": "gloo", "ray_resource": "GPU", "memory": [0, 0], "free": True,
        "engine": "CPUFSDPEngineWithLMHead", "critic": "CPUFSDPEngineWithValueHead",
        "adapter": "HFServerAdapter", "replica": "HFReplica", "backend": "cpu:gloo", "sum": [1.0, 1.0, 1.0],
    }


def test_loading_after_verl_chose_its_platform_is_refused_with_the_fix():
    res = _python(
        "import os, verl\nfrom verl.plugin.platform import get_platform\nget_platform()\n"
        "os.environ['VERL_PLATFORM'] = 'cpu'\nimport verl_search_r3.cpu\n"
    )
    assert res.returncode != 0
    assert "VERL_USE_EXTERNAL_MODULES=verl_search_r3.cpu" in res.stderr and "VERL_PLATFORM=cpu" in res.stderr


@pytest.mark.parametrize("strategy,offload,message", [("fsdp", False, "FSDP2 only"), ("fsdp2", True, "offload_policy")])
def test_cpu_engine_refuses_what_cannot_run_on_host_memory(strategy, offload, message):
    from types import SimpleNamespace

    from verl_search_r3.cpu.engine import CPUFSDPEngineWithLMHead

    engine = object.__new__(CPUFSDPEngineWithLMHead)
    engine.engine_config = SimpleNamespace(strategy=strategy, offload_policy=offload, forward_only=True)
    with pytest.raises(ValueError, match=message):
        engine._build_fsdp_module(None)
