"""verl plugin entry point (``[project.entry-points."verl.plugins"]``).

``import verl`` imports this module in every verl process: driver, TaskRunner, training workers,
rollout servers, agent-loop and reward-loop workers. It stays light: it imports neither verl nor
the rest of this package. Each registration module is imported right after the verl module that
holds its registry (:data:`REGISTRATIONS`), through a post-import hook: the ``search_r3``
trainer (engine workers, TransferQueue, FAISS, Ray actors) only where ``verl.trainer.ppo.v1`` is
imported (the TaskRunner, which calls ``get_trainer_cls``, and the agent-loop workers), the reward
managers only where verl's reward-loop registry is, and so on. A process that never looks a
registry up never imports what registers into it.

verl swallows exceptions raised while loading a plugin (logged at DEBUG level). Here each
registration module is imported on its own: a failure is logged as an ERROR with its traceback
(naming the module and what is therefore missing) and the other registrations still happen.
``tests/test_plugin.py`` asserts every registration after ``import verl``.

:data:`REGISTERED` lists the ``(registry, name)`` pairs these modules register.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import wrapt

__all__ = ["REGISTRATIONS", "REGISTERED"]

logger = logging.getLogger(__name__)

REGISTRATIONS: dict[str, tuple[str, ...]] = {
    # verl module holding a registry -> our modules that register into it
    "verl.experimental.reward_loop.reward_manager": ("verl_search_r3.rl.reward", "verl_search_r3.search_r1.reward"),
    "verl.experimental.agent_loop": (
        "verl_search_r3.rl.agent_loop",
        "verl_search_r3.search_r1.agent_loop",
        "verl_search_r3.search_r1.tool",  # ToolParser registry, verl.experimental.agent_loop.tool_parser
    ),
    "verl.trainer.ppo.v1": ("verl_search_r3.rl.trainer",),
}

REGISTERED: list[tuple[str, str]] = [
    ("reward_manager", "search_r3"),
    ("agent_loop", "search_r3_agent"),
    ("trainer", "search_r3"),
    ("reward_manager", "search_r1"),
    ("agent_loop", "search_r1_agent"),
    ("tool_parser", "search_r1"),
]


def _register(registry: str, modules: tuple[str, ...]):
    def hook(_verl_module: ModuleType) -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:
                logger.exception(
                    "verl_search_r3: importing %s failed, so its registrations in %s are missing "
                    "(verl would report them as unknown names later)",
                    name,
                    registry,
                )

    return hook


for _registry, _modules in REGISTRATIONS.items():
    wrapt.register_post_import_hook(_register(_registry, _modules), _registry)
