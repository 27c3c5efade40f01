"""The verl entry point loads our plugin and every registration resolves by name.

verl swallows plugin import errors (logged at DEBUG), so a broken plugin would only show up
later as "Unknown reward manager": these tests run `import verl` in a fresh interpreter.
"""

import importlib.metadata
import os
import subprocess
import sys

CHECK = """
import sys, verl
assert 'verl_search_r3.plugin' in sys.modules, 'plugin not imported by import verl'
heavy = ('verl_search_r3.rl.trainer', 'verl_search_r3.env.actor', 'faiss', 'verl.workers.engine_workers')
print('HEAVY', [m for m in heavy if m in sys.modules])
from verl_search_r3.plugin import REGISTERED
from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.experimental.agent_loop.tool_parser import ToolParser
lookups = {
    'reward_manager': get_reward_manager_cls,
    'agent_loop': lambda name: _agent_loop_registry[name]['_target_'],
    'trainer': get_trainer_cls,
    'tool_parser': lambda name: ToolParser._registry[name],
}
for registry, name in REGISTERED:
    obj = lookups[registry](name)
    print(registry, name, '->', getattr(obj, '__name__', obj))
print('OK', len(REGISTERED))
"""


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="verl.plugins")
    assert any(ep.value == "verl_search_r3.plugin" for ep in eps)


def test_import_verl_registers_everything():
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reward_manager search_r3 -> SearchR3RewardManager" in res.stdout
    assert "trainer search_r3 -> SearchR3Trainer" in res.stdout
    assert "agent_loop search_r3_agent -> verl_search_r3.rl.agent_loop.SearchR3AgentLoop" in res.stdout
    assert "reward_manager search_r1 -> SearchR1RewardManager" in res.stdout
    assert "agent_loop search_r1_agent -> verl_search_r3.search_r1.agent_loop.SearchR1AgentLoop" in res.stdout
    assert "tool_parser search_r1 -> SearchR1ToolParser" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("OK")
    # light: rollout servers and reward workers import verl, not the trainer (engine workers,
    # FAISS, Ray actors); the trainer is imported where verl.trainer.ppo.v1 is (get_trainer_cls)
    assert "HEAVY []" in res.stdout


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_a_failing_registration_import_is_reported_not_swallowed():
    """verl logs plugin import errors at DEBUG; ours are logged as errors naming the module, and the
    other registrations still happen."""
    res = _run(
        "import sys\n"
        "sys.modules['verl_search_r3.search_r1.reward'] = None  # importing it now raises ImportError\n"
        "import verl\n"
        "from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls\n"
        "print('REWARD', get_reward_manager_cls('search_r3').__name__)\n"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "REWARD SearchR3RewardManager" in res.stdout
    assert "importing verl_search_r3.search_r1.reward failed" in res.stderr and "Traceback" in res.stderr
