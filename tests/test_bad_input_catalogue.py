"""The bad-input catalogue: one row per bad input or fault a new user can hit, on every surface.

Each row names its surface, the input in words, the outcome it must have and a message fragment:

* ``CLEAR`` — refused: an error (a library call), exit status 1/2/130/143 with ``error: ...``
  and no traceback (a command line) or a 4xx answer (the HTTP server), whose message matches
  the fragment (a regular expression);
* ``DEFINED`` — accepted with a documented result (a skipped row counted by reason, a defined
  reward, an empty answer, ...), checked by the row, whose description matches the fragment.

:func:`observe` classifies what actually happens, with the two failure classes of the audit
that started this catalogue: ``TRACEBACK`` (an exception that is not the row's clear error, or a
traceback from a command line), ``SILENT`` (accepted, but the result is wrong or the message
misleads), and ``HANG`` (over :data:`ROW_TIMEOUT`). Every row must observe its expected class.

``python tests/test_bad_input_catalogue.py`` prints the counts by class — e.g. with
``PYTHONPATH=<an older checkout>`` to count how an older version fares. Rows call the library
in-process (the command lines through their ``main(argv)``); only SIGTERM rows start a process.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

CLEAR, DEFINED, TRACEBACK, SILENT, HANG = "CLEAR", "DEFINED", "TRACEBACK", "SILENT", "HANG"
ROW_TIMEOUT = 120
PYTHON = sys.executable


@dataclass(frozen=True)
class Result:
    """What a row's action did when it did not raise: ``refused`` (non-zero exit, 4xx) or
    completed, whether the row's defined behaviour holds (``ok``), and the text to match."""

    refused: bool
    ok: bool
    text: str
    traceback: bool = False


@dataclass(frozen=True)
class Row:
    surface: str
    case: str
    expected: str
    fragment: str
    run: Callable[[Path], Result]
    cli: bool = False  # an exception escaping the action is a traceback whatever its message


@dataclass(frozen=True)
class Outcome:
    cls: str
    detail: str


class _Timeout(BaseException):
    pass


def observe(row: Row, tmp: Path) -> Outcome:
    """Run ``row`` in ``tmp`` and classify what happened (see the module docstring)."""

    def alarm(signum: int, frame: Any) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(ROW_TIMEOUT)
    try:
        result = row.run(tmp)
    except _Timeout:
        return Outcome(HANG, f"over {ROW_TIMEOUT}s")
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - classifying is the point
        detail = f"{type(e).__name__}: {e}"
        if not row.cli and re.search(row.fragment, str(e), re.S):
            return Outcome(CLEAR, detail)
        return Outcome(TRACEBACK, detail + "\n" + "".join(traceback.format_exception(e)[-3:]))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if result.traceback:
        return Outcome(TRACEBACK, result.text)
    if result.refused:
        return Outcome(CLEAR if re.search(row.fragment, result.text, re.S) else SILENT, result.text)
    return Outcome(DEFINED if result.ok and re.search(row.fragment, result.text, re.S) else SILENT, result.text)


# ---------------------------------------------------------------------- helpers


def _root() -> Path:
    import verl_search_r3

    return Path(verl_search_r3.__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _script(name: str) -> Any:
    """A ``data_prep`` script as a module (its ``main(argv)``)."""
    spec = importlib.util.spec_from_file_location(f"catalogue_{name}", _root() / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _captured_logs() -> Any:
    """Messages logged under ``verl_search_r3`` (skip warnings) while the block runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname}: {record.getMessage()}")

    handler, logger = Collect(logging.WARNING), logging.getLogger("verl_search_r3")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def run_cli(main: Callable[[list[str]], Any], argv: list[str], check: Callable[[str], bool] = lambda text: True) -> Result:
    """A command line in-process: refused = exit status not 0; ``check(text)`` judges a run that completed."""
    out, err = io.StringIO(), io.StringIO()
    with _captured_logs() as logs, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                err.write(str(e.code))
    text = "\n".join([err.getvalue(), *logs, out.getvalue()])
    rc = rc or 0
    return Result(refused=rc != 0, ok=rc == 0 and check(text), text=f"exit {rc}\n{text}", traceback="Traceback" in text)


def build_pairs_cli(argv: list[str], check: Callable[[str], bool] = lambda text: True) -> Result:
    return run_cli(_script("build_pairs").main, [*argv, "--no-progress"], check)


def qa_cli(argv: list[str], check: Callable[[str], bool] = lambda text: True) -> Result:
    return run_cli(_script("build_search_r1_data").main, argv, check)


def index_cli(argv: list[str], check: Callable[[str], bool] = lambda text: True) -> Result:
    from verl_search_r3.search_r1.build_index import main

    return run_cli(main, [*argv, "--no-progress"], check)


def server_cli(argv: list[str]) -> Result:
    from verl_search_r3.search_r1.server import main

    return run_cli(main, argv, lambda text: False)  # a server that starts on a broken index is wrong


def evaluate_cli(argv: list[str], check: Callable[[str], bool] = lambda text: True) -> Result:
    """``python -m verl_search_r3.evaluate`` in-process (its ``cli``; for versions without one,
    what their ``__main__`` block did: only FileNotFoundError and ValueError were caught)."""
    from verl_search_r3 import evaluate

    def old_main(args: list[str]) -> int:
        try:
            evaluate.main(args)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    return run_cli(getattr(evaluate, "cli", old_main), [*argv, "--no-progress"], check)


def refused(text: str) -> Result:
    return Result(refused=True, ok=False, text=text)


def defined(ok: bool, text: str) -> Result:
    return Result(refused=False, ok=bool(ok), text=text)


def lines(records: list[Any]) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


CORPUS = [
    {"_id": "d1", "title": "Wing flutter", "text": "flutter of swept wings"},
    {"_id": "d2", "title": "Heat", "text": "heat conduction in slabs"},
    {"_id": "d3", "title": "Shells", "text": "buckling of thin shells"},
]
QUERIES = [{"_id": "q1", "text": "wing flutter"}, {"_id": "q2", "text": "slab heat"}]
QRELS = [("q1", "d1", "1"), ("q2", "d2", "2")]


def beir(tmp: Path, corpus: list | None = None, queries: list | None = None, qrels: list | None = None,
         raw_corpus: bytes | None = None, raw_queries: bytes | None = None) -> str:
    """A small BEIR folder (``raw_*`` replace a file byte for byte)."""
    folder = tmp / "beir"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_bytes(raw_corpus if raw_corpus is not None else lines(CORPUS if corpus is None else corpus).encode())
    (folder / "queries.jsonl").write_bytes(raw_queries if raw_queries is not None else lines(QUERIES if queries is None else queries).encode())
    rows = QRELS if qrels is None else qrels
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows))
    return str(folder)


def pairs_run(tmp: Path, extra: list[str] = (), check: Callable[[str], bool] = lambda t: True, **beir_kw: Any) -> Result:
    return build_pairs_cli(["--format", "beir", "--input", beir(tmp, **beir_kw), "--output", str(tmp / "out"), *extra], check)


def counts(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "out" / "manifest.json").read_text())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name))


# ---------------------------------------------------------------------- data prep: build_pairs


def _overwrite_same(tmp: Path) -> Result:
    folder = beir(tmp)
    before = sorted(os.listdir(folder))
    r = build_pairs_cli(["--format", "beir", "--input", folder, "--output", folder, "--overwrite"])
    return r if r.refused else defined(False, f"input folder now holds {sorted(os.listdir(folder))}, was {before}")


def _overwrite_parent(tmp: Path) -> Result:
    folder = beir(tmp)
    r = build_pairs_cli(["--format", "beir", "--input", folder, "--output", str(tmp), "--overwrite"])
    return r if r.refused else defined(False, f"input still there: {os.path.isdir(folder)}")


def _output_inside_input(tmp: Path) -> Result:
    folder = beir(tmp)
    return build_pairs_cli(["--format", "beir", "--input", folder, "--output", os.path.join(folder, "out")],
                           lambda t: False)


def _overwrite_symlink(tmp: Path) -> Result:
    folder = beir(tmp)
    os.symlink(folder, tmp / "link")
    r = build_pairs_cli(["--format", "beir", "--input", folder, "--output", str(tmp / "link"), "--overwrite"])
    return r if r.refused else defined(False, f"input folder now holds {sorted(os.listdir(folder))}")


def _grade(value: str, strict: bool = False) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        extra = ["--strict"] if strict else []
        return pairs_run(tmp, extra, lambda t: counts(tmp)["skipped"].get("invalid_field") == 1 and counts(tmp)["counts"]["pairs"] == 1,
                         qrels=[QRELS[0], ("q2", "d2", value)])

    return run


def _grade_whole_float(tmp: Path) -> Result:
    r = pairs_run(tmp, [], qrels=[QRELS[0], ("q2", "d2", "2.0")])
    if r.refused:
        return r
    grades = pq.read_table(tmp / "out" / "pairs.parquet").column("grade").to_pylist()
    return defined(sorted(grades) == [1, 2], f"grades {sorted(grades)}")


def _jsonl(tmp: Path, rows: list[dict], name: str = "rows.jsonl") -> str:
    path = tmp / name
    path.write_text(lines(rows))
    return str(path)


def _truncated_parquet(tmp: Path) -> str:
    path = tmp / "rows.parquet"
    pq.write_table(pa.table({"query": ["wing flutter"] * 50, "positive": ["flutter of swept wings"] * 50}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _mislabelled_parquet(tmp: Path) -> str:
    path = tmp / "rows.parquet"
    path.write_text(lines([{"query": "q", "positive": "p"}]))
    return str(path)


def _id_with_newline(tmp: Path) -> Result:
    corpus = [*CORPUS, {"_id": "d4\nbad", "title": "", "text": "a document whose id has a line break"}]
    return pairs_run(tmp, [], lambda t: counts(tmp)["skipped"].get("invalid_field") == 1 and counts(tmp)["counts"]["documents"] == 3,
                     corpus=corpus)


def _utf16(bom: bool) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        raw = lines(CORPUS).encode("utf-16" if bom else "utf-16-le")
        return pairs_run(tmp, [], lambda t: False, raw_corpus=raw)

    return run


def _query_bad_encoding(tmp: Path) -> Result:
    raw = lines([QUERIES[0]]).encode() + b'{"_id": "q2", "text": "slab \xff heat"}\n'
    return pairs_run(tmp, [], lambda t: "was skipped at" in t and "is not in" not in t, raw_queries=raw)


def _doc_bad_encoding(tmp: Path) -> Result:
    raw = lines(CORPUS[:1]).encode() + b'{"_id": "d2", "title": "Heat", "text": "heat \xff conduction"}\n' + lines(CORPUS[2:]).encode()
    return pairs_run(tmp, [], lambda t: "was skipped at" in t and "is not in" not in t, raw_corpus=raw)


def _output_under_file(tmp: Path) -> Result:
    (tmp / "afile").write_text("x")
    return build_pairs_cli(["--format", "beir", "--input", beir(tmp), "--output", str(tmp / "afile" / "out")], lambda t: False)


def _umask_files(tmp: Path) -> Result:
    old = os.umask(0o022)
    try:
        r = pairs_run(tmp)
    finally:
        os.umask(old)
    if r.refused:
        return r
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp / "out").iterdir()}
    modes["<folder>"] = oct(stat.S_IMODE((tmp / "out").stat().st_mode))
    ok = set(modes.values()) <= {"0o644", "0o755"} and modes["manifest.json"] == "0o644"
    return defined(ok, f"modes {modes}")


def _skip(reason: str, **beir_kw: Any) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        return pairs_run(tmp, [], lambda t: reason in counts(tmp)["skipped"], **beir_kw)

    return run


def _strict(**beir_kw: Any) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        return pairs_run(tmp, ["--strict"], lambda t: False, **beir_kw)

    return run


def _missing_corpus(tmp: Path) -> Result:
    folder = beir(tmp)
    os.unlink(os.path.join(folder, "corpus.jsonl"))
    return build_pairs_cli(["--format", "beir", "--input", folder, "--output", str(tmp / "out")], lambda t: False)


def _wrong_header(tmp: Path) -> Result:
    folder = beir(tmp)
    (Path(folder) / "qrels" / "test.tsv").write_text("q\td\ts\nq1\td1\t1\n")
    return build_pairs_cli(["--format", "beir", "--input", folder, "--output", str(tmp / "out")], lambda t: False)


def _not_empty(tmp: Path) -> Result:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    r = pairs_run(tmp, [], lambda t: False)
    return r if not r.refused or (tmp / "out" / "keep.txt").exists() else defined(False, "keep.txt was deleted")


def _output_is_file(tmp: Path) -> Result:
    (tmp / "out").write_text("a file")
    return pairs_run(tmp, [], lambda t: False)


def _generic(rows: list[dict] | None = None, path: Callable[[Path], str] | None = None, fmt: str = "jsonl",
             check: Callable[[Path], bool] = lambda tmp: False, extra: list[str] = ()) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        src = path(tmp) if path is not None else _jsonl(tmp, rows)
        return build_pairs_cli(["--format", fmt, "--input", src, "--output", str(tmp / "out"), *extra], lambda t: check(tmp))

    return run


def _msmarco_missing_column(tmp: Path) -> Result:
    folder = tmp / "msmarco"
    folder.mkdir()
    (folder / "collection.tsv").write_text("d1\tflutter of swept wings\nd2\n")
    (folder / "queries.train.tsv").write_text("q1\twing flutter\n")
    (folder / "qrels.train.tsv").write_text("q1\t0\td1\t1\n")
    return build_pairs_cli(["--format", "msmarco", "--input", str(folder), "--output", str(tmp / "out")],
                           lambda t: counts(tmp)["skipped"] == {"missing_field": 1})


def _not_a_dataset_folder(tmp: Path) -> Result:
    (tmp / "ds").mkdir()
    (tmp / "ds" / "readme.txt").write_text("not a dataset")
    return build_pairs_cli(["--format", "hf-disk", "--input", str(tmp / "ds"), "--output", str(tmp / "out")], lambda t: False)


def _sibling_name(target: Path, kind: str, pid: int) -> Path:
    """The hidden name atomic writers give their work in progress: ``.<name>.<kind>-<host>-<pid>-<random>``."""
    host = hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:8]
    return target.parent / f".{target.name}.{kind}-{host}-{pid}-0badcafe"


def _fake_pid_sibling(target: Path, kind: str, pid: int) -> Path:
    path = _sibling_name(target, kind, pid)
    path.mkdir()
    (path / "corpus.parquet").write_bytes(b"\0" * 1000)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale_temp(tmp: Path) -> Result:
    stale = _fake_pid_sibling(tmp / "out", "tmp", _dead_pid())
    r = pairs_run(tmp)
    if r.refused:
        return r
    return defined(not stale.exists() and leftovers(tmp) == [], f"stale folder removed: {not stale.exists()}; left: {leftovers(tmp)}\n{r.text}")


def _live_temp(tmp: Path) -> Result:
    live = _fake_pid_sibling(tmp / "out", "tmp", os.getppid())  # a running process (pytest's parent)
    r = pairs_run(tmp)
    if r.refused:
        return r
    return defined(live.exists(), f"live run's folder kept: {live.exists()}")


def _old_without_output(tmp: Path) -> Result:
    old = _fake_pid_sibling(tmp / "out", "old", _dead_pid())
    r = pairs_run(tmp)
    return r if r.refused else defined(old.exists(), f"previous output kept: {old.exists()}\n{r.text}")


# ---------------------------------------------------------------------- SIGTERM (one process, a fork per command)

_SIGTERM_CHILD = r"""
import json, os, sys, time
root, scenarios = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [root, os.path.join(root, "data_prep")]
import verl_search_r3.data.build as pairs_lib
import verl_search_r3.search_r1.build_index as index_lib
import verl_search_r3.search_r1.data as qa_lib
import build_pairs, build_search_r1_data

def pause(orig):  # the step's files are written, the output is not committed yet
    def wrapped(*a, **k):
        out = orig(*a, **k)
        print("ready", os.getpid(), flush=True)
        time.sleep(120)
        return out
    return wrapped

pairs_lib.write_rl = pause(pairs_lib.write_rl)
index_lib._build_shards = pause(index_lib._build_shards)  # complete shard snapshots, no manifest yet
qa_lib.write_json = pause(qa_lib.write_json)
mains = {"build_pairs": build_pairs.main, "build_index": index_lib.main, "build_search_r1_data": build_search_r1_data.main}
for kind, argv, log in scenarios:
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT)
        os.dup2(fd, 2)
        rc = mains[kind](argv)
        sys.stderr.flush()
        os._exit(rc)
    _, status = os.waitpid(pid, 0)
    print("exit", os.waitstatus_to_exitcode(status), flush=True)
"""


@functools.lru_cache(maxsize=None)
def _sigterm_runs() -> dict[str, str]:
    """SIGTERM to each data-prep command once its files are written: one process imports the
    commands, a fork runs each (a real process that exits or dies); ``{command: what happened}``."""
    tmp = Path(tempfile.mkdtemp(prefix="catalogue-sigterm-"))
    scenarios = []
    for kind in ("build_pairs", "build_index", "build_search_r1_data"):
        folder = tmp / kind
        folder.mkdir()
        if kind == "build_search_r1_data":
            argv = ["--source", f"train:nq={_jsonl(folder, [{'question': 'q', 'golden_answers': ['a']}], 'qa.jsonl')}"]
        else:
            argv = ["--format", "beir", "--input", beir(folder), "--no-progress"]
        scenarios.append([kind, [*argv, "--output", str(folder / "out")], str(folder / "stderr.txt")])
    proc = subprocess.Popen([PYTHON, "-c", _SIGTERM_CHILD, str(_root()), json.dumps(scenarios)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    runs = {}
    try:
        for kind, _, log in scenarios:
            folder = tmp / kind
            ready = proc.stdout.readline().split()
            assert ready and ready[0] == "ready", proc.stderr.read()
            during = leftovers(folder)
            os.kill(int(ready[1]), signal.SIGTERM)
            rc = int(proc.stdout.readline().split()[1])
            err = Path(log).read_text()
            runs[kind] = (f"exit {rc}; temporary folders during the run {during}, after {leftovers(folder)}; "
                          f"output exists: {(folder / 'out').exists()}\n{err}")
    finally:
        proc.kill()
        proc.communicate()
        shutil.rmtree(tmp, ignore_errors=True)
    return runs


def _sigterm(kind: str) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        text = _sigterm_runs()[kind]
        if "Traceback" in text:
            return Result(refused=True, ok=False, text=text, traceback=True)
        clean = text.startswith("exit 143;") and ", after []" in text and "output exists: False" in text and "during the run []" not in text
        return refused(text) if clean else defined(False, text)

    return run


# ---------------------------------------------------------------------- Search-R1 data


def _qa(rows: list[dict], extra: list[str] = (), check: Callable[[Path], bool] = lambda tmp: False) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        src = _jsonl(tmp, rows, "qa.jsonl")
        return qa_cli(["--source", f"train:nq={src}", "--output", str(tmp / "out"), *extra], lambda t: check(tmp))

    return run


def _instruction_with_braces(tmp: Path) -> Result:
    template = 'Answer as JSON, e.g. {"answer": "Paris"}. Question: {question}\n'
    (tmp / "instr.txt").write_text(template)
    src = _jsonl(tmp, [{"question": "capital of France", "golden_answers": ["Paris"]}], "qa.jsonl")

    def check(text: str) -> bool:
        content = pq.read_table(tmp / "out" / "train.parquet").column("prompt").to_pylist()[0][0]["content"]
        return content == 'Answer as JSON, e.g. {"answer": "Paris"}. Question: capital of France?\n'

    return qa_cli(["--source", f"train:nq={src}", "--output", str(tmp / "out"), "--instruction-file", str(tmp / "instr.txt")], check)


def _qa_overwrite_source_folder(tmp: Path) -> Result:
    (tmp / "raw").mkdir()
    src = _jsonl(tmp / "raw", [{"question": "q", "golden_answers": ["a"]}], "qa.jsonl")
    r = qa_cli(["--source", f"train:nq={src}", "--output", str(tmp / "raw"), "--overwrite"])
    return r if r.refused else defined(False, f"source still there: {os.path.exists(src)}")


def _qa_truncated_parquet(tmp: Path) -> Result:
    path = tmp / "qa.parquet"
    pq.write_table(pa.table({"question": ["q"] * 50, "golden_answers": [["a"]] * 50}), path)
    path.write_bytes(path.read_bytes()[:100])
    return qa_cli(["--source", f"train:nq={path}", "--output", str(tmp / "out")], lambda t: False)


# ---------------------------------------------------------------------- Search-R1 index and server


@functools.lru_cache(maxsize=None)
def _bm25_index() -> str:
    """One small BM25 index folder for the server rows (built once; rows copy it before damaging it)."""
    from verl_search_r3.search_r1.build_index import BuildIndexOptions, build_index

    tmp = Path(tempfile.mkdtemp(prefix="catalogue-index-"))
    atexit.register(shutil.rmtree, tmp, True)
    build_index(BuildIndexOptions(input=beir(tmp), output=str(tmp / "index"), format="beir", progress=False))
    return str(tmp / "index")


def _damaged_index(tmp: Path, damage: Callable[[Path], None]) -> str:
    folder = tmp / "index"
    shutil.copytree(_bm25_index(), folder)
    damage(folder)
    return str(folder)


def _edit_manifest(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / "search_r1_index.json"
        values = json.loads(path.read_text())
        edit(values)
        path.write_text(json.dumps(values))

    return damage


def _server_start(damage: Callable[[Path], None]) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        return server_cli(["--index", _damaged_index(tmp, damage), "--port", "1"])

    return run


def _index_overwrite_input(tmp: Path) -> Result:
    folder = beir(tmp)
    r = index_cli(["--format", "beir", "--input", folder, "--output", folder, "--overwrite"])
    return r if r.refused else defined(False, f"input folder now holds {sorted(os.listdir(folder))}")


def _index_output_holds_model(tmp: Path) -> Result:
    (tmp / "models" / "st").mkdir(parents=True)
    (tmp / "models" / "st" / "config.json").write_text("{}")
    r = index_cli(["--format", "beir", "--input", beir(tmp), "--output", str(tmp / "models"), "--overwrite",
                   "--retriever", "sentence_transformers", "--model", str(tmp / "models" / "st")])
    return r if r.refused else defined(False, "model folder replaced")


def _index_id_with_newline(tmp: Path) -> Result:
    src = _jsonl(tmp, [{"id": "1", "contents": "Wing\nflutter of wings"}, {"id": "2\n3", "contents": "Heat\nslabs"}], "passages.jsonl")
    return index_cli(["--input", src, "--output", str(tmp / "out")],
                     lambda t: "line break" in t and json.loads((tmp / "out" / "search_r1_index.json").read_text())["num_docs"] == 1)


def _index_truncated_parquet(tmp: Path) -> Result:
    path = tmp / "corpus.parquet"
    pq.write_table(pa.table({"doc_id": ["a"] * 40, "title": [""] * 40, "text": ["x"] * 40}), path)
    path.write_bytes(path.read_bytes()[:60])
    return index_cli(["--format", "parquet", "--input", str(path), "--output", str(tmp / "out")], lambda t: False)


def _http(body: dict, fake: bool = True) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from fastapi.testclient import TestClient

        from verl_search_r3.search_r1.observation import Passage
        from verl_search_r3.search_r1.server import ServerConfig, create_app

        def search(queries: list[str], k: int) -> list[list[Any]]:
            return [[Passage.from_contents(f"d{i}", f"title\ntext {i}", 0.0) for i in range(k)] for _ in queries]

        config = ServerConfig(max_request_bytes=4000, max_queries=4, max_topk=5, max_query_chars=50)
        res = TestClient(create_app(search, config)).post("/retrieve", json=body)
        if res.status_code >= 400:
            return refused(f"{res.status_code} {res.text}")
        return defined(False, f"{res.status_code} {res.text[:200]}")

    return run


def _stop_word_query(tmp: Path) -> Result:
    from verl_search_r3.search_r1.config import RetrieverConfig
    from verl_search_r3.search_r1.retrieval import Retrieval

    retrieval = Retrieval(RetrieverConfig(index_dir=_bm25_index(), placement="local"))
    hits = retrieval.search(["the of and", "wing flutter"], 3)
    return defined(hits[0] == [] and hits[1] and hits[1][0].doc_id == "d1",
                   f"stop-word query -> {[(p.doc_id, p.score) for p in hits[0]]}; 'wing flutter' -> {[p.doc_id for p in hits[1]]}")


# ---------------------------------------------------------------------- Search-R3 reward


def _reward(ids: list[str], scores: list[float], relevance: dict | None = None, check: Callable[[Any], bool] = lambda s: False) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from verl_search_r3.rl.reward import RewardConfig, score_ranking

        result = score_ranking(ids, scores, relevance if relevance is not None else {"d1": 1}, RewardConfig())
        return defined(check(result) and np.isfinite(result.score), f"{result}")

    return run


def _ground_truth(gt: Any) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from verl_search_r3.rl.reward import relevance_from_ground_truth

        return defined(False, f"accepted as {relevance_from_ground_truth(gt)}")

    return run


def _ground_truth_ok(gt: Any, want: dict) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from verl_search_r3.rl.reward import relevance_from_ground_truth

        got = relevance_from_ground_truth(gt)
        return defined(got == want, f"relevance {got}")

    return run


def _golds(gt: Any, answer: str, want_em: float) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from verl_search_r3.search_r1.reward import golden_answers, score_response

        golds = golden_answers(gt)
        em = score_response(f"<answer> {answer} </answer>", golds).acc
        return defined(em == want_em, f"golds {golds}; EM of {answer!r} = {em}")

    return run


# ---------------------------------------------------------------------- config blocks


def _config(make: Callable[[], Any]) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        return defined(False, f"accepted: {make()}")

    return run


def _config_ok(make: Callable[[], Any], check: Callable[[Any], bool]) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        value = make()
        return defined(check(value), f"{value}")

    return run


def _reward_config(values: Any) -> Callable[[], Any]:
    def make() -> Any:
        from verl_search_r3.config_utils import dataclass_from_dict
        from verl_search_r3.rl.reward import RewardConfig

        return dataclass_from_dict(RewardConfig, values, "search_r3.reward")

    return make


def _env_config(values: dict) -> Callable[[], Any]:
    def make() -> Any:
        from verl_search_r3.env import EnvConfig

        return EnvConfig.from_dict(values)

    return make


def _protocol_config(values: dict) -> Callable[[], Any]:
    def make() -> Any:
        from verl_search_r3.search_r1.config import ProtocolConfig

        return ProtocolConfig.from_dict(values)

    return make


# ---------------------------------------------------------------------- Stage-1 dataset


@functools.lru_cache(maxsize=None)
def _tokenizer() -> Any:
    from verl_search_r3.tiny import load_qwen_tokenizer

    return load_qwen_tokenizer()


def _pairs_rows() -> list[dict]:
    rows = [("qa", "laminar boundary layer", "d1", "boundary layer transition", ["d3"], ["hypersonic heat"]),
            ("qb", "heat transfer", "d3", "hypersonic heat transfer", ["d1"], ["boundary layer transition"]),
            ("qc", "flutter of thin wings", "d6", "wing flutter analysis", [], [])]
    return [{"query_id": q, "query": t, "pos_id": p, "pos_text": pt, "neg_ids": n, "neg_texts": nt, "split": "train"}
            for q, t, p, pt, n, nt in rows]


def _stage1(edit: Callable[[list[dict]], Any], check: Callable[[Any], bool] = lambda ds: False, table: bool = True) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from verl_search_r3.stage1.data import GroupDataConfig, PairsGroupDataset

        rows = _pairs_rows()
        edited = edit(rows)
        source = edited if edited is not None else pa.Table.from_pylist(rows)
        with _captured_logs() as logs:
            ds = PairsGroupDataset(source, _tokenizer(), GroupDataConfig(num_negatives=1, doc_max_length=64, query_max_length=96))
            items = [ds[i] for i in range(len(ds))]
        return defined(check(ds), f"{len(ds)} groups, first query ids {items[0]['input_ids'][0][-6:].tolist()}; {logs}")

    return run


def _set(row: int, **values: Any) -> Callable[[list[dict]], None]:
    def edit(rows: list[dict]) -> None:
        rows[row].update(values)

    return edit


def _query_text(ds: Any, index: int) -> str:
    return _tokenizer().decode(ds[index]["input_ids"][0])


def _stage1_path(write: Callable[[Path], None]) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from verl_search_r3.stage1.data import GroupDataConfig, PairsGroupDataset

        path = tmp / "pairs.parquet"
        write(path)
        ds = PairsGroupDataset(str(path), _tokenizer(), GroupDataConfig(num_negatives=1))
        return defined(False, f"accepted {len(ds)} groups")

    return run


def _truncate(path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(_pairs_rows() * 20), path)
    path.write_bytes(path.read_bytes()[:200])


# ---------------------------------------------------------------------- snapshots


def _snapshot(damage: Callable[[Path], None]) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from verl_search_r3.env import CorpusIndex, EnvConfig

        index = CorpusIndex(EnvConfig(graph_k=0, progress=False))
        index.add_texts(["a", "b"], ["x", "y"])
        index.upsert(["a", "b"], np.eye(2, 4, dtype=np.float32), 0)
        index.save(str(tmp / "snap"))
        damage(tmp / "snap")
        loaded = CorpusIndex.load(str(tmp / "snap"))
        return defined(False, f"loaded {len(loaded)} vectors")

    return run


def _edit_snapshot_manifest(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / "manifest.json"
        values = json.loads(path.read_text())
        edit(values)
        path.write_text(json.dumps(values))

    return damage


def _first_file(folder: Path) -> Path:
    return folder / next(iter(json.loads((folder / "manifest.json").read_text())["files"]))


def _sharded_top_folder(tmp: Path) -> Result:
    from verl_search_r3.env import CorpusIndex
    from verl_search_r3.env.snapshot import write_snapshot

    write_snapshot(str(tmp / "snap"), {}, {"num_shards": 2, "shards": ["shard-00000-of-00002", "shard-00001-of-00002"]})
    return defined(False, f"loaded {CorpusIndex.load(str(tmp / 'snap'))}")


def _atomic_write_mode(tmp: Path) -> Result:
    from verl_search_r3.atomic import write_json

    old = os.umask(0o022)
    try:
        write_json(str(tmp / "results.json"), {"a": 1})
    finally:
        os.umask(old)
    mode = oct(stat.S_IMODE((tmp / "results.json").stat().st_mode))
    return defined(mode == "0o644", f"mode {mode}")


def _atomic_stale_file(tmp: Path) -> Result:
    from verl_search_r3.atomic import atomic_write_text

    stale = _sibling_name(tmp / "results.json", "tmp", _dead_pid())
    stale.write_text("half")
    atomic_write_text(str(tmp / "results.json"), "whole")
    return defined(not stale.exists() and (tmp / "results.json").read_text() == "whole", f"stale file removed: {not stale.exists()}")


def _snapshot_stale_dir(tmp: Path) -> Result:
    from verl_search_r3.env.snapshot import write_snapshot

    stale = _fake_pid_sibling(tmp / "snap", "tmp", _dead_pid())
    write_snapshot(str(tmp / "snap"), {"a": np.arange(3)}, {})
    return defined(not stale.exists(), f"stale snapshot folder removed: {not stale.exists()}")


# ---------------------------------------------------------------------- RL environment (degenerate vectors)


def _env_index(dim: int = 6, n: int = 30) -> tuple[Any, dict[str, np.ndarray]]:
    """A small in-process index with stale vectors, and the fresh vectors an encoder returns."""
    from verl_search_r3.env import CorpusIndex, EnvConfig

    rng = np.random.default_rng(0)
    ids = [f"d{i}" for i in range(n)]
    index = CorpusIndex(EnvConfig(progress=False, graph_k=0))
    index.add_texts(ids, ids)
    index.upsert(ids, rng.standard_normal((n, dim)).astype(np.float32), 0)
    return index, dict(zip(ids, rng.standard_normal((n, dim)).astype(np.float32)))


def _degenerate_query(bad: np.ndarray) -> Callable[[Path], Result]:
    """A step with one good and one degenerate query vector: the degenerate one is not searched,
    triggers no encode, and its rollout gets the missing-token reward."""

    def run(tmp: Path) -> Result:
        from verl_search_r3.env import EnvConfig, RefreshPlanner
        from verl_search_r3.rl.reward import score_ranking

        fresh = _env_index()[1]
        good = np.random.default_rng(1).standard_normal((1, 6)).astype(np.float32)
        planner = RefreshPlanner(EnvConfig(candidates_k=3, expand_top=0, graph_k=0, progress=False))
        encoded: dict[str, list[str]] = {"both": [], "alone": []}

        def encoder(key: str) -> Callable[[list[str]], np.ndarray]:
            return lambda texts: (encoded[key].extend(texts), np.stack([fresh[t] for t in texts]))[1]

        with np.errstate(all="ignore"):
            result = planner.refresh(_env_index()[0], np.concatenate([good, bad[None]]), [["d1"], ["d2"]], 1, encoder("both"))
            planner.refresh(_env_index()[0], good, [["d1"]], 1, encoder("alone"))
        scores = result.scores[1]
        reward = score_ranking(list(result.doc_ids), scores.tolist(), {"d2": 1})  # what the trainer hands the reward
        ok = encoded["both"] == encoded["alone"] and not np.isfinite(scores).any() and reward.score == -1.0
        return defined(ok, f"extra encodes {sorted(set(encoded['both']) - set(encoded['alone']))}; scores finite: "
                           f"{bool(np.isfinite(scores).any())}; reward {reward}")

    return run


def _bad_encoder(bad: Callable[[np.ndarray], np.ndarray], full: bool = False) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        from verl_search_r3.env import EnvConfig, RefreshPlanner, full_encode

        index, fresh = _env_index()

        def encode(texts: list[str]) -> np.ndarray:
            return bad(np.stack([fresh[t] for t in texts]))

        with np.errstate(all="ignore"):
            if full:
                full_encode(index, encode, 1, batch_size=8, progress=False)
            else:
                query = np.random.default_rng(1).standard_normal((1, 6)).astype(np.float32)
                RefreshPlanner(EnvConfig(candidates_k=3, expand_top=0, graph_k=0)).refresh(index, query, [["d1"]], 1, encode)
        return defined(False, f"accepted; staleness {index.staleness(1).age_counts}")

    return run


def _upsert(vecs: np.ndarray) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        index, _ = _env_index()
        index.upsert(["d1", "d2"], vecs, 1)
        return defined(False, f"stored {index.get(['d1', 'd2'])[0]}")

    return run


# ---------------------------------------------------------------------- evaluate


def _evaluate_output(make_output: Callable[[Path], str]) -> Callable[[Path], Result]:
    def run(tmp: Path) -> Result:
        return evaluate_cli(["--data", beir(tmp), "--baseline", "bm25", "--output", make_output(tmp)], lambda t: False)

    return run


def _under_file(tmp: Path) -> str:
    (tmp / "afile").write_text("x")
    return str(tmp / "afile" / "results.json")


def _evaluate_ctrl_c(tmp: Path) -> Result:
    from verl_search_r3 import evaluate

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    original = evaluate.load_beir
    evaluate.load_beir = interrupted
    try:
        return evaluate_cli(["--data", beir(tmp), "--baseline", "bm25"], lambda t: False)
    finally:
        evaluate.load_beir = original


def _evaluate_modes(tmp: Path) -> Result:
    old = os.umask(0o022)
    try:
        r = evaluate_cli(["--data", beir(tmp), "--baseline", "bm25", "--output", str(tmp / "res.json")])
    finally:
        os.umask(old)
    if r.refused:
        return r
    modes = {p: oct(stat.S_IMODE((tmp / p).stat().st_mode)) for p in ("res.json", "res.png")}
    return defined(set(modes.values()) == {"0o644"}, f"modes {modes}")


# ---------------------------------------------------------------------- the rows


def _pairs_count(n: int) -> Callable[[Path], bool]:
    return lambda tmp: counts(tmp)["counts"]["pairs"] == n


ROWS: list[Row] = [
    # --- data prep: build_pairs (the five most serious: 1, 4, 5) -------------------------------------------------
    Row("build_pairs", "--overwrite with --output = --input", CLEAR, "is the input", _overwrite_same, cli=True),
    Row("build_pairs", "--overwrite with --output containing the input", CLEAR, "contains the input", _overwrite_parent, cli=True),
    Row("build_pairs", "--output inside the input folder", CLEAR, "lies inside the input", _output_inside_input, cli=True),
    Row("build_pairs", "--overwrite with --output a symbolic link to the input", CLEAR, "is the input", _overwrite_symlink, cli=True),
    Row("build_pairs", "qrels grade 'inf'", DEFINED, r"not a whole number: 'inf'", _grade("inf"), cli=True),
    Row("build_pairs", "qrels grade '1e999'", DEFINED, r"not a whole number: '1e999'", _grade("1e999"), cli=True),
    Row("build_pairs", "qrels grade 'nan'", DEFINED, r"not a whole number: 'nan'", _grade("nan"), cli=True),
    Row("build_pairs", "fractional qrels grade 0.7", DEFINED, r"not a whole number: '0.7'", _grade("0.7"), cli=True),
    Row("build_pairs", "fractional grade 0.7 with --strict", CLEAR, r"not a whole number: '0.7'.*strict", _grade("0.7", strict=True), cli=True),
    Row("build_pairs", "qrels grade '2.0' (a whole number written as a float)", DEFINED, r"grades \[1, 2\]", _grade_whole_float, cli=True),
    Row("build_pairs", "qrels grade 'high'", DEFINED, r"not a (whole )?number: 'high'", _grade("high"), cli=True),
    Row("build_pairs", "truncated parquet input", CLEAR, "not a readable parquet file",
        _generic(path=_truncated_parquet, fmt="parquet"), cli=True),
    Row("build_pairs", "JSON lines under a .parquet name", CLEAR, "not a readable parquet file",
        _generic(path=_mislabelled_parquet, fmt="parquet"), cli=True),
    Row("build_pairs", "document id with a line break", DEFINED, "id with a line break", _id_with_newline, cli=True),
    Row("build_pairs", "UTF-16 corpus without a byte-order mark", CLEAR, "NUL bytes.*UTF-16", _utf16(bom=False), cli=True),
    Row("build_pairs", "UTF-16 corpus with a byte-order mark", CLEAR, "UTF-16", _utf16(bom=True), cli=True),
    Row("build_pairs", "judgement of a query skipped for bad encoding", DEFINED, r"query-id 'q2' was skipped at .*queries\.jsonl:2",
        _query_bad_encoding, cli=True),
    Row("build_pairs", "judgement of a document skipped for bad encoding", DEFINED, r"corpus-id 'd2' .*was skipped at .*corpus\.jsonl:2",
        _doc_bad_encoding, cli=True),
    Row("build_pairs", "--output under a regular file", CLEAR, r"cannot write output folder .*out'.*is a file", _output_under_file, cli=True),
    Row("build_pairs", "file modes of the outputs (umask 022)", DEFINED, "'manifest.json': '0o644'", _umask_files, cli=True),
    Row("build_pairs", "malformed JSON line", DEFINED, r"corpus\.jsonl:2: invalid JSON",
        _skip("invalid_json", corpus=[CORPUS[0], '{"_id": "d2", "text": ', CORPUS[2]], qrels=[QRELS[0]]), cli=True),
    Row("build_pairs", "query without a text field", DEFINED, r"queries\.jsonl:2: missing field 'text'",
        _skip("missing_field", queries=[QUERIES[0], {"_id": "q2"}], qrels=[QRELS[0]]), cli=True),
    Row("build_pairs", "document with an empty text and title", DEFINED, r"empty 'text' in document 'd3'",
        _skip("empty_text", corpus=[*CORPUS[:2], {"_id": "d3", "title": "", "text": ""}]), cli=True),
    Row("build_pairs", "duplicate document id", DEFINED, r"duplicate _id 'd1'",
        _skip("duplicate_id", corpus=[*CORPUS, {"_id": "d1", "title": "again", "text": "another text"}]), cli=True),
    Row("build_pairs", "judgement naming an unknown query", DEFINED, r"query-id 'q9' is not in",
        _skip("unknown_query", qrels=[*QRELS, ("q9", "d3", "1")]), cli=True),
    Row("build_pairs", "judgement naming an unknown document", DEFINED, r"corpus-id 'd9' \(query 'q1'\) is not in",
        _skip("unknown_document", qrels=[*QRELS, ("q1", "d9", "1")]), cli=True),
    Row("build_pairs", "unknown query with --strict", CLEAR, r"q9.*strict mode", _strict(qrels=[*QRELS, ("q9", "d3", "1")]), cli=True),
    Row("build_pairs", "missing corpus.jsonl", CLEAR, "BEIR corpus file .* does not exist", _missing_corpus, cli=True),
    Row("build_pairs", "qrels with a wrong header", CLEAR, "expected header", _wrong_header, cli=True),
    Row("build_pairs", "every judgement unusable", CLEAR, "empty result", _skip("unknown_query", qrels=[("q9", "d1", "1")]), cli=True),
    Row("build_pairs", "non-empty --output without --overwrite", CLEAR, "is not empty", _not_empty, cli=True),
    Row("build_pairs", "--output is a regular file", CLEAR, "exists and is not a folder", _output_is_file, cli=True),
    Row("build_pairs", "--val-fraction 1.5", CLEAR, "val_fraction must be in", _generic(rows=[{"query": "q", "positive": "p"}],
        extra=["--val-fraction", "1.5"]), cli=True),
    Row("build_pairs", "generic row without its positive field", DEFINED, r"rows\.jsonl:2: missing field 'positive'",
        _generic(rows=[{"query": "wing flutter", "positive": "flutter"}, {"query": "slab heat"}], check=_pairs_count(1)), cli=True),
    Row("build_pairs", "generic row with a list of numbers as positive", DEFINED, r"should hold strings or objects, got int",
        _generic(rows=[{"query": "wing flutter", "positive": "flutter"}, {"query": "slab heat", "positive": [1, 2]}],
                 check=_pairs_count(1)), cli=True),
    Row("build_pairs", "MS MARCO collection line without its passage", DEFINED, r"collection\.tsv:2: missing field 'passage'",
        _msmarco_missing_column, cli=True),
    Row("build_pairs", "--format hf-disk on a folder that is not a dataset", CLEAR, "save_to_disk|is neither a", _not_a_dataset_folder,
        cli=True),
    Row("build_pairs", "bytes that are not UTF-8 in a document", DEFINED, r"corpus\.jsonl:3: field 'text' is not valid UTF-8",
        _skip("bad_encoding", raw_corpus=lines(CORPUS[:2]).encode() + b'{"_id": "d3", "title": "", "text": "thin \xff shells"}\n'),
        cli=True),
    Row("build_pairs", "temporary folder of a killed run (dead pid)", DEFINED, "stale folder removed: True; left: \\[\\]", _stale_temp, cli=True),
    Row("build_pairs", "temporary folder of a running build (live pid)", DEFINED, "live run's folder kept: True", _live_temp, cli=True),
    Row("build_pairs", "replaced output of a run killed between two renames", DEFINED, "previous output kept: True",
        _old_without_output, cli=True),
    Row("build_pairs", "SIGTERM during the build", CLEAR, r"exit 143.*after \[\].*interrupted", _sigterm("build_pairs")),
    # --- data prep: build_search_r1_data -------------------------------------------------------------------------------
    Row("build_search_r1_data", "instruction file with braces (a JSON example)", DEFINED, "exit 0", _instruction_with_braces, cli=True),
    Row("build_search_r1_data", "--overwrite with --output the folder of a source", CLEAR, "contains the input",
        _qa_overwrite_source_folder, cli=True),
    Row("build_search_r1_data", "truncated parquet source", CLEAR, "not a readable parquet file", _qa_truncated_parquet, cli=True),
    Row("build_search_r1_data", "question that is not a string", DEFINED, r"qa\.jsonl:2: field 'question' should be a string",
        _qa([{"question": "q", "golden_answers": ["a"]}, {"question": 5, "golden_answers": ["a"]}],
            check=lambda tmp: pq.read_metadata(tmp / "out" / "train.parquet").num_rows == 1), cli=True),
    Row("build_search_r1_data", "null inside the golden answers", DEFINED, r"should be a string or a list of strings",
        _qa([{"question": "q", "golden_answers": ["a"]}, {"question": "r", "golden_answers": ["a", None]}],
            check=lambda tmp: pq.read_metadata(tmp / "out" / "train.parquet").num_rows == 1), cli=True),
    Row("build_search_r1_data", "no usable row at all", CLEAR, "no usable row", _qa([{"q": "x"}]), cli=True),
    Row("build_search_r1_data", "instruction file without {question}", CLEAR, r"must contain \{question\}",
        lambda tmp: ((tmp / "i.txt").write_text("no field"), _qa([{"question": "q", "golden_answers": ["a"]}],
                                                                  ["--instruction-file", str(tmp / "i.txt")])(tmp))[1], cli=True),
    Row("build_search_r1_data", "--source without SPLIT:NAME=", CLEAR, "is not SPLIT:NAME=PATH",
        lambda tmp: qa_cli(["--source", "nq.jsonl", "--output", str(tmp / "out")]), cli=True),
    Row("build_search_r1_data", "SIGTERM during the build", CLEAR, r"exit 143.*after \[\].*interrupted", _sigterm("build_search_r1_data")),
    # --- build_index --------------------------------------------------------------------------------------------------
    Row("build_index", "--overwrite with --output = --input", CLEAR, "is the input", _index_overwrite_input, cli=True),
    Row("build_index", "--overwrite with --output holding the model folder", CLEAR, "contains the input", _index_output_holds_model, cli=True),
    Row("build_index", "passage id with a line break", DEFINED, "id with a line break", _index_id_with_newline, cli=True),
    Row("build_index", "truncated corpus.parquet", CLEAR, "not a readable parquet file", _index_truncated_parquet, cli=True),
    Row("build_index", "missing input file", CLEAR, "does not exist",
        lambda tmp: index_cli(["--input", str(tmp / "none.jsonl"), "--output", str(tmp / "out")]), cli=True),
    Row("build_index", "--model with the bm25 retriever", CLEAR, "--model applies to dense retrievers only",
        lambda tmp: index_cli(["--input", "x.jsonl", "--output", str(tmp / "out"), "--model", "m"]), cli=True),
    Row("build_index", "SIGTERM after the shard snapshots are written", CLEAR, r"exit 143.*after \[\].*interrupted", _sigterm("build_index")),
    # --- HTTP server start-up and requests -------------------------------------------------------------------------------
    Row("server", "--index that does not exist", CLEAR, "is not a search index",
        lambda tmp: server_cli(["--index", str(tmp / "none")]), cli=True),
    Row("server", "truncated index manifest", CLEAR, "not a readable index manifest",
        _server_start(lambda f: (f / "search_r1_index.json").write_text('{"kind": "bm25", "num_')), cli=True),
    Row("server", "index manifest without 'kind'", CLEAR, r"lacks \['kind'\]", _server_start(_edit_manifest(lambda v: v.pop("kind"))), cli=True),
    Row("server", "index manifest of another version", CLEAR, "manifest version",
        _server_start(_edit_manifest(lambda v: v.update(manifest_version=9))), cli=True),
    Row("server", "missing bm25/ids.txt", CLEAR, r"ids\.txt", _server_start(lambda f: os.unlink(f / "bm25" / "ids.txt")), cli=True),
    Row("server", "corpus-index snapshot with a corrupted vector file", CLEAR, "size|checksum|missing",
        _server_start(lambda f: [p.write_bytes(b"x") for p in (f / "index").rglob("texts_blob.npy")]), cli=True),
    Row("server", "--max-topk 0", CLEAR, "max_topk must be >= 1", lambda tmp: server_cli(["--index", "x", "--max-topk", "0"]), cli=True),
    Row("server", "empty query", CLEAR, "query 0 is empty", _http({"queries": [""]})),
    Row("server", "query of spaces only", CLEAR, "query 1 is empty", _http({"queries": ["q", "   "]})),
    Row("server", "unknown request field top_k", CLEAR, "top_k", _http({"queries": ["q"], "top_k": 5})),
    Row("server", "request without queries", CLEAR, "queries", _http({"query": "q"})),
    Row("server", "no queries", CLEAR, "queries is empty", _http({"queries": []})),
    Row("server", "too many queries", CLEAR, "at most 4 per request", _http({"queries": ["q"] * 5})),
    Row("server", "topk over the limit", CLEAR, "topk must be between 1 and 5", _http({"queries": ["q"], "topk": 6})),
    Row("server", "query over the length limit", CLEAR, "at most 50", _http({"queries": ["q" * 51]})),
    Row("server", "body over the size limit", CLEAR, "request body over", _http({"queries": ["q" * 40] * 120})),
    Row("server", "stop-word-only query (BM25)", DEFINED, r"stop-word query -> \[\]", _stop_word_query),
    # --- Search-R3 reward -------------------------------------------------------------------------------------------------
    Row("reward", "NaN scores for every candidate", DEFINED, "invalid_embedding=1",
        _reward(["d1", "d2"], [np.nan, np.nan], check=lambda s: s.score == -1.0 and s.invalid_embedding == 1)),
    Row("reward", "inf scores for every candidate", DEFINED, "invalid_embedding=1",
        _reward(["d1", "d2"], [np.inf, -np.inf], check=lambda s: s.score == -1.0 and s.invalid_embedding == 1)),
    Row("reward", "one NaN candidate score", DEFINED, "first_relevant_rank=1",
        _reward(["d1", "d2", "d3"], [0.5, np.nan, 0.2], check=lambda s: s.ndcg == 1.0 and s.margin == 0.5 - 0.2)),
    Row("reward", "+inf score of a non-relevant candidate", DEFINED, "first_relevant_rank=1",
        _reward(["d1", "d2"], [0.5, np.inf], check=lambda s: s.ndcg == 1.0)),
    Row("reward", "NaN score of the relevant candidate", DEFINED, "first_relevant_rank=2",
        _reward(["d1", "d2"], [np.nan, 0.1], check=lambda s: 0 < s.ndcg < 1)),
    Row("reward", "duplicate candidate id", DEFINED, "ndcg=1.0",
        _reward(["d1", "d1", "d2"], [0.9, 0.8, 0.1], check=lambda s: s.ndcg == 1.0 and s.recall_at_k == 1.0)),
    Row("reward", "no candidates (a query the environment refused)", DEFINED, "invalid_embedding=1",
        _reward([], [], check=lambda s: s.score == -1.0 and s.format_ok == 0)),
    Row("reward", "ground-truth grades ['high']", CLEAR, "grade of document 'd1' is 'high'; grades must be whole numbers",
        _ground_truth({"doc_ids": ["d1"], "grades": ["high"]})),
    Row("reward", "ground-truth grades [None]", CLEAR, "grade of document 'd1' is None",
        _ground_truth({"doc_ids": ["d1"], "grades": [None]})),
    Row("reward", "ground-truth grade 0.7", CLEAR, "is 0.7; grades must be whole numbers", _ground_truth({"doc_ids": ["d1"], "grades": [0.7]})),
    Row("reward", "ground-truth mapping with grade 'x'", CLEAR, "grade of document 'd1' is 'x'", _ground_truth({"d1": "x"})),
    Row("reward", "ground-truth doc_ids None", CLEAR, "doc_ids must be a list", _ground_truth({"doc_ids": None})),
    Row("reward", "ground-truth grades null (all grade 1)", DEFINED, r"\{'d1': 1, 'd2': 1\}",
        _ground_truth_ok({"doc_ids": ["d1", "d2"], "grades": None}, {"d1": 1, "d2": 1})),
    Row("reward", "ground-truth grades as numpy int32", DEFINED, r"\{'d1': 2\}",
        _ground_truth_ok({"doc_ids": np.array(["d1"]), "grades": np.array([2], np.int32)}, {"d1": 2})),
    Row("reward", "doc_ids and grades of different lengths", CLEAR, "2 doc_ids but 1 grades",
        _ground_truth({"doc_ids": ["d1", "d2"], "grades": [1]})),
    Row("reward", "ground truth of an unsupported type", CLEAR, "unsupported ground_truth int", _ground_truth(5)),
    # --- Search-R1 reward ----------------------------------------------------------------------------------------------------
    Row("search_r1_reward", "a None golden answer beside a real one", DEFINED, r"golds \['Paris'\]; EM of 'none' = 0.0",
        _golds({"target": ["Paris", None]}, "none", 0.0)),
    Row("search_r1_reward", "only None golden answers", CLEAR, "holds no golden answer", _golds({"target": [None]}, "none", 0.0)),
    Row("search_r1_reward", "numeric golden answer", DEFINED, r"EM of '1984' = 1.0", _golds({"target": [1984]}, "1984", 1.0)),
    Row("search_r1_reward", "ground truth without 'target'", CLEAR, "has no 'target'", _golds({"answers": ["a"]}, "a", 1.0)),
    # --- config blocks -------------------------------------------------------------------------------------------------------
    Row("config", "search_r3.reward.margin_weight '0.5'", CLEAR, r"margin_weight must be a number, got str '0.5'",
        _config(_reward_config({"margin_weight": "0.5"}))),
    Row("config", "search_r3.reward.k 2.5", CLEAR, r"k must be an integer, got float 2.5", _config(_reward_config({"k": 2.5}))),
    Row("config", "search_r3.reward.k null", CLEAR, r"k must be an integer, got NoneType None", _config(_reward_config({"k": None}))),
    Row("config", "search_r3.reward.k true", CLEAR, r"k must be an integer, got bool True", _config(_reward_config({"k": True}))),
    Row("config", "search_r3.reward.mode 'dcg'", CLEAR, "mode must be", _config(_reward_config({"mode": "dcg"}))),
    Row("config", "search_r3.env.normalize 'false'", CLEAR, "normalize must be true or false, got str 'false'",
        _config(_env_config({"normalize": "false"}))),
    Row("config", "search_r3.env.budget 2.5", CLEAR, "budget must be an integer or null", _config(_env_config({"budget": 2.5}))),
    Row("config", "search_r3.env.num_cpus '2'", CLEAR, "num_cpus must be a number", _config(_env_config({"num_cpus": "2"}))),
    Row("config", "search_r1.protocol.topk '3'", CLEAR, "topk must be an integer", _config(_protocol_config({"topk": "3"}))),
    Row("config", "unknown key", CLEAR, r"unknown search_r3.reward keys \['kk'\]", _config(_reward_config({"kk": 1}))),
    Row("config", "a block that is not a mapping", CLEAR, "must be a mapping, got list", _config(_reward_config([1]))),
    Row("config", "an int where a float is expected", DEFINED, "margin_weight=1",
        _config_ok(_reward_config({"margin_weight": 1}), lambda c: c.margin_weight == 1)),
    Row("config", "search_r3.env.state_dir null", DEFINED, "state_dir=None", _config_ok(_env_config({"state_dir": None}), lambda c: c.state_dir is None)),
    # --- Stage-1 dataset -----------------------------------------------------------------------------------------------------
    Row("stage1_data", "null query", DEFINED, r"2 groups.*row 0 \(query_id='qa'\): null or empty 'query'",
        _stage1(_set(0, query=None), lambda ds: len(ds) == 2 and "heat transfer" in _query_text(ds, 0))),
    Row("stage1_data", "blank positive text", DEFINED, r"null or empty 'pos_text'", _stage1(_set(1, pos_text="  "), lambda ds: len(ds) == 2)),
    Row("stage1_data", "null pos_id", DEFINED, r"null or empty 'pos_id'", _stage1(_set(2, pos_id=None), lambda ds: len(ds) == 2)),
    Row("stage1_data", "integer query_id", DEFINED, "3 groups",
        _stage1(lambda rows: pa.Table.from_pylist([dict(r, query_id=i) for i, r in enumerate(rows)]), lambda ds: len(ds) == 3)),
    Row("stage1_data", "list column stored as a string", CLEAR, r"column 'neg_ids' has type string, expected list<string>",
        _stage1(lambda rows: pa.Table.from_pylist([dict(r, neg_ids=str(r["neg_ids"])) for r in rows]))),
    Row("stage1_data", "null inside neg_texts", DEFINED, "3 groups", _stage1(_set(0, neg_texts=[None]), lambda ds: not ds[0]["search_r3_valid"][2])),
    Row("stage1_data", "every query null", CLEAR, "no usable row", _stage1(lambda rows: pa.Table.from_pylist([dict(r, query=None) for r in rows]))),
    Row("stage1_data", "missing column", CLEAR, r"missing column\(s\) \['neg_texts'\]",
        _stage1(lambda rows: pa.Table.from_pylist(rows).drop_columns(["neg_texts"]))),
    Row("stage1_data", "neg_ids and neg_texts of different lengths", CLEAR, "differ in length", _stage1(_set(0, neg_ids=["d3", "d4"]))),
    Row("stage1_data", "truncated pairs.parquet", CLEAR, "not a readable parquet file", _stage1_path(_truncate)),
    # --- snapshots and atomic writes ---------------------------------------------------------------------------------------
    Row("snapshot", "manifest entry without 'bytes'", CLEAR, r"the entry of '.*\.npy' lacks \['bytes'\]",
        _snapshot(_edit_snapshot_manifest(lambda m: next(iter(m["files"].values())).pop("bytes")))),
    Row("snapshot", "unparsable manifest", CLEAR, "corrupted manifest", _snapshot(lambda f: (f / "manifest.json").write_text("{"))),
    Row("snapshot", "a file changed after the snapshot", CLEAR, "checksum mismatch",
        _snapshot(lambda f: _first_file(f).write_bytes(_first_file(f).read_bytes()[:-1] + b"\1"))),
    Row("snapshot", "a listed file missing", CLEAR, "file listed in the manifest is missing", _snapshot(lambda f: os.unlink(_first_file(f)))),
    Row("snapshot", "CorpusIndex.load on the top folder of a sharded snapshot", CLEAR, "not a single-index snapshot.*2 shards",
        _sharded_top_folder),
    Row("snapshot", "temporary folder of a killed snapshot write", DEFINED, "removed: True", _snapshot_stale_dir),
    Row("atomic", "file mode of an atomic write (umask 022)", DEFINED, "mode 0o644", _atomic_write_mode),
    Row("atomic", "temporary file of a killed atomic write", DEFINED, "stale file removed: True", _atomic_stale_file),
    # --- RL environment: degenerate vectors at the boundary (issue 18's planner/store checks) -----------------------------------
    Row("env", "NaN query vector in a refresh", DEFINED, "extra encodes \\[\\]; scores finite: False.*invalid_embedding=1",
        _degenerate_query(np.full(6, np.nan, np.float32))),
    Row("env", "inf query vector in a refresh", DEFINED, "extra encodes \\[\\]; scores finite: False.*invalid_embedding=1",
        _degenerate_query(np.full(6, np.inf, np.float32))),
    Row("env", "all-zero query vector in a refresh", DEFINED, "extra encodes \\[\\]; scores finite: False.*invalid_embedding=1",
        _degenerate_query(np.zeros(6, np.float32))),
    Row("env", "encode callback returning the wrong dimension", CLEAR, "dimension 4; the environment holds dimension 6",
        _bad_encoder(lambda v: v[:, :4])),
    Row("env", "encode callback returning NaN vectors", CLEAR, r"degenerate document vector\(s\) \(\d+ with NaN/inf",
        _bad_encoder(lambda v: v * np.nan)),
    Row("env", "encode callback returning all-zero vectors (full encode)", CLEAR, r"degenerate document vector\(s\) \(0 with NaN/inf, \d+ all zero",
        _bad_encoder(lambda v: v * 0, full=True)),
    Row("env", "upsert of a NaN and an inf vector", CLEAR, r"2 degenerate document vector\(s\) \(2 with NaN/inf",
        _upsert(np.array([[np.nan] * 6, [np.inf] * 6], np.float32))),
    # --- evaluate ----------------------------------------------------------------------------------------------------------------
    Row("evaluate", "--output under a regular file", CLEAR, r"cannot write --output .*afile' is a file", _evaluate_output(_under_file), cli=True),
    Row("evaluate", "--output is a folder", CLEAR, "cannot write --output .* it is a folder",
        _evaluate_output(lambda tmp: (tmp / "dir").mkdir() or str(tmp / "dir")), cli=True),
    Row("evaluate", "Ctrl-C", CLEAR, "exit 130.*interrupted", _evaluate_ctrl_c, cli=True),
    Row("evaluate", "--data that does not exist", CLEAR, "does not exist",
        lambda tmp: evaluate_cli(["--data", str(tmp / "none"), "--baseline", "bm25"]), cli=True),
    Row("evaluate", "file modes of the JSON and plot (umask 022)", DEFINED, "'res.png': '0o644'", _evaluate_modes, cli=True),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.surface}: {r.case}" for r in ROWS])
def test_catalogue_row(row: Row, tmp_path: Path) -> None:
    outcome = observe(row, tmp_path)
    assert outcome.cls == row.expected, f"{row.surface}: {row.case}: expected {row.expected}, got {outcome.cls}\n{outcome.detail}"


def test_catalogue_covers_the_audit() -> None:
    assert len(ROWS) >= 80
    assert len({(r.surface, r.case) for r in ROWS}) == len(ROWS), "each row once"
    assert {r.expected for r in ROWS} <= {CLEAR, DEFINED}


def main() -> None:
    """Print each row's observed class and the counts by class (``--verbose`` for the details)."""
    tally: Counter[str] = Counter()
    for row in ROWS:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            outcome = observe(row, Path(tmp))
        tally[outcome.cls] += 1
        mark = "" if outcome.cls == row.expected else f"  (expected {row.expected})"
        print(f"{outcome.cls:9s} {time.perf_counter() - start:5.1f}s  {row.surface}: {row.case}{mark}", flush=True)
        if "--verbose" in sys.argv and outcome.cls != row.expected:
            print("    " + outcome.detail.replace("\n", "\n    ")[:1500])
    print(json.dumps({"rows": len(ROWS), **{c: tally[c] for c in (CLEAR, DEFINED, TRACEBACK, SILENT, HANG)}}))


if __name__ == "__main__":
    main()
