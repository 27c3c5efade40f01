"""Rollout for reason-then-embed: a single-turn agent loop that ends at ``<|embed_token|>``.

``search_r3_agent`` (select with ``actor_rollout_ref.rollout.agent.default_agent_loop``) is
verl's single-turn loop with two explicit behaviours, configured in ``search_r3.rollout``:

* ``stop_at_embed_token`` (default true): the embed token is a stop token of the sampler, so
  generation ends exactly at the embedding position and no tokens are wasted after it.
* ``on_missing_token``: what to do with a response that has no embed token (it hit the length
  limit, or the model stopped without it):

  - ``"penalize"`` (default): keep it as sampled; the reward manager gives it
    ``search_r3.reward.missing_token_score`` and ``format_ok = 0``.
  - ``"force"``: append the embed token (replacing the last token when the response is at its
    length limit) with ``response_mask = 0``, so it is read for the embedding but never trained
    on: the trained tokens stay exactly the sampled tokens.

``extra_fields[FORCED_KEY]`` (``"search_r3_forced"``) records whether the token was forced; the
trainer reports its mean as ``search_r3/forced``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from ..config_utils import dataclass_from_dict
from ..tokens import embed_token_id

__all__ = ["FORCED_KEY", "RolloutConfig", "SearchR3AgentLoop", "end_with_embed_token", "force_embed_token"]

FORCED_KEY = "search_r3_forced"
"""``extra_fields`` key: whether the rollout's embed token was appended (``on_missing_token=force``)."""


@dataclass(frozen=True)
class RolloutConfig:
    """``search_r3.rollout`` block: how a reason-then-embed rollout ends (see module docstring)."""

    stop_at_embed_token: bool = True
    on_missing_token: Literal["penalize", "force"] = "penalize"

    def __post_init__(self) -> None:
        if self.on_missing_token not in ("penalize", "force"):
            raise ValueError(f"search_r3.rollout.on_missing_token must be 'penalize' or 'force', got {self.on_missing_token!r}")


def force_embed_token(
    ids: list[int], mask: list[int], logprobs: list[float] | None, token_id: int, max_length: int
) -> tuple[list[int], list[int], list[float] | None, bool]:
    """Append ``token_id`` with mask 0 (replacing the last token at ``max_length``) unless ``ids`` has it.

    Returns the new ``(ids, mask, logprobs, forced)``; the inputs are not modified.
    """
    if token_id in ids:
        return ids, mask, logprobs, False
    keep = min(len(ids), max_length - 1)
    ids, mask = [*ids[:keep], token_id], [*mask[:keep], 0]
    logprobs = [*logprobs[:keep], 0.0] if logprobs is not None else None
    return ids, mask, logprobs, True


def end_with_embed_token(output: AgentLoopOutput, token_id: int, max_response_length: int) -> bool:
    """:func:`force_embed_token` applied to an agent-loop output in place; return whether forced."""
    ids, mask, logprobs, forced = force_embed_token(
        list(output.response_ids), list(output.response_mask), output.response_logprobs, token_id, max_response_length
    )
    output.response_ids, output.response_mask, output.response_logprobs = ids, mask, logprobs
    return forced


@register("search_r3_agent")
class SearchR3AgentLoop(SingleTurnAgentLoop):
    """Single-turn rollout that ends with ``<|embed_token|>`` (see module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        knobs = OmegaConf.select(self.config, "search_r3.rollout", default=None)
        self.search_r3 = dataclass_from_dict(RolloutConfig, knobs, "search_r3.rollout")
        self.embed_token_id = embed_token_id(self.tokenizer)

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        params = dict(sampling_params)
        if self.search_r3.stop_at_embed_token:
            params["stop_token_ids"] = sorted({*params.get("stop_token_ids", []), self.embed_token_id})
        output = await super().run(params, **kwargs)
        forced = False
        if self.search_r3.on_missing_token == "force":
            forced = end_with_embed_token(output, self.embed_token_id, self.response_length)
        output.extra_fields[FORCED_KEY] = forced
        return output
