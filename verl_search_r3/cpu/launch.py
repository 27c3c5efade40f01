"""Run the CPU recipes from Python and read what they logged (used by the e2e tests; for the quickstart).

The recipes (``recipes/run_{sft,grpo,search_r1}_cpu.sh``) are verl's own entry points plus hydra
overrides; to drive them from Python:

* :func:`cpu_environ` — the environment of a CPU run: ``VERL_PLATFORM=cpu``, this package in
  ``VERL_USE_EXTERNAL_MODULES``, and ``VERL_FILE_LOGGER_PATH`` for verl's ``file`` logger
  (``trainer.logger='[console,file]'``), which writes one JSON line ``{"step", "data"}`` per
  logged step;
* :func:`attach_overrides` — hydra overrides for a run on an already running Ray cluster
  (``RAY_ADDRESS``): no resource counts (Ray refuses them when attaching) and the given variables
  forwarded to the job's workers, which inherit the cluster's environment, not the caller's;
* :func:`read_metrics` — the metrics file as ``{step: {name: value}}``.

Example (Stage 2 on CPU, then its nDCG)::

    env = {**cpu_environ(metrics_path="m.jsonl"), "DATA_DIR": data, "MODEL_PATH": model}
    subprocess.run(["bash", "recipes/run_grpo_cpu.sh", "trainer.logger=[console,file]",
                    "trainer.total_training_steps=10"], env=env, check=True)
    ndcg = [m["search_r3/ndcg"] for m in read_metrics("m.jsonl").values()]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from . import MODULE, PLATFORM

__all__ = ["METRICS_ENV", "cpu_environ", "attach_overrides", "read_metrics"]

METRICS_ENV = "VERL_FILE_LOGGER_PATH"
"""Where verl's ``file`` logger writes (``verl/utils/tracking.py``, ``FileLogger``)."""


def cpu_environ(base: Mapping[str, str] | None = None, metrics_path: str | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with the CPU backend selected and, optionally, the metrics file set."""
    env = dict(os.environ if base is None else base)
    modules = [m for m in env.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m and m != MODULE]
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join([MODULE, *modules])
    env["VERL_PLATFORM"] = PLATFORM
    if metrics_path is not None:
        env[METRICS_ENV] = os.path.abspath(metrics_path)
    return env


def attach_overrides(env: Mapping[str, str], forward: Iterable[str] = (METRICS_ENV,)) -> list[str]:
    """Hydra overrides for ``main_ppo`` on the Ray cluster at ``RAY_ADDRESS``: no ``num_cpus``/``num_gpus``
    (the cluster's logical resources count), and each variable of ``forward`` set in ``env`` passed to the workers."""
    out = ["ray_kwargs.ray_init.num_cpus=null", "ray_kwargs.ray_init.num_gpus=null"]
    for key in forward:
        if key in env:
            out.append(f"++ray_kwargs.ray_init.runtime_env.env_vars.{key}={json.dumps(env[key])}")
    return out


def read_metrics(path: str) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from a ``file``-logger JSON-lines file (lines of one step are merged)."""
    steps: dict[int, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                steps.setdefault(int(row["step"]), {}).update(row["data"])
    return steps
