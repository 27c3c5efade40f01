"""data_prep/build_search_r1_data.py: QA exports (jsonl, parquet, datasets folder) to verl parquet;
one test per kind of bad input (skipped with a warning naming file, line and field; an error
under --strict), whole-input defects, the CLI contract, and verl's RLHFDataset on the output."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_search_r3.data.issues import DataFormatError
from verl_search_r3.search_r1.data import DEFAULT_INSTRUCTION, QADataOptions, QASource, build_qa_data, parse_source

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NQ = [
    {"id": "nq-1", "question": "who wrote the opera carmen", "golden_answers": ["Georges Bizet", "Bizet"]},
    {"id": "nq-2", "question": "when was the eiffel tower built?", "golden_answers": ["1889"]},
]
HOTPOT = [{"question": "Which city hosts the Louvre?", "golden_answers": ["Paris"]}]
BAMBOOGLE = [{"question": "Who painted the Mona Lisa?", "golden_answers": "Leonardo da Vinci"}]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture()
def sources(tmp_path):
    nq = _jsonl(tmp_path / "nq-train.jsonl", NQ)
    hotpot = str(tmp_path / "hotpotqa-train.parquet")
    pq.write_table(pa.Table.from_pylist(HOTPOT), hotpot)
    bamboogle = str(tmp_path / "bamboogle")
    datasets.Dataset.from_list(BAMBOOGLE).save_to_disk(bamboogle)
    return [QASource("train", "nq", nq), QASource("train", "hotpotqa", hotpot), QASource("test", "bamboogle", bamboogle)]


def test_rows_splits_and_unique_index(sources, tmp_path):
    out = str(tmp_path / "out")
    report = build_qa_data(QADataOptions(sources=sources, output=out))
    assert report.manifest["counts"] == {"train": {"nq": 2, "hotpotqa": 1}, "test": {"bamboogle": 1}}
    assert sorted(os.listdir(out)) == ["manifest.json", "test.parquet", "train.parquet"]
    train = pq.read_table(os.path.join(out, "train.parquet")).to_pylist()
    test = pq.read_table(os.path.join(out, "test.parquet")).to_pylist()
    assert [r["extra_info"]["index"] for r in train + test] == [0, 1, 2, 3]  # unique over datasets and splits
    first = train[0]
    assert first["data_source"] == "search_r1/nq" and first["ability"] == "fact-reasoning"
    assert first["agent_name"] == "search_r1_agent"
    assert first["prompt"] == [{"role": "user", "content": DEFAULT_INSTRUCTION.format(question="who wrote the opera carmen?")}]
    assert first["reward_model"] == {"style": "rule", "ground_truth": {"target": ["Georges Bizet", "Bizet"]}}
    assert first["extra_info"]["tools_kwargs"] == {"search": {"create_kwargs": {"data_source": "search_r1/nq"}}}
    assert train[1]["extra_info"]["question"] == "when was the eiffel tower built?"  # no second '?'
    assert test[0]["reward_model"]["ground_truth"]["target"] == ["Leonardo da Vinci"]  # one string -> a list
    assert report.manifest["skipped"] == {}


def test_output_loads_in_verls_rlhf_dataset(sources, tmp_path, qwen_tokenizer, monkeypatch):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out = str(tmp_path / "out")
    build_qa_data(QADataOptions(sources=sources, output=out))
    cfg = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 1024, "filter_overlong_prompts": True,
                            "filter_overlong_prompts_workers": 1, "truncation": "error", "return_raw_chat": True,
                            "cache_dir": str(tmp_path / "verl")})
    ds = RLHFDataset(data_files=os.path.join(out, "train.parquet"), tokenizer=qwen_tokenizer, config=cfg)
    assert len(ds) == 3
    item = ds[2]
    assert item["index"] == 2 and item["agent_name"] == "search_r1_agent"
    assert item["tools_kwargs"] == {"search": {"create_kwargs": {"data_source": "search_r1/hotpotqa"}}}
    assert "Question: Which city hosts the Louvre?" in item["raw_prompt"][0]["content"]


GOOD = {"id": "g", "question": "what is lift", "golden_answers": ["a force"]}
BAD_ROWS = {
    "malformed JSON line": ('{"question": "x", ', "invalid_json", r"qa\.jsonl:2: invalid JSON"),
    "missing question": ({"golden_answers": ["a"]}, "missing_field", r"qa\.jsonl:2: missing field 'question'"),
    "question not a string": ({"question": 5, "golden_answers": ["a"]}, "invalid_field", r"qa\.jsonl:2: field 'question' should be a string"),
    "empty question": ({"question": "  ", "golden_answers": ["a"]}, "empty_text", r"qa\.jsonl:2: empty 'question'"),
    "missing answers": ({"question": "q"}, "missing_field", r"qa\.jsonl:2: missing field 'golden_answers'"),
    "answers not strings": ({"question": "q", "golden_answers": [1, 2]}, "invalid_field", r"qa\.jsonl:2: field 'golden_answers' should be"),
    "answers empty": ({"question": "q", "golden_answers": ["", " "]}, "empty_text", r"qa\.jsonl:2: field 'golden_answers' holds no"),
    "answers a number": ({"question": "q", "golden_answers": 3}, "invalid_field", r"qa\.jsonl:2: field 'golden_answers' should be"),
    "duplicate id": ({"id": "g", "question": "other", "golden_answers": ["b"]}, "duplicate_id", r"qa\.jsonl:2: duplicate id 'g'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_is_skipped_with_a_warning(tmp_path, caplog, case):
    row, reason, message = BAD_ROWS[case]
    if isinstance(row, dict) and "id" not in row:
        row = {"id": "b", **row}
    src = _jsonl(tmp_path / "qa.jsonl", [GOOD, row])
    with caplog.at_level(logging.WARNING, logger="verl_search_r3.data"):
        report = build_qa_data(QADataOptions(sources=[QASource("train", "qa", src)], output=str(tmp_path / "out"), id_field="id"))
    assert report.manifest["skipped"] == {reason: 1} and report.manifest["counts"] == {"train": {"qa": 1}}
    assert any(re.search(message, r.getMessage()) for r in caplog.records)
    with pytest.raises(DataFormatError, match=message):
        build_qa_data(QADataOptions(sources=[QASource("train", "qa", src)], output=str(tmp_path / "strict"), id_field="id", strict=True))
    assert not os.path.exists(tmp_path / "strict")


def test_bytes_that_are_not_utf8_name_the_field(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"question": "caf\xe9", "golden_answers": ["a"]}\n')
    report = build_qa_data(QADataOptions(sources=[QASource("train", "qa", str(src))], output=str(tmp_path / "out")))
    assert report.manifest["skipped"] == {"bad_encoding": 1}
    with pytest.raises(DataFormatError, match=r"qa\.jsonl:2: field 'question' is not valid UTF-8"):
        build_qa_data(QADataOptions(sources=[QASource("train", "qa", str(src))], output=str(tmp_path / "s"), strict=True))


def test_whole_input_defects_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_qa_data(QADataOptions(sources=[QASource("train", "qa", str(tmp_path / "missing.jsonl"))], output=str(tmp_path / "o1")))
    wrong_field = _jsonl(tmp_path / "f.jsonl", [{"query": "q", "golden_answers": ["a"]}])
    with pytest.raises(DataFormatError, match="no usable row for split"):
        build_qa_data(QADataOptions(sources=[QASource("train", "qa", wrong_field)], output=str(tmp_path / "o2")))
    assert not os.path.exists(tmp_path / "o2")
    with pytest.raises(ValueError, match="SPLIT:NAME=PATH"):
        parse_source("nq=file.jsonl")
    with pytest.raises(ValueError, match="given twice"):
        QADataOptions(sources=[parse_source("train:nq=a.jsonl"), parse_source("train:nq=b.jsonl")], output="o")
    with pytest.raises(ValueError, match="cannot tell the format"):
        QASource("train", "x", "file.csv").table_kind()


def _cli():
    spec = importlib.util.spec_from_file_location("build_search_r1_data", os.path.join(ROOT, "data_prep", "build_search_r1_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_contract(sources, tmp_path, capsys):
    cli = _cli()
    args = [f"--source={s.split}:{s.name}={s.path}" for s in sources]
    assert cli.main([*args, "--output", str(tmp_path / "out")]) == 0
    assert "train.parquet" in capsys.readouterr().out
    assert cli.main([*args, "--output", str(tmp_path / "out")]) == 1  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err
    assert cli.main([*args, "--output", str(tmp_path / "out"), "--overwrite"]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["--source", "bad-spec", "--output", str(tmp_path / "o")])
    assert e.value.code == 2
