"""verl plugin entry point (``[project.entry-points."verl.plugins"]``).

``import verl`` imports this module in every process (driver, TaskRunner, training, agent-loop
and reward-loop workers). It must stay light and only perform registrations. verl swallows
exceptions raised here (logged at DEBUG level), so ``tests/test_plugin.py`` asserts every
registration after ``import verl``.

:data:`REGISTERED` lists ``(registry, name)`` pairs registered by this module.
"""

from __future__ import annotations

from .rl import agent_loop, reward, trainer  # noqa: F401  (registration side effects)
from .search_r1 import agent_loop as search_r1_agent_loop  # noqa: F401
from .search_r1 import reward as search_r1_reward  # noqa: F401
from .search_r1 import tool as search_r1_tool  # noqa: F401

REGISTERED: list[tuple[str, str]] = [
    ("reward_manager", "search_r3"),
    ("agent_loop", "search_r3_agent"),
    ("trainer", "search_r3"),
    ("reward_manager", "search_r1"),
    ("agent_loop", "search_r1_agent"),
    ("tool_parser", "search_r1"),
]
