import pytest
import torch

from verl_search_r3.tiny import build_tiny_qwen2, load_qwen_tokenizer
from verl_search_r3.tokens import EMBED_TOKEN, add_embed_token, embed_token_id


def test_token_is_special_single_id_and_idempotent(qwen_tokenizer):
    tid = embed_token_id(qwen_tokenizer)
    assert tid == add_embed_token(qwen_tokenizer)  # second call keeps the id
    ids = qwen_tokenizer(f"alpha{EMBED_TOKEN}beta", add_special_tokens=False)["input_ids"]
    assert ids.count(tid) == 1
    assert qwen_tokenizer.decode([tid]) == EMBED_TOKEN
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == "alphabeta"


def test_missing_token_error_names_the_fix():
    tok = load_qwen_tokenizer(with_embed_token=False)
    with pytest.raises(ValueError, match="add_embed_token"):
        embed_token_id(tok)


def test_tied_row_initialised_to_vocabulary_mean():
    model, tok = build_tiny_qwen2(seed=1)
    tid = embed_token_id(tok)
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    torch.testing.assert_close(emb[tid], emb[:tid].mean(0))


def test_untied_rows_both_initialised():
    model, tok = build_tiny_qwen2(tie_word_embeddings=False, seed=2)
    tid = embed_token_id(tok)
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inp.data_ptr() != out.data_ptr()
    torch.testing.assert_close(inp[tid], inp[:tid].mean(0))
    torch.testing.assert_close(out[tid], out[:tid].mean(0))
    # with a mean output row the new token's logit is the mean logit of the known tokens
    h = torch.randn(3, inp.shape[1])
    logits = h @ out.T
    torch.testing.assert_close(logits[:, tid], logits[:, :tid].mean(1), atol=1e-5, rtol=1e-5)


def test_resize_when_vocab_has_no_spare_row():
    tok = load_qwen_tokenizer(with_embed_token=False)
    model, _ = build_tiny_qwen2(vocab_size=len(tok), seed=3)  # build_tiny_qwen2 adds the token
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 1
    tid = add_embed_token(tok, model)
    assert tid == len(tok) - 1
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[tid], emb[:tid].mean(0))


def test_tokens_init_uses_the_given_words():
    model, tok = build_tiny_qwen2(seed=4)
    tid = embed_token_id(tok)
    from verl_search_r3.tokens import init_token_rows

    init_token_rows(model, [tid], init="tokens: embedding vector", tokenizer=tok)
    ids = tok(" embedding vector", add_special_tokens=False)["input_ids"]
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[tid], emb[ids].mean(0))
    with pytest.raises(ValueError, match="unknown init"):
        init_token_rows(model, [tid], init="random")


def test_trained_row_is_not_reinitialised():
    model, tok = build_tiny_qwen2(seed=5)
    tid = embed_token_id(tok)
    with torch.no_grad():
        model.get_input_embeddings().weight[tid] = 7.0
    add_embed_token(tok, model)
    assert torch.all(model.get_input_embeddings().weight[tid] == 7.0)


def test_token_and_row_survive_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = build_tiny_qwen2(seed=6)
    tid = embed_token_id(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert embed_token_id(tok2) == tid
    assert tok2(EMBED_TOKEN, add_special_tokens=False)["input_ids"] == [tid]
    torch.testing.assert_close(model2.get_input_embeddings().weight[tid], model.get_input_embeddings().weight[tid])
