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
* :func:`read_metrics` — the metrics file as ``{step: {name: value}}``;
* :func:`run_logged` — run a recipe with its output in a log file, polling a callback (progress);
  on timeout or Ctrl-C its whole process group (bash, the trainer, torchrun's workers) is
  stopped, not only the shell;
* :class:`RecipeRun` — all of the above for one recipe run, with a per-step progress bar (used by
  the quickstart and the smoke check; ``cpu=False`` runs a GPU recipe unchanged).

Example (Stage 2 on CPU, then its nDCG)::

    env = {**cpu_environ(metrics_path="m.jsonl"), "DATA_DIR": data, "MODEL_PATH": model}
    run_logged(["bash", "recipes/run_grpo_cpu.sh", "trainer.logger=[console,file]",
                "trainer.total_training_steps=10"], env=env, log_path="grpo.log", timeout=3600)
    ndcg = [m["search_r3/ndcg"] for m in read_metrics("m.jsonl").values()]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from . import MODULE, PLATFORM

__all__ = ["METRICS_ENV", "cpu_environ", "attach_overrides", "read_metrics", "run_logged", "RecipeRun"]

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
    """``{step: {metric: value}}`` from a ``file``-logger JSON-lines file (lines of one step are merged;
    safe to call while the run is writing it)."""
    steps: dict[int, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and line.endswith("\n"):  # a last line without newline is still being written
                row = json.loads(line)
                steps.setdefault(int(row["step"]), {}).update(row["data"])
    return steps


def run_logged(command: Sequence[str], env: Mapping[str, str], log_path: str, cwd: str | None = None,
               timeout: float | None = None, on_poll: Callable[[], None] | None = None, poll_seconds: float = 2.0) -> int:
    """Run ``command`` with stdout and stderr in ``log_path``; return its exit status.

    It runs in a new session; on ``timeout`` (seconds) the whole group gets SIGTERM, then SIGKILL
    after 10 s, and ``subprocess.TimeoutExpired`` is raised. ``on_poll`` (e.g. a progress bar
    reading the metrics file) is called every ``poll_seconds`` while it runs, and once at the end.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    code = proc.wait(timeout=poll_seconds if left is None else min(poll_seconds, left))
                    break
                except subprocess.TimeoutExpired:
                    if left is not None and left <= 0:
                        _stop_group(proc)
                        raise subprocess.TimeoutExpired(list(command), timeout) from None
                    if on_poll is not None:
                        on_poll()
        except BaseException:
            if proc.poll() is None:  # Ctrl-C or an error in on_poll: do not leave the run behind
                _stop_group(proc)
            raise
    if on_poll is not None:
        on_poll()
    return code


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group of ``proc``; SIGKILL to what is left of it after ``grace`` seconds.

    The group, not only its leader: a trainer's workers may outlive the shell that started them.
    """
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_group(proc, grace):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        # SIGKILL is delivered when the kernel next schedules each member: on a loaded machine a member
        # can still show as running right after killpg returns, so wait for it (bounded: a member in
        # uninterruptible sleep dies only when its I/O ends).
        _wait_group(proc, _KILL_WAIT_SECONDS)
    proc.wait()


_KILL_WAIT_SECONDS = 10.0


def _wait_group(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait up to ``seconds`` until no process of ``proc``'s group runs; return whether none does."""
    deadline = time.monotonic() + seconds
    while True:
        proc.poll()  # reap the leader, so that it does not count as alive
        if not _group_alive(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies, which only wait for a reaper, do not count)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _process_group(int(entry)) == pgid:
            return True
    return False


def _process_group(pid: int) -> int | None:
    """The process group of a running ``pid`` from ``/proc/<pid>/stat``; ``None`` when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces and ')'
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[2])


class RecipeRun:
    """One run of a recipe script: its environment, log, metrics file and a per-step progress bar.

    Args:
        script: the ``recipes/run_*.sh`` path.
        folder: where ``<name>.log`` and ``<name>.metrics.jsonl`` go (``name`` defaults to the
            script's name).
        total_steps: the bar's length (``trainer.total_training_steps`` of the run).
        env: extra variables (``DATA_DIR``, ``MODEL_PATH``, ...).
        cpu: select the CPU backend (:func:`cpu_environ`); otherwise the environment is passed as is.
        uses_ray: the recipe runs ``main_ppo``; with ``RAY_ADDRESS`` set it joins that cluster
            (:func:`attach_overrides`) instead of starting one.
        timeout: seconds before the run's process group is stopped.
        name: the log/metrics file stem.
    """

    def __init__(self, script: str, folder: str, total_steps: int, env: Mapping[str, str], cpu: bool = True,
                 uses_ray: bool = True, timeout: float | None = None, name: str | None = None):
        if not os.path.isfile(script):
            raise FileNotFoundError(f"{script} not found: run from the repository checkout (or pass its recipes folder)")
        self.script = script
        self.name = name or os.path.splitext(os.path.basename(script))[0]
        os.makedirs(folder, exist_ok=True)
        self.log = os.path.join(folder, f"{self.name}.log")
        self.metrics_path = os.path.join(folder, f"{self.name}.metrics.jsonl")
        if os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        self.env = cpu_environ(metrics_path=self.metrics_path) if cpu else {**os.environ, METRICS_ENV: os.path.abspath(self.metrics_path)}
        # the recipes call python3: this interpreter's, so the run sees the same packages
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        self.env.update(env)
        self.extra = attach_overrides(self.env) if uses_ray and self.env.get("RAY_ADDRESS") else []
        self.total_steps = total_steps
        self.timeout = timeout

    def metrics(self) -> dict[int, dict[str, float]]:
        """What the run logged so far, ``{step: {metric: value}}``."""
        return read_metrics(self.metrics_path) if os.path.exists(self.metrics_path) else {}

    def run(self, overrides: Sequence[str], describe: Callable[[dict[str, float]], str] = lambda m: "") -> dict[int, dict[str, float]]:
        """Run with the ``file`` logger and ``overrides``; the bar advances per logged step and shows
        ``describe(last step's metrics)``. Raises ``RuntimeError`` (with the log's tail) on failure or timeout."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, desc=self.name, unit="step")

        def poll() -> None:
            steps = self.metrics()
            bar.update(min(len(steps), self.total_steps) - bar.n)
            if steps:
                bar.set_postfix_str(describe(steps[max(steps)]))

        try:
            code = run_logged(["bash", self.script, "trainer.logger=[console,file]", *overrides, *self.extra], self.env, self.log,
                              timeout=self.timeout, on_poll=poll)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self.name} ran past its {self.timeout:.0f} s limit; log: {self.log}\n{self.tail()}") from None
        finally:
            bar.close()
        if code != 0:
            cause = first_exception(self.log)
            raise RuntimeError(f"{self.name} exited with status {code}" + (f": {cause}" if cause else "")
                               + f"\nlog: {self.log}\n{self.tail()}")
        return self.metrics()

    def tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the log, without Python warnings."""
        with open(self.log, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if "Warning" not in line and "warnings.warn" not in line]
        return "".join(lines[-n:])


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)(?::|$)")
_WRAPPERS = ("ChildFailedError", "RayTaskError", "RaySystemError", "ActorDiedError")


def first_exception(log_path: str) -> str | None:
    """The first ``SomeError: message`` line of a log, the root cause (launchers' wrappers around
    it, e.g. torchrun's ``ChildFailedError``, skipped); ``None`` when there is none."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            text = line.strip()
            if _EXCEPTION_LINE.match(text) and not any(w in text for w in _WRAPPERS):
                return text
    return None
