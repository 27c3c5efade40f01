"""Retrieved tokens are masked from every loss term in verl 0.9.1's V1 path: checked on verl's code.

What reaches the actor: the agent loop's ``response_mask`` (observation tokens 0) becomes the
``response_mask`` and ``loss_mask`` fields of the batch (``AgentLoopOutput.as_dict`` and
``agent_loop_tq``: ``loss_mask = response_mask``); the FSDP engine's token-mean normaliser is
``batch_num_tokens = loss_mask.sum()``. Here verl's own ``ppo_loss`` (policy loss, entropy bonus,
low-var KL loss), GRPO advantages and the in-reward KL penalty run on such a batch: no gradient
and no advantage reaches an observation token, and the token mean divides by sampled tokens only.
"""

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
from verl.trainer.ppo.core_algos import FixedKLController, compute_grpo_outcome_advantage
from verl.trainer.ppo.ray_trainer import apply_kl_penalty
from verl.utils import tensordict_utils as tu
from verl.workers.config.actor import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

PROMPT = [11, 12, 13]
# a Search-R1 trajectory: search turn (sampled), observation, answer turn (sampled)
RESPONSE = [21, 22, 23, 31, 32, 33, 34, 24, 25]
MASK = [1, 1, 1, 0, 0, 0, 0, 1, 1]


def nj(rows, dtype):
    return torch.nested.as_nested_tensor([torch.as_tensor(r, dtype=dtype) for r in rows], layout=torch.jagged)


def test_agent_loop_output_carries_the_mask_into_the_batch():
    out = AgentLoopOutput(prompt_ids=PROMPT, response_ids=RESPONSE, response_mask=MASK, metrics={})
    fields = out.as_dict()
    assert fields["response_mask"].tolist() == MASK and fields["responses"].tolist() == RESPONSE


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-sum"])
def test_ppo_loss_entropy_and_kl_ignore_observation_tokens(loss_agg_mode):
    torch.manual_seed(0)
    seq = len(PROMPT) + len(RESPONSE)
    log_probs = (-torch.rand(seq)).requires_grad_()
    entropy = torch.rand(seq).requires_grad_()
    model_output = {"log_probs": nj([log_probs], torch.float32), "entropy": nj([entropy], torch.float32)}
    data = TensorDict(
        {
            "prompts": nj([PROMPT], torch.long),
            "responses": nj([RESPONSE], torch.long),
            "response_mask": nj([MASK], torch.float32),
            "old_log_probs": nj([log_probs.detach()[len(PROMPT) - 1 : -1] - 0.05], torch.float32),
            "advantages": nj([[0.7] * len(RESPONSE)], torch.float32),
            "ref_log_prob": nj([torch.full((len(RESPONSE),), -2.0)], torch.float32),
        },
        batch_size=[1],
    )
    # as the engine does: the global token count is the sum of the loss mask (= response mask)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(sum(MASK)), global_batch_size=1)
    config = ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=PolicyLossConfig(loss_mode="vanilla"),
        use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl", entropy_coeff=0.01, loss_agg_mode=loss_agg_mode,
    )
    loss, metrics = ppo_loss(config, model_output, data)
    loss.backward()
    # response token t is scored at sequence position len(PROMPT) - 1 + t
    at = [len(PROMPT) - 1 + t for t in range(len(RESPONSE))]
    for t, m in enumerate(MASK):
        if m:
            assert log_probs.grad[at[t]] != 0 and entropy.grad[at[t]] != 0, t
        else:
            assert log_probs.grad[at[t]] == 0 and entropy.grad[at[t]] == 0, t
    assert {"actor/pg_loss", "actor/entropy_loss", "kl_loss"} <= set(metrics)
    if loss_agg_mode == "token-mean":
        # entropy term = mean over the 5 sampled tokens, not the 9 response tokens
        m = torch.tensor(MASK, dtype=torch.bool)
        expected = entropy.detach()[at][m].mean()
        assert metrics["actor/entropy_loss"].aggregate() == pytest.approx(expected.item(), rel=1e-5)


def test_grpo_advantages_and_kl_in_reward_ignore_observation_tokens():
    mask = torch.tensor([MASK, [1] * len(RESPONSE)], dtype=torch.float32)
    scores = torch.zeros_like(mask)
    scores[0, -1], scores[1, -1] = 1.0, 0.0
    adv, _ = compute_grpo_outcome_advantage(scores, mask, np.array(["g", "g"], dtype=object))
    assert torch.all(adv[0][mask[0] == 0] == 0) and torch.all(adv[0][mask[0] == 1] > 0)
    data = DataProto(batch=TensorDict({
        "response_mask": mask, "token_level_scores": scores,
        "old_log_probs": torch.full_like(mask, -1.0), "ref_log_prob": torch.full_like(mask, -3.0),
    }, batch_size=[2]))
    out, _ = apply_kl_penalty(data, FixedKLController(0.1), kl_penalty="kl")
    penalty = scores - out.batch["token_level_rewards"]
    assert torch.all(penalty[0][mask[0] == 0] == 0) and torch.all(penalty[0][mask[0] == 1] > 0)
