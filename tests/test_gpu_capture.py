"""GPU only: the embedding capture under FSDP2 + bf16 autocast, padded and packed (flash-attn
``use_remove_padding``), against an fp32 forward of the unsharded model.

This is what the CPU suite cannot show: verl's bf16 autocast around the forward, the packed
``(1, T)`` layout of flash-attn's varlen kernels at the embed token, and FSDP on CUDA.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


def _nested(seqs):
    return torch.nested.as_nested_tensor([torch.tensor(s) for s in seqs], layout=torch.jagged)


@pytest.mark.parametrize("use_remove_padding", [False, True])
def test_capture_under_fsdp_bf16_matches_an_fp32_forward(tmp_path, use_remove_padding):
    if use_remove_padding:
        pytest.importorskip("flash_attn")
    import torch.distributed as dist
    from tensordict import TensorDict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from verl.utils import tensordict_utils as tu
    from verl.utils.fsdp_utils import apply_fsdp2
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from verl_search_r3.embedding import last_hidden_states
    from verl_search_r3.rl.engine import EMBEDDING_KEY, add_embedding_outputs
    from verl_search_r3.tiny import build_tiny_qwen2
    from verl_search_r3.tokens import embed_token_id

    model, tok = build_tiny_qwen2(hidden_size=128, num_layers=2, seed=5)
    E = embed_token_id(tok)
    reference = copy.deepcopy(model).cuda().float().eval()
    model.config._attn_implementation = "flash_attention_2" if use_remove_padding else "sdpa"
    model.cuda()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        apply_fsdp2(model, {"mesh": init_device_mesh("cuda", (1,)), "mp_policy": mp}, {})
        eng = object.__new__(FSDPEngineWithLMHead)
        eng.pad_to_length, eng.use_ulysses_sp, eng.ulysses_sequence_parallel_size = False, False, 1
        eng.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
        eng.module, eng._autocast_dtype = model, torch.bfloat16
        add_embedding_outputs(eng, model, E)

        # the reasoning prompt quotes the token: the capture must take the last one of the response
        prompts = [[11, E, 12, 13, 14], [15, 16], [17, 18, 19]]
        responses = [[21, 22, E, 23, E], [24, E], [25, 26, 27, 28, 29, E]]
        seqs = [p + r for p, r in zip(prompts, responses)]
        mb = TensorDict(
            {"input_ids": _nested(seqs), "position_ids": _nested([list(range(len(s))) for s in seqs]),
             "prompts": _nested(prompts), "responses": _nested(responses)},
            batch_size=[len(seqs)],
        ).cuda()
        tu.assign_non_tensor(mb, temperature=1.0, use_remove_padding=use_remove_padding, calculate_entropy=False)
        with torch.no_grad():
            got = eng.forward_step(mb, loss_function=None, forward_only=True)[1]["model_output"][EMBEDDING_KEY].float()
            want = torch.stack([
                F.normalize(last_hidden_states(reference, torch.tensor([s]).cuda())[0, len(s) - 1 - s[::-1].index(E)], dim=0) for s in seqs
            ])
    finally:
        dist.destroy_process_group()
    assert got.shape == want.shape
    cos = (got * want).sum(-1)
    assert torch.all(cos > 0.995), cos  # bf16 compute vs fp32: the same vector up to rounding
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(seqs), device=got.device), atol=1e-3)
