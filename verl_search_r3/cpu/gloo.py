"""Gloo as the default process group on the CPU platform: the backend's one monkeypatch.

verl builds its process-group backend as ``f"cpu:gloo,{device}:{collective}"``
(``verl/utils/distributed.py:62,89``), which on device ``cpu`` reads ``"cpu:gloo,cpu:gloo"`` and
``torch.distributed`` refuses it ("Duplicate device type cpu"). :func:`install` replaces the two
initialisers in ``verl.utils.distributed`` with versions whose default backend is ``"cpu:gloo"``:

* ``initialize_global_process_group_ray`` — training workers under Ray (called from
  ``verl/workers/engine_workers.py:89``, which imports the name at module level, so the copy
  there is replaced too when that module is already loaded);
* ``initialize_global_process_group`` — processes started by ``torchrun`` (verl's SFT trainer,
  ``python -m verl_search_r3.stage1``).

An explicit ``backend=`` still wins. ``tests/test_cpu_privates.py`` checks the signatures this
relies on.
"""

from __future__ import annotations

import functools
import os
import sys
from datetime import timedelta

import torch.distributed
import verl.utils.distributed as verl_distributed

from .compat import require_verl

require_verl("a patch of verl.utils.distributed.initialize_global_process_group{,_ray}")

__all__ = ["BACKEND", "install", "installed"]

BACKEND = "cpu:gloo"
"""The process-group backend of CPU training processes."""

_ORIGINAL_RAY = verl_distributed.initialize_global_process_group_ray
_ORIGINAL_TORCHRUN = verl_distributed.initialize_global_process_group
_IMPORTERS = ("verl.workers.engine_workers",)
"""Modules that bind ``initialize_global_process_group_ray`` by name at import."""


@functools.wraps(_ORIGINAL_RAY)
def initialize_global_process_group_ray(timeout_second=None, backend=None):
    return _ORIGINAL_RAY(timeout_second=timeout_second, backend=backend or BACKEND)


@functools.wraps(_ORIGINAL_TORCHRUN)
def initialize_global_process_group(timeout_second=36000):
    """verl's torchrun initialiser with the gloo backend: returns ``(local_rank, rank, world_size)``."""
    torch.distributed.init_process_group(
        backend=BACKEND, timeout=timedelta(seconds=timeout_second), init_method=os.environ.get("DIST_INIT_METHOD")
    )
    return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def install() -> None:
    """Make gloo the default in ``verl.utils.distributed`` and in the modules that copied the name; idempotent."""
    verl_distributed.initialize_global_process_group_ray = initialize_global_process_group_ray
    verl_distributed.initialize_global_process_group = initialize_global_process_group
    for name in _IMPORTERS:
        module = sys.modules.get(name)
        if module is not None:
            module.initialize_global_process_group_ray = initialize_global_process_group_ray


def installed() -> bool:
    """Whether :func:`install` is in effect in ``verl.utils.distributed``."""
    return verl_distributed.initialize_global_process_group_ray is initialize_global_process_group_ray
