"""Project contract: CI runs exactly the README's test command."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no command block"
    test_cmd = "bash scripts/test.sh"
    assert test_cmd in blocks[0], "the first command block of the README must be the test command"
    ci = [line.strip() for line in _read(".ci/run").splitlines() if line.strip() and not line.startswith("#")]
    assert test_cmd in ci


def test_setup_installs_cpu_torch_before_the_package():
    setup = _read("scripts/setup.sh")
    assert setup.index('pip install --quiet "$TORCH_SPEC"') < setup.index('pip install --quiet -e ".[test]"')
