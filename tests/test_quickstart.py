"""The quickstart (the README's main command) with ``--tiny``: every stage runs through verl's real
trainers on the CPU backend and the report holds each stage's figures."""

import json
import math
import os

import pytest
from transformers import AutoTokenizer

from verl_search_r3.quickstart import main
from verl_search_r3.tokens import embed_token_id

pytestmark = pytest.mark.e2e


def test_quickstart_tiny_runs_every_stage_on_the_real_trainers(cranfield_dir, ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)  # the GRPO run joins the test run's cluster
    out = tmp_path / "qs"
    report = main([
        "--tiny", "--data", cranfield_dir, "--output", str(out), "--max-docs", "80", "--sft-steps", "2",
        "--sft-batch-size", "2", "--grpo-steps", "2", "--queries-per-step", "2", "--group-size", "2",
        "--max-new-tokens", "8", "--eval-queries", "4", "--num-analyses", "1",
    ])
    printed = capsys.readouterr().out
    assert "| system | nDCG@10 |" in printed and "BM25" in printed

    saved = json.loads((out / "report.json").read_text())
    assert saved["table"] == report["table"]
    assert set(saved["seconds"]) == {"data", "analyses", "stage1", "grpo", "evaluate"}
    assert saved["model"] == "tiny-qwen2 (random)"
    # data and analyses: a 80-document cut, and one analysis generated per training query
    assert {"pairs.parquet", "rl_train.parquet", "rl_val.parquet", "corpus.parquet"} <= set(os.listdir(out / "data"))
    counts = saved["analyses"]["counts"]
    assert counts["generated"] == counts["queries"] > 0
    # Stage 1: verl's SFT trainer logged both steps, validated the emission rate and exported the model
    sft = {int(k): v for k, v in saved["stage1"]["metrics"].items()}
    assert sorted(sft) == [1, 2] and all(math.isfinite(sft[s]["search_r3/infonce"]) for s in sft)
    assert 0.0 <= sft[2]["val/search_r3/emission_rate"] <= 1.0
    embed_token_id(AutoTokenizer.from_pretrained(out / "models" / "stage1"))  # raises if Stage 1 did not add it
    # GRPO: main_ppo with the search_r3 trainer ran both steps on the environment and saved an HF actor
    grpo = {int(k): v for k, v in saved["grpo"]["metrics"].items()}
    assert sorted(grpo) == [1, 2]
    assert grpo[1]["env/n_encoded"] == 0 and grpo[2]["env/n_encoded"] > 0  # step 2 refreshes what step 1 made stale
    for m in grpo.values():
        assert 0.0 <= m["search_r3/ndcg"] <= 1.0 and m["search_r3/forced"] > 0.5  # a random model rarely writes the token
        assert math.isfinite(m["actor/contrastive_loss"])
    assert os.path.isfile(os.path.join(saved["grpo"]["export"], "config.json"))
    # evaluation: BM25 and both checkpoints with reasoning off and on
    names = [r["name"] for r in saved["results"]]
    assert names == ["BM25"] + [f"tiny-qwen2 (random) {m}, reasoning {r}" for m in ("Stage 1", "Stage 1 + GRPO") for r in ("off", "on")]
    for r in saved["results"]:
        assert r["n_queries"] == 4 and all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    assert (out / "results.png").stat().st_size > 1000
