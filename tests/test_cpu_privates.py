"""Each verl internal the CPU backend relies on, checked against the installed verl: if verl changes
one, these fail with the name of what changed (see ``verl_search_r3/cpu/compat.py``)."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest

from verl_search_r3.cpu.compat import SUPPORTED_VERL, require_verl


def test_the_installed_verl_is_the_supported_one():
    require_verl("anything")
    assert version("verl") in SUPPORTED_VERL


@pytest.mark.parametrize("installed", ["0.8.5", "0.10.0"])
def test_other_verl_versions_are_refused_with_the_supported_range(installed):
    with pytest.raises(RuntimeError, match=r"_ROLLOUT_REGISTRY.*>=0\.9\.1,<0\.10.*0\." + installed.split(".")[1]):
        require_verl("verl.workers.rollout.base._ROLLOUT_REGISTRY", installed=installed)


def test_worker_side_rollout_registry_is_a_private_dict_read_by_get_rollout_class():
    from verl.workers.rollout import base

    assert isinstance(base._ROLLOUT_REGISTRY, dict)
    assert all(isinstance(k, tuple) and len(k) == 2 and isinstance(v, str) for k, v in base._ROLLOUT_REGISTRY.items())
    assert "_ROLLOUT_REGISTRY[(rollout_name, mode)]" in inspect.getsource(base.get_rollout_class)


def test_fsdp_engine_pins_memory_for_forward_only_modules_in_build_fsdp_module():
    from verl.workers.config.engine import EngineConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    assert list(inspect.signature(FSDPEngine._build_fsdp_module).parameters) == ["self", "module"]
    source = inspect.getsource(FSDPEngine._build_fsdp_module)
    assert "if self.engine_config.offload_policy or self.engine_config.forward_only:" in source
    assert "CPUOffloadPolicy(pin_memory=True)" in source
    assert "forward_only" in EngineConfig._mutable_fields  # the CPU engine toggles it around the call


def test_process_group_initialisers_build_the_backend_string_the_patch_replaces():
    import verl.utils.distributed as dist
    import verl.workers.engine_workers as workers

    ray_sig = inspect.signature(dist.initialize_global_process_group_ray.__wrapped__ if hasattr(dist.initialize_global_process_group_ray, "__wrapped__") else dist.initialize_global_process_group_ray)
    assert list(ray_sig.parameters) == ["timeout_second", "backend"]
    torchrun = dist.initialize_global_process_group
    torchrun = getattr(torchrun, "__wrapped__", torchrun)
    assert list(inspect.signature(torchrun).parameters) == ["timeout_second"]
    assert 'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in inspect.getsource(torchrun)
    assert "initialize_global_process_group_ray" in vars(workers)  # bound by name at import (patched there too)


def test_replicas_publish_their_server_through_protected_attributes():
    from verl.workers.rollout.replica import RolloutReplica

    init = inspect.getsource(RolloutReplica.__init__)
    assert "self._server_handle" in init and "self._server_address" in init
    assert "return self._server_handle" in inspect.getsource(RolloutReplica.server_handle.fget)
    assert "return self._server_address" in inspect.getsource(RolloutReplica.server_address.fget)
