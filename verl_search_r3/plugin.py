"""verl plugin entry point (``[project.entry-points."verl.plugins"]``).

``import verl`` imports this module in every process (driver, TaskRunner, training, agent-loop
and reward-loop workers). It must stay light and only perform registrations. verl swallows
exceptions raised here (logged at DEBUG level), so ``tests/test_plugin.py`` asserts every
registration after ``import verl``.

:data:`REGISTERED` lists ``(registry, name)`` pairs registered by this module.
"""

from __future__ import annotations

from . import agent_loop, reward, trainer  # noqa: F401  (registration side effects)

REGISTERED: list[tuple[str, str]] = [
    ("reward_manager", "search_r3"),
    ("agent_loop", "search_r3_agent"),
    ("trainer", "search_r3"),
]
