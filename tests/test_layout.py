"""The package reads as the method: imports only run downward, and verl stays out of the core.

Layers, lowest first (a module may import its own package and any package of the same or a
lower layer, never a higher one; packages of one layer must not import each other in a cycle):

0. the method's core and small helpers (``tokens``, ``prompts``, ``embedding``, ``losses``, ...)
1. ``retrieval`` (reason-then-embed inference, BM25 / dense retrievers)
2. ``data``, ``env``
3. ``rl``, ``search_r1``, ``cpu`` (verl backend for machines without a GPU)
4. ``stage1`` (its loss reads the embedding outputs of ``rl.engine``)
5. CLIs and entry points: ``evaluate``, ``mteb_wrapper``, ``quickstart``, ``plugin``

Every ``import`` counts, including those inside functions. The check prints the offending edge.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "verl_search_r3")

LAYERS: list[set[str]] = [
    {"__init__", "tokens", "prompts", "embedding", "losses", "config_utils", "atomic", "tiny"},
    {"retrieval"},
    {"data", "env"},
    {"rl", "search_r1", "cpu"},
    {"stage1"},
    {"evaluate", "mteb_wrapper", "quickstart", "smoke", "plugin"},
]
VERL_FREE_LAYERS = 3  # layers 0..2 must not import verl
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, str]:
    """Dotted module name (relative to the package) -> file path."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel] = path
    return out


def _unit(module: str) -> str:
    """The top-level unit (subpackage or root module) a package-relative module belongs to."""
    return module.split(".")[0]


def _imports(module: str, path: str) -> list[tuple[str, int]]:
    """(absolute imported module, line) for every import in the file."""
    name = "verl_search_r3." + module
    package = name.removesuffix(".__init__") if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return found


def _edges():
    for module, path in sorted(_modules().items()):
        for target, line in _imports(module, path):
            yield module, path, target, line


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYER_OF), f"add to LAYERS in tests/test_layout.py: {sorted(units - set(LAYER_OF))}"


def _upward(edges) -> list[str]:
    bad = []
    for module, path, target, line in edges:
        if not target.startswith("verl_search_r3."):
            continue
        src, dst = _unit(module), _unit(target.removeprefix("verl_search_r3."))
        if dst in LAYER_OF and LAYER_OF[dst] > LAYER_OF[src]:
            bad.append(f"{path}:{line} {src} (layer {LAYER_OF[src]}) imports {dst} (layer {LAYER_OF[dst]})")
    return bad


def test_imports_only_run_downward():
    bad = _upward(_edges())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, _, target, _ in _edges():
        if target.startswith("verl_search_r3."):
            src, dst = _unit(module), _unit(target.removeprefix("verl_search_r3."))
            if src != dst and LAYER_OF.get(src) == LAYER_OF.get(dst) and src != "__init__" and dst != "__init__":
                graph[src].add(dst)
    for a in graph:
        for b in graph[a]:
            assert a not in graph.get(b, ()), f"{a} and {b} import each other"


def test_core_data_env_and_retrieval_do_not_import_verl():
    bad = [
        f"{os.path.relpath(path, ROOT)}:{line} imports {target}"
        for module, path, target, line in _edges()
        if LAYER_OF[_unit(module)] < VERL_FREE_LAYERS and (target == "verl" or target.startswith("verl."))
    ]
    assert not bad, "verl is imported below rl/search_r1/stage1:\n" + "\n".join(bad)


@pytest.mark.parametrize("unit", ["rl", "search_r1", "stage1"])
def test_the_checker_flags_an_upward_import(tmp_path, unit):
    """The checker is not vacuous: a lazy import of ``unit`` inside ``env`` is flagged."""
    path = tmp_path / "x.py"
    path.write_text(f"def f():\n    from ..{unit}.trainer import Trainer\n")
    edges = [("env.x", str(path), target, line) for target, line in _imports("env.x", str(path))]
    assert edges[0][2] == f"verl_search_r3.{unit}.trainer"
    assert len(_upward(edges)) == 1


def test_importing_the_package_is_free():
    """``import verl_search_r3`` (run by every verl process via the plugin) loads neither transformers nor verl."""
    import subprocess
    import sys

    code = "import sys, verl_search_r3; print(sorted(m for m in ('transformers', 'verl', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
