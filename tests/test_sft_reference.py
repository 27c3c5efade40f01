"""The single-process Stage-1 reference loop on Cranfield pairs, and the base-model preparation."""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl_search_r3.data.build import BuildOptions, build_pairs
from verl_search_r3.data.negatives import NegativeOptions
from verl_search_r3.sft_trainer import prepare_base_model
from verl_search_r3.sft_data import GroupDataConfig
from verl_search_r3.sft_loss import Stage1LossConfig
from verl_search_r3.sft_reference import run_reference
from verl_search_r3.tiny import build_tiny_qwen2, load_qwen_tokenizer
from verl_search_r3.tokens import EMBED_TOKEN, embed_token_id


@pytest.fixture(scope="module")
def cranfield_pairs(cranfield_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cranfield") / "pairs")
    build_pairs(BuildOptions(format="beir", input=cranfield_dir, output=out, negatives=NegativeOptions(method="bm25", num_negatives=1)))
    return os.path.join(out, "pairs.parquet")


def test_reference_loop_improves_the_contrastive_loss_on_cranfield(cranfield_pairs):
    rows = [r for r in pq.read_table(cranfield_pairs).to_pylist() if r["split"] == "train"]
    first_per_query = list({r["query_id"]: r for r in reversed(rows)}.values())[:4]  # 4 distinct queries
    model, tok = build_tiny_qwen2(seed=0)
    metrics = run_reference(
        model, tok, first_per_query, steps=3, batch_size=4, lr=1e-3, loss_config=Stage1LossConfig(),
        data_config=GroupDataConfig(num_negatives=1, doc_max_length=48), eval_groups=4, eval_split="train", seed=0,
    )
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert set(metrics[1]) >= {"loss", "sft", "kl", "infonce", "triplet", "accuracy", "eval_infonce", "eval_accuracy"}
    first, last = metrics[0], metrics[-1]
    # seeded: 2.11 -> 0.11 (accuracy 0 -> 1.0) here; the assertion leaves room for BLAS differences
    assert last["eval_infonce"] < 0.7 * first["eval_infonce"]
    assert last["eval_accuracy"] > first["eval_accuracy"]
    assert metrics[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
    assert metrics[-1]["kl"] > 0


def test_prepare_base_model_adds_the_token_once(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_qwen_tokenizer(with_embed_token=False)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    base = tmp_path / "base"
    Qwen2ForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    out = str(tmp_path / "prepared")
    assert prepare_base_model(str(base), out) == out
    prepared_tok = AutoTokenizer.from_pretrained(out)
    tid = embed_token_id(prepared_tok)
    weights = AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight
    torch.testing.assert_close(weights[tid], weights[:tid].mean(0), atol=1e-6, rtol=1e-5)
    assert json.load(open(os.path.join(out, "search_r3_source.json")))["init"] == "mean"
    assert prepare_base_model(str(base), out) == out  # reused by the other ranks
    assert prepare_base_model(out, str(tmp_path / "again")) == out  # has the token: used as is
    with pytest.raises(ValueError, match="prepared from"):
        prepare_base_model(str(base), out, init="tokens: embedding")
    assert EMBED_TOKEN in prepared_tok.get_vocab() and not os.path.exists(str(tmp_path / "again"))
