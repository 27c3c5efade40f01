"""Running a CPU recipe as a user does, attached to the test run's Ray cluster, and the sizes the
end-to-end runs share."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from verl_search_r3.cpu.launch import attach_overrides, cpu_environ, read_metrics, run_logged

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SEARCH_TAGS = ("<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>")
SEARCH_QUERY = "boundary layer"

# Sizes shared by the PPO runs: 4 queries x 2 rollouts, short responses, token budgets that keep
# a micro-batch's full-vocabulary logits small, one worker of each kind (verl_search_r3.tiny).
PPO_TINY = [
    "data.train_batch_size=4",
    "data.max_prompt_length=512",
    "actor_rollout_ref.rollout.n=2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=2048",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=4096",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=4096",
    "trainer.logger=[console,file]",
    "trainer.val_before_train=False",
]


def run_recipe(script: str, workdir, overrides: list[str], timeout: int, ray_address: str | None = None,
               **env: str) -> tuple[dict[int, dict[str, float]], str]:
    """Run ``recipes/<script>`` with ``env`` and hydra ``overrides``; return ``(metrics by step, log text)``.

    With ``ray_address`` the run attaches to that cluster. The combined output goes to
    ``<workdir>/<script>.log``; a failure or timeout fails the test with the log's tail.
    """
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, f"{script}.log")
    metrics_path = os.path.join(workdir, f"{script}.metrics.jsonl")
    run_env = cpu_environ(metrics_path=metrics_path)
    run_env.update(env)
    run_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + run_env.get("PATH", "")
    extra = []
    if ray_address:
        run_env["RAY_ADDRESS"] = ray_address
        extra = attach_overrides(run_env)
    start = time.monotonic()
    try:
        code = run_logged(["bash", os.path.join(ROOT, "recipes", script), *overrides, *extra], run_env, log_path,
                          cwd=str(workdir), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} timed out after {timeout}s:\n{_tail(log_path)}")
    if code != 0:
        pytest.fail(f"{script} exited with {code} after {time.monotonic() - start:.0f}s:\n{_tail(log_path)}")
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    assert os.path.isfile(metrics_path), f"{script} wrote no metrics file:\n{_tail(log_path)}"
    return read_metrics(metrics_path), text


def _tail(path: str, n: int = 60) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if "UserWarning" not in line and "warnings.warn" not in line]
    return "".join(lines[-n:])
