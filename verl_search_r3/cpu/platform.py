"""The ``cpu`` platform for verl's platform registry (``verl/plugin/platform``), selected by ``VERL_PLATFORM=cpu``.

verl reaches the accelerator through ``get_platform()``: the device name (``"cpu"`` here, so
engines and rollouts registered for device ``cpu`` are picked), ``get_torch_device()`` (the
module below: ``torch.cpu`` plus the cache/memory/RNG calls verl makes on ``torch.cuda``, as
no-ops or host equivalents), ``get_device_id()`` (``"cpu"``: verl calls ``.to(get_device_id())``),
the collective backend (gloo) and the Ray resource name. verl's placement groups ask one ``GPU``
per worker; on a CPU machine those are *logical* GPUs (``ray_kwargs.ray_init.num_gpus=N``), one
per training process.

Only public API is used: ``PlatformBase`` and ``PlatformRegistry.register``.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import psutil
import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

__all__ = ["PLATFORM_NAME", "PlatformCPU", "host_device_module"]

PLATFORM_NAME = "cpu"
"""``VERL_PLATFORM`` value that selects this platform."""


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _host_memory(*args: Any) -> tuple[int, int]:
    mem = psutil.virtual_memory()
    return mem.available, mem.total


host_device_module = SimpleNamespace(
    # device selection: one device, the host
    is_available=lambda: True,
    is_initialized=lambda: True,
    device_count=lambda: 1,
    current_device=lambda: "cpu",
    set_device=_nothing,
    get_device_name=lambda *args: "cpu",
    synchronize=_nothing,
    # streams and events exist on torch.cpu (no-op implementations)
    Stream=torch.cpu.Stream,
    Event=torch.cpu.Event,
    stream=torch.cpu.stream,
    current_stream=torch.cpu.current_stream,
    # caching allocator: none on the host
    empty_cache=_nothing,
    ipc_collect=_nothing,
    set_per_process_memory_fraction=_nothing,
    reset_peak_memory_stats=_nothing,
    memory_allocated=_zero,
    max_memory_allocated=_zero,
    memory_reserved=_zero,
    max_memory_reserved=_zero,
    mem_get_info=_host_memory,
    # the device RNG is the global torch RNG
    manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed,
    get_rng_state=torch.get_rng_state,
    set_rng_state=torch.set_rng_state,
)
"""What ``get_torch_device()`` returns on the CPU platform: the calls verl makes on ``torch.cuda``."""


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """Host CPU as verl's device: gloo collectives, logical Ray ``GPU`` slots, no profiler.

    Never auto-detected (``is_platform_available`` is False): it is used only when
    ``VERL_PLATFORM=cpu`` names it.
    """

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return host_device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return False

    def current_device(self) -> str:  # type: ignore[override]  # verl calls .to(get_device_id())
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for actors that hold a (logical) GPU; torch on the host ignores it
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
