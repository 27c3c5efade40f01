"""The quickstart end to end with the tiny model and small sizes: every stage runs, the report is complete."""

import json
import os

from verl_search_r3.quickstart import main


def test_quickstart_tiny_writes_a_complete_report(cranfield_dir, tmp_path, capsys):
    out = tmp_path / "qs"
    report = main([
        "--tiny", "--data", cranfield_dir, "--output", str(out), "--max-docs", "60", "--sft-steps", "2",
        "--sft-batch-size", "2", "--grpo-steps", "2", "--queries-per-step", "2", "--group-size", "2",
        "--max-new-tokens", "6", "--eval-queries", "4", "--doc-max-length", "48",
    ])
    printed = capsys.readouterr().out
    assert "| system | nDCG@10 |" in printed and "BM25" in printed

    saved = json.loads((out / "report.json").read_text())
    assert saved["table"] == report["table"]
    assert set(saved["seconds"]) == {"data", "stage1", "grpo", "evaluate"}
    assert saved["model"] == "tiny-qwen2 (random)"
    # data: a 60-document cut with pairs, RL parquets and a corpus
    assert {"pairs.parquet", "rl_train.parquet", "rl_val.parquet", "corpus.parquet"} <= set(os.listdir(out / "data"))
    # stage 1: metrics before training and after each step
    assert [m["step"] for m in saved["stage1"]] == [0, 1, 2]
    assert all("infonce" in m and "accuracy" in m for m in saved["stage1"][1:])
    # GRPO: per-step reward, refresh and loss figures within their ranges
    assert [m["step"] for m in saved["grpo"]] == [1, 2]
    for m in saved["grpo"]:
        assert -1.0 <= m["reward"] <= 1.0 and 0.0 <= m["format_ok"] <= 1.0
        assert 0.0 <= m["encoded_fraction"] <= 1.0 and m["encoded_docs"] >= 0
    assert saved["grpo"][0]["encoded_docs"] == 0  # first step: every vector is from the current policy
    # evaluation: BM25 and the model with reasoning off and on, metrics in [0, 1]
    names = [r["name"] for r in saved["results"]]
    assert names == ["BM25", "tiny-qwen2 (random) reasoning off", "tiny-qwen2 (random) reasoning on"]
    for r in saved["results"]:
        assert r["n_queries"] == 4 and all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    assert (out / "results.png").stat().st_size > 1000
