"""The verl entry point loads our plugin module (verl swallows plugin import errors, so check)."""

import importlib.metadata
import os
import subprocess
import sys


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="verl.plugins")
    assert any(ep.value == "verl_search_r3.plugin" for ep in eps)


def test_import_verl_imports_the_plugin():
    code = (
        "import sys, verl, verl_search_r3\n"
        "assert 'verl_search_r3.plugin' in sys.modules, sorted(m for m in sys.modules if 'search_r3' in m)\n"
        "print('OK')\n"
    )
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": ""}
    env.pop("VERL_USE_EXTERNAL_PLUGINS")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]
