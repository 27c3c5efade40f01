"""Read embeddings out of a causal LM: the final-norm hidden state at the last ``<|embed_token|>``.

Layouts handled (B = batch, L = padded length, T = total tokens, H = hidden size):

* **padded** ``input_ids (B, L)`` with an ``attention_mask``; left or right padding alike.
* **packed** (verl's remove-padding layout): one row of all tokens ``(T,)`` plus per-sequence
  offsets ``cu_seqlens (B + 1,)``, or a jagged nested tensor, whose ``values()`` and
  ``offsets()`` are exactly that.

A sequence without the token (e.g. a rollout cut at the length limit) never raises: it gets a
zero vector and ``found = False``, and callers mask it out of losses and rewards.

Hidden states come either from a forward hook on the final norm (:class:`FinalNormCapture`,
which is what verl's actor uses: it adds no forward pass) or, for inference, from the base
model's ``last_hidden_state`` (:func:`last_hidden_states`), which skips the ``lm_head``
projection. Both equal ``output_hidden_states=True``'s ``hidden_states[-1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "last_token_positions",
    "last_token_positions_packed",
    "last_token_positions_nested",
    "gather_embeddings",
    "find_final_norm",
    "FinalNormCapture",
    "last_hidden_states",
    "pad_sequences",
]


def last_token_positions(
    input_ids: Tensor, token_id: int, attention_mask: Tensor | None = None, start: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Index of the last ``token_id`` in each row of a padded batch.

    Args:
        input_ids: ``(B, L)`` token ids, left- or right-padded.
        token_id: the embed token id.
        attention_mask: ``(B, L)``; padding positions are never matched.
        start: ``(B,)`` first position to search in each row (e.g. where the response begins,
            so an embed token quoted in the prompt is ignored). Default 0.

    Returns:
        ``positions (B,)`` long (0 where not found) and ``found (B,)`` bool.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"expected input_ids of shape (B, L), got {tuple(input_ids.shape)}")
    hits = input_ids == token_id
    if attention_mask is not None:
        hits &= attention_mask.bool()
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if start is not None:
        hits &= idx >= start.to(input_ids.device)[:, None]
    pos = torch.where(hits, idx, torch.full_like(idx, -1)).amax(dim=1)
    found = pos >= 0
    return pos.clamp(min=0), found


def last_token_positions_packed(
    input_ids: Tensor, cu_seqlens: Tensor, token_id: int, start: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Index (into the packed row) of the last ``token_id`` of each sequence.

    Args:
        input_ids: ``(T,)`` or ``(1, T)`` packed token ids.
        cu_seqlens: ``(B + 1,)`` sequence offsets, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``.
        token_id: the embed token id.
        start: ``(B,)`` first position *within each sequence* to search (e.g. prompt length).

    Returns:
        ``positions (B,)`` absolute indices into the packed row (0 where not found) and ``found (B,)``.
    """
    ids = input_ids.reshape(-1)
    cu = cu_seqlens.to(ids.device).long()
    n_seq = cu.numel() - 1
    if int(cu[-1]) != ids.numel():
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but there are {ids.numel()} tokens")
    lengths = cu.diff()
    seq_of_token = torch.repeat_interleave(torch.arange(n_seq, device=ids.device), lengths)
    flat = torch.arange(ids.numel(), device=ids.device)
    hits = ids == token_id
    if start is not None:
        hits &= flat >= (cu[:-1] + start.to(ids.device).long())[seq_of_token]
    cand = torch.where(hits, flat, torch.full_like(flat, -1))
    pos = torch.full((n_seq,), -1, dtype=torch.long, device=ids.device)
    pos = pos.scatter_reduce(0, seq_of_token, cand, reduce="amax", include_self=True)
    found = pos >= 0
    return pos.clamp(min=0), found


def last_token_positions_nested(input_ids: Tensor, token_id: int, start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`last_token_positions_packed` for a jagged nested tensor ``(B, j)`` of token ids."""
    return last_token_positions_packed(input_ids.values(), input_ids.offsets(), token_id, start=start)


def gather_embeddings(
    hidden: Tensor, positions: Tensor, found: Tensor, normalize: bool = True, eps: float = 1e-8
) -> Tensor:
    """Hidden states at ``positions``, L2-normalised, zero where ``found`` is False.

    Args:
        hidden: ``(B, L, H)`` padded (``positions`` index each row) or ``(T, H)`` packed
            (``positions`` index the packed row); a packed ``(1, T, H)`` must be squeezed first.
        positions: ``(B,)`` from one of the ``last_token_positions*`` functions.
        found: ``(B,)`` bool mask.
        normalize: L2-normalise each vector.

    Returns:
        ``(B, H)`` embeddings, differentiable w.r.t. ``hidden``.
    """
    if hidden.dim() == 3:
        emb = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
    elif hidden.dim() == 2:
        emb = hidden[positions]
    else:
        raise ValueError(f"hidden must be (B, L, H) or (T, H), got {tuple(hidden.shape)}")
    if normalize:
        emb = F.normalize(emb.float(), dim=-1, eps=eps).to(hidden.dtype)
    return emb * found.to(emb.dtype)[:, None]


_NORM_NAMES = ("model.norm", "norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm")
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "base_model.model.")


def find_final_norm(model: nn.Module) -> nn.Module:
    """The final normalisation layer of a causal LM (its output feeds ``lm_head``).

    Works through FSDP1 / activation-checkpoint / ``torch.compile`` / PEFT wrappers by matching
    module names with the wrapper prefixes removed.
    """
    for name, module in model.named_modules():
        clean = name
        for part in _WRAPPER_PARTS:
            clean = clean.replace(part, "")
        if clean in _NORM_NAMES:
            return module
    raise ValueError(f"could not find the final norm of {type(model).__name__}; pass the module explicitly")


class FinalNormCapture:
    """Forward hook that keeps the output of the final norm (``(B, L, H)`` or packed ``(1, T, H)``).

    Use as a context manager or with :meth:`attach` / :meth:`detach`. With ``only_with_grad``
    the hook ignores forwards run under ``torch.no_grad()`` (e.g. verl's log-prob pass when only
    the training forward is wanted).
    """

    def __init__(self, model: nn.Module, module: nn.Module | None = None, only_with_grad: bool = False):
        self.module = module if module is not None else find_final_norm(model)
        self.only_with_grad = only_with_grad
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._output: Tensor | None = None

    def _hook(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        if self.only_with_grad and not torch.is_grad_enabled():
            return
        self._output = output[0] if isinstance(output, tuple) else output

    def attach(self) -> FinalNormCapture:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._output = None

    def __enter__(self) -> FinalNormCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def output(self) -> Tensor:
        if self._output is None:
            raise RuntimeError("no forward pass has been captured yet")
        return self._output

    def pop(self) -> Tensor:
        """Return the last captured output and forget it (so a stale tensor is never reused)."""
        out = self.output
        self._output = None
        return out


def last_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Final-norm hidden states ``(B, L, H)`` from the base model, without computing logits."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Pad token-id lists to ``(B, L)``; returns ``(input_ids, attention_mask)``."""
    if side not in ("left", "right"):
        raise ValueError("side must be 'left' or 'right'")
    length = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
