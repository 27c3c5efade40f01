"""verl's FSDP LM-head engine on CPU without ``__init__`` (which needs CUDA), for unit tests.

The engine runs exactly its micro-batch code path: ``prepare_model_inputs`` -> module ->
``prepare_model_outputs`` (with verl's logits-processor hook when a loss function is given).
"""

from __future__ import annotations

from types import SimpleNamespace

from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from verl_search_r3.rl.engine import add_embedding_outputs


def make_engine(model, token_id: int | None = None) -> FSDPEngineWithLMHead:
    """An engine over ``model``; with ``token_id`` it also returns the embedding at that token."""
    eng = object.__new__(FSDPEngineWithLMHead)
    eng.pad_to_length, eng.use_ulysses_sp, eng.ulysses_sequence_parallel_size = False, False, 1
    eng.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    eng.module = model
    if token_id is not None:
        add_embedding_outputs(eng, model, token_id)
    return eng


def engine_forward(eng, model, mb, loss_fn=None) -> dict:
    """One micro-batch through the engine's input preparation, ``model`` and output preparation."""
    inputs, args = eng.prepare_model_inputs(mb)
    out = model(**inputs, use_cache=False)
    return eng.prepare_model_outputs(out, args, mb, loss_fn)
