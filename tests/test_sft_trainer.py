"""The trainer's own pieces: base-model preparation and verl's SFTTrainer data plumbing with our overrides.

The FSDP engine needs CUDA, so the trainer is exercised around it: the dataset and dataloader
built by ``SearchR3SFTTrainer`` from the recipe config feed verl's batch format and micro-batching.
"""

import json
import os
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import prepare_micro_batches

from verl_search_r3.stage1.data import GROUP_KEY, ROLE_KEY, GroupCollator, GroupDataConfig, check_groups
from verl_search_r3.stage1.trainer import SearchR3SFTTrainer, Stage1Config, prepare_base_model
from verl_search_r3.tiny import load_qwen_tokenizer
from verl_search_r3.tokens import embed_token_id

RECIPE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "recipes", "config")


def test_prepare_base_model_adds_the_token_once(tmp_path):
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
    assert prepare_base_model(str(base), out) == out  # what the other ranks get after the barrier
    assert prepare_base_model(out, str(tmp_path / "again")) == out  # has the token: used as is
    assert not os.path.exists(tmp_path / "again")
    with pytest.raises(ValueError, match="prepared from"):
        prepare_base_model(str(base), out, init="tokens: embedding")


def _pairs(path):
    rows = [
        {"query_id": f"q{i}", "query": f"query {i}", "pos_id": f"d{i}", "pos_text": f"document {i}",
         "neg_ids": [f"d{i + 1}"], "neg_texts": [f"document {i + 1}"], "split": "train" if i < 6 else "val"}
        for i in range(8)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_trainer_dataloader_yields_whole_groups_in_verl_batches(tmp_path):
    path = str(tmp_path / "pairs.parquet")
    _pairs(path)
    with initialize_config_dir(config_dir=os.path.abspath(RECIPE_CONFIG), version_base=None):
        config = compose(
            "search_r3_sft",
            overrides=[f"data.train_files={path}", f"data.val_files={path}", "model.path=unused", "data.train_batch_size=4",
                       "data.num_workers=0", "data.search_r3.num_negatives=1", "data.search_r3.doc_max_length=64"],
        )
    trainer = object.__new__(SearchR3SFTTrainer)  # the engine parts need CUDA; build the data parts only
    trainer.config = config
    trainer.stage1 = Stage1Config.from_config(config.search_r3)
    trainer.data_config = GroupDataConfig.from_config(config.data.search_r3)
    trainer.model_config = SimpleNamespace(tokenizer=load_qwen_tokenizer())
    trainer.engine = SimpleNamespace(get_data_parallel_rank=lambda: 0, get_data_parallel_size=lambda: 1, get_data_parallel_group=lambda: None)
    trainer.device_name = "cpu"
    trainer._build_dataset()
    trainer._build_dataloader()
    assert (len(trainer.train_dataset), len(trainer.val_dataset)) == (6, 2)
    assert isinstance(trainer.train_dataloader.collate_fn, GroupCollator)
    batch = next(iter(trainer.train_dataloader))
    data = tu.get_tensordict(tensor_dict=batch, non_tensor_dict={"use_dynamic_bsz": False, "micro_batch_size_per_gpu": 2})
    assert data["input_ids"].shape[0] == 4 * 3  # 4 groups of (query, positive, 1 negative)
    assert trainer._get_batch_seqlens(data) == data["input_ids"].offsets().diff().tolist()  # verl's token counts
    tu.assign_non_tensor(data, force_group_size=3)
    micro, _ = prepare_micro_batches(data)
    assert [mb["input_ids"].shape[0] for mb in micro] == [6, 6]  # micro_batch_size_per_gpu counts groups
    for mb in micro:
        check_groups(mb[ROLE_KEY], mb[GROUP_KEY], 3)
