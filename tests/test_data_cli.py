"""The data_prep/build_pairs.py contract, run as users run it (subprocess): help, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "data_prep", "build_pairs.py")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


def test_help_explains_every_option():
    res = cli("--help")
    assert res.returncode == 0
    for flag in ("--format", "--input", "--output", "--split", "--negatives", "--num-negatives", "--val-fraction", "--seed",
                 "--strict", "--title-as-query", "--query-field", "--positive-field", "--negative-field", "--negative-min-rank",
                 "--negative-max-rank", "--false-negative-margin"):
        assert flag in res.stdout
    assert "beir,msmarco,jsonl,parquet,hf-disk" in res.stdout and "none|bm25|dense:PATH" in res.stdout
    assert "ground_truth = {doc_ids: list<string>, grades: list<int32>}" in res.stdout


@pytest.fixture()
def small_beir(tmp_path):
    folder = tmp_path / "tiny"
    (folder / "qrels").mkdir(parents=True)
    docs = [("d1", "flutter of swept wings"), ("d2", "heat conduction in slabs"), ("d3", "buckling of shells"), ("d4", "")]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in docs))
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "wing flutter"}\n{"_id": "q2", "text": "slab heat"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    return str(folder)


def test_contract_run_and_exit_codes(small_beir, tmp_path):
    out = str(tmp_path / "out")
    args = ["--format", "beir", "--input", small_beir, "--output", out, "--split", "test", "--negatives", "bm25",
            "--num-negatives", "1", "--negative-min-rank", "1", "--val-fraction", "0.5", "--seed", "3", "--no-progress"]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert "pairs" in res.stdout and "empty_text" in res.stdout  # summary with skipped rows by reason
    assert "corpus.jsonl:4: empty 'text' in document 'd4'" in res.stderr
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["counts"]["rl_val"] == 1

    res = cli(*args)  # the output folder is not empty now
    assert res.returncode == 1 and "--overwrite" in res.stderr and "Traceback" not in res.stderr

    strict_out = str(tmp_path / "strict")
    res = cli(*args[:5], strict_out, "--strict")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "corpus.jsonl:4: empty 'text'" in res.stderr and not os.path.exists(strict_out)

    res = cli("--format", "beir", "--input", small_beir, "--output", strict_out, "--negative-min-rank", "50", "--negative-max-rank", "10")
    assert res.returncode == 2 and "min_rank" in res.stderr and not os.path.exists(strict_out)

    assert sorted(os.listdir(tmp_path)) == ["out", "tiny"]
