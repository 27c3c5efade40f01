"""Driving recipes from Python: polling, timeouts that stop the whole process group, metrics read mid-run."""

import json
import os
import subprocess
import time

import pytest

from verl_search_r3.cpu.launch import _stop_group, first_exception, read_metrics, run_logged


def test_run_logged_polls_and_logs(tmp_path):
    polls = []
    code = run_logged(["bash", "-c", "for i in 1 2 3; do echo line $i; sleep 0.3; done; exit 3"], os.environ, str(tmp_path / "log"),
                      on_poll=lambda: polls.append(1), poll_seconds=0.1)
    assert code == 3
    assert (tmp_path / "log").read_text().splitlines() == ["line 1", "line 2", "line 3"]
    assert len(polls) >= 4  # while it ran, and once at the end


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, waiting for a reaper that a container's init may never be) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_logged_timeout_stops_the_whole_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_logged(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], os.environ, str(tmp_path / "log"), timeout=1.0, poll_seconds=0.2)
    assert not _running(int(pid_file.read_text()))  # the grandchild is gone too, not only bash


def test_stop_group_kills_a_member_that_ignores_sigterm_after_the_leader_exits(tmp_path):
    pid_file = tmp_path / "child.pid"
    # the member writes its pid once its trap is installed (a pid file before it would race the SIGTERM)
    member = f"trap '' TERM; echo \\$\\$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; sleep 60"
    proc = subprocess.Popen(["bash", "-c", f'bash -c "{member}" & wait'], start_new_session=True)
    while not pid_file.exists():
        time.sleep(0.05)
    child = int(pid_file.read_text())
    start = time.monotonic()
    _stop_group(proc, grace=1.0)
    assert proc.returncode is not None
    assert not _running(child)
    assert 1.0 <= time.monotonic() - start < 5.0  # it waited the grace period for the member, then killed it


def test_read_metrics_merges_steps_and_skips_a_line_being_written(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"step": 1, "data": {"a": 1.0}}, {"step": 1, "data": {"b": 2.0}}, {"step": 2, "data": {"a": 3.0}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "da')
    assert read_metrics(str(path)) == {1: {"a": 1.0, "b": 2.0}, 2: {"a": 3.0}}


def test_first_exception_is_the_root_cause_not_the_launchers_wrapper(tmp_path):
    log = tmp_path / "log"
    log.write_text(
        "UserWarning: torchtitan engine is not available\n"
        "Traceback (most recent call last):\n"
        '  File "data.py", line 332, in _reasoning_sequence\n'
        "ValueError: pairs.parquet row 35 (query_id='182'): the reasoning prompt has 137 tokens\n"
        "Traceback (most recent call last):\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    )
    assert first_exception(str(log)) == "ValueError: pairs.parquet row 35 (query_id='182'): the reasoning prompt has 137 tokens"
    log.write_text("step:1 - loss:1.0\nall good\n")
    assert first_exception(str(log)) is None
