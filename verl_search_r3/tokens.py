"""The ``<|embed_token|>`` special token: add it to a tokenizer and give it an embedding row.

The embedding of a text is the final-norm hidden state at the last ``<|embed_token|>`` of the
sequence (see :mod:`verl_search_r3.embedding`). Adding the token therefore needs three things:

1. the tokenizer learns the token as a *special* token, so it is never split and survives
   ``save_pretrained`` / ``from_pretrained``;
2. the model's input embedding matrix (and an untied ``lm_head``) has a row for its id;
3. that row starts from a deliberate value rather than whatever the matrix held there.

Initialisation. Qwen2.5 pads its matrices above the tokenizer length (151,936 rows for 151,665
tokens), so the new id usually lands on an existing, *untrained* row whose content is arbitrary.
We overwrite it:

* ``"mean"`` (default): the mean of the rows of all previously known tokens. The new input
  embedding then sits at the centre of the vocabulary, and for an untied ``lm_head`` its logit
  is the average logit, so the token is neither favoured nor suppressed before training
  (Hewitt, 2021, "Initializing new word embeddings for pretrained language models").
* ``"tokens:<text>"``: the mean of the rows of the tokens that spell ``<text>`` (e.g.
  ``"tokens: embedding"``), which starts the token near a related word.

For tied embeddings (Qwen2.5-1.5B, SmolLM2) the input and output rows are one parameter and are
set once; for untied models both matrices are set.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken
from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBED_TOKEN = "<|embed_token|>"

__all__ = ["EMBED_TOKEN", "add_embed_token", "embed_token_id", "init_token_rows"]


def embed_token_id(tokenizer: PreTrainedTokenizerBase, token: str = EMBED_TOKEN) -> int:
    """Return the id of ``token``; raise a clear error if the tokenizer does not know it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    tid = ids[0] if ids else None
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no {token!r} token; "
            "call verl_search_r3.tokens.add_embed_token(tokenizer, model) first"
        )
    return int(tid)


def add_embed_token(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel | None = None,
    init: str = "mean",
    token: str = EMBED_TOKEN,
) -> int:
    """Add ``token`` as a special token, resize ``model`` if needed and initialise its row.

    Idempotent for the tokenizer: a tokenizer that already has the token keeps its id. The
    model row is (re)initialised only when the token is new to the tokenizer or the model had
    to grow, so calling this on a trained Stage-1 checkpoint never wipes the learned row.

    Args:
        tokenizer: any Hugging Face tokenizer; modified in place.
        model: causal LM whose embeddings get a row for the token; ``None`` for tokenizer only.
        init: ``"mean"`` or ``"tokens:<text>"`` (see module docstring).
        token: the special token string.

    Returns:
        The token id.
    """
    is_new = token not in tokenizer.get_vocab()
    if is_new:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    tid = embed_token_id(tokenizer, token)
    if model is None:
        return tid

    n_rows = model.get_input_embeddings().weight.shape[0]
    grew = len(tokenizer) > n_rows
    if grew:
        # mean_resizing=False: we set the new rows ourselves below.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if is_new or grew:
        n_known = min(tid, n_rows)  # rows of tokens that existed before this call
        init_token_rows(model, [tid], init=init, tokenizer=tokenizer, reference_rows=n_known)
    return tid


@torch.no_grad()
def init_token_rows(
    model: PreTrainedModel,
    token_ids: list[int],
    init: str = "mean",
    tokenizer: PreTrainedTokenizerBase | None = None,
    reference_rows: int | None = None,
) -> None:
    """Set the input (and untied output) embedding rows of ``token_ids``.

    Args:
        model: causal LM, modified in place.
        token_ids: rows to initialise.
        init: ``"mean"`` = mean of rows ``[0, reference_rows)``; ``"tokens:<text>"`` = mean of
            the rows of ``tokenizer(<text>)`` ids.
        tokenizer: needed for ``"tokens:<text>"``.
        reference_rows: number of leading rows that hold trained tokens (default: all rows
            except ``token_ids``).
    """
    inp = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    out = out_layer.weight if out_layer is not None else None
    tied = out is None or out.data_ptr() == inp.data_ptr()

    if init == "mean":
        n = reference_rows if reference_rows is not None else min(token_ids)
        if n <= 0:
            raise ValueError("cannot mean-initialise: no reference rows before the new token")
        src = torch.arange(n, device=inp.device)
    elif init.startswith("tokens:"):
        if tokenizer is None:
            raise ValueError("init='tokens:<text>' needs the tokenizer")
        text = init[len("tokens:"):]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"init text {text!r} tokenizes to nothing")
        src = torch.tensor(ids, device=inp.device)
    else:
        raise ValueError(f"unknown init {init!r}; use 'mean' or 'tokens:<text>'")

    for weight in (inp,) if tied else (inp, out):
        row = weight[src].float().mean(dim=0).to(weight.dtype)
        weight[token_ids] = row
