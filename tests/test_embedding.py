import pytest
import torch

from verl_search_r3.embedding import (
    FinalNormCapture,
    find_final_norm,
    gather_embeddings,
    last_hidden_states,
    last_token_positions,
    last_token_positions_nested,
    last_token_positions_packed,
    pad_sequences,
)
from verl_search_r3.prompts import embed_prompt_ids
from verl_search_r3.tokens import embed_token_id

E, P = 9, 0  # embed token id, pad id in the hand-built cases

SEQS = [
    [1, 2, E, 3, E, 4],  # two tokens: the last one (index 4) counts
    [5, E],  # token at the end
    [6, 7, 8],  # truncated: no token
]


def test_positions_right_and_left_padded():
    for side in ("right", "left"):
        ids, mask = pad_sequences(SEQS, P, side=side)
        pos, found = last_token_positions(ids, E, mask)
        assert found.tolist() == [True, True, False]
        shift = [0, 4, 3] if side == "left" else [0, 0, 0]
        assert pos.tolist() == [4 + shift[0], 1 + shift[1], 0]
        assert ids[0, pos[0]] == E and ids[1, pos[1]] == E


def test_padding_equal_to_the_token_is_never_matched():
    ids, mask = pad_sequences([[1, 2], [E]], pad_id=E, side="left")
    pos, found = last_token_positions(ids, E, mask)
    assert found.tolist() == [False, True]


def test_start_ignores_a_token_in_the_prompt():
    ids, mask = pad_sequences([[E, 1, 2, 3], [E, 1, E, 2]], P, side="right")
    pos, found = last_token_positions(ids, E, mask, start=torch.tensor([1, 1]))
    assert found.tolist() == [False, True] and pos[1] == 2


def test_packed_and_nested_layouts_match_padded():
    flat = torch.tensor([t for s in SEQS for t in s])
    cu = torch.tensor([0, 6, 8, 11])
    pos, found = last_token_positions_packed(flat, cu, E)
    assert found.tolist() == [True, True, False]
    assert pos[:2].tolist() == [4, 7]
    nested = torch.nested.as_nested_tensor([torch.tensor(s) for s in SEQS], layout=torch.jagged)
    pos_n, found_n = last_token_positions_nested(nested, E)
    assert pos_n.tolist() == pos.tolist() and found_n.tolist() == found.tolist()
    # (1, T) input as produced by verl's remove-padding path, with a per-sequence start
    pos_s, found_s = last_token_positions_packed(flat[None], cu, E, start=torch.tensor([5, 0, 0]))
    assert found_s.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="cu_seqlens"):
        last_token_positions_packed(flat, torch.tensor([0, 6, 8]), E)


def test_gather_normalises_and_zeroes_missing_rows():
    hidden = torch.randn(3, 6, 4, requires_grad=True)
    ids, mask = pad_sequences(SEQS, P, side="right")
    pos, found = last_token_positions(ids, E, mask)
    emb = gather_embeddings(hidden, pos, found)
    assert emb.shape == (3, 4)
    torch.testing.assert_close(emb[0], hidden[0, 4] / hidden[0, 4].norm())
    torch.testing.assert_close(emb[1], hidden[1, 1] / hidden[1, 1].norm())
    assert torch.all(emb[2] == 0)
    emb.sum().backward()
    assert hidden.grad[0, 4].abs().sum() > 0 and hidden.grad[0, 2].abs().sum() == 0
    assert hidden.grad[2].abs().sum() == 0
    raw = gather_embeddings(hidden.detach(), pos, found, normalize=False)
    torch.testing.assert_close(raw[0], hidden[0, 4].detach())


def test_hook_equals_output_hidden_states_and_base_model(tiny_qwen):
    model, tok = tiny_qwen
    seqs = [embed_prompt_ids(tok, t, "document") for t in ("shock waves", "a much longer text on boundary layers")]
    ids, mask = pad_sequences(seqs, tok.pad_token_id, side="left")
    with torch.no_grad(), FinalNormCapture(model) as cap:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hooked = cap.pop()
        base = last_hidden_states(model, ids, mask)
    torch.testing.assert_close(hooked, out.hidden_states[-1])
    torch.testing.assert_close(base, out.hidden_states[-1])
    with pytest.raises(RuntimeError):
        cap.output  # popped and detached


def test_hook_only_with_grad_skips_no_grad_forwards(tiny_qwen):
    model, _ = tiny_qwen
    ids = torch.tensor([[1, 2, 3]])
    with FinalNormCapture(model, only_with_grad=True) as cap:
        with torch.no_grad():
            model(input_ids=ids)
        with pytest.raises(RuntimeError):
            cap.output
        model(input_ids=ids)
        assert cap.output.requires_grad


def test_packed_forward_embeddings_equal_padded(tiny_qwen):
    """The packed layout (one row + offsets) gives the same embeddings as padding."""
    model, tok = tiny_qwen
    tid = embed_token_id(tok)
    seqs = [embed_prompt_ids(tok, t, "query") for t in ("drag", "heat transfer in hypersonic flow")]
    ids, mask = pad_sequences(seqs, tok.pad_token_id, side="right")
    with torch.no_grad():
        hidden = last_hidden_states(model, ids, mask)
        pos, found = last_token_positions(ids, tid, mask)
        padded = gather_embeddings(hidden, pos, found)
        # packed: run each sequence alone, concatenate rows as verl's remove-padding does
        packed_hidden = torch.cat([last_hidden_states(model, torch.tensor([s]))[0] for s in seqs])
        cu = torch.tensor([0, len(seqs[0]), len(seqs[0]) + len(seqs[1])])
        ppos, pfound = last_token_positions_packed(torch.tensor(sum(seqs, [])), cu, tid)
        packed = gather_embeddings(packed_hidden, ppos, pfound)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.norm(dim=-1), torch.ones(2))


def test_find_final_norm_through_wrapper_names(tiny_qwen):
    model, _ = tiny_qwen
    assert find_final_norm(model) is model.model.norm

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    assert find_final_norm(Wrapper(model)) is model.model.norm
    with pytest.raises(ValueError, match="final norm"):
        find_final_norm(torch.nn.Linear(2, 2))
