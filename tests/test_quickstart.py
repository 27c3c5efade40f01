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


def test_policy_forward_matches_verl_response_alignment(tiny_qwen):
    """Log-probs land where verl's no_padding_2_padding reads them: response token j at column j."""
    import torch
    from tensordict import TensorDict
    from verl.workers.utils.padding import no_padding_2_padding

    from verl_search_r3.quickstart import policy_forward
    from verl_search_r3.rl.engine import EMBEDDING_KEY
    from verl_search_r3.tokens import embed_token_id

    model, tok = tiny_qwen
    E = embed_token_id(tok)
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7, E], [8, E, 9, 10]]
    with torch.no_grad():
        out = policy_forward(model, prompts, responses, tok.pad_token_id, E)
        nj = lambda seqs: torch.nested.as_nested_tensor([torch.tensor(s) for s in seqs], layout=torch.jagged)
        got = no_padding_2_padding(out["log_probs"], TensorDict({"prompts": nj(prompts), "responses": nj(responses)}, batch_size=[2]))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
            want = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(got[i, : len(r)], want, atol=1e-5, rtol=1e-4)
    assert out[EMBEDDING_KEY].shape == (2, 64) and torch.all(out[EMBEDDING_KEY].norm(dim=-1) > 0.99)
