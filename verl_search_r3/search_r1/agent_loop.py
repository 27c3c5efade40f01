"""``search_r1_agent``: Search-R1's multi-turn rollout on verl's agent loop, token-in/token-out.

Select with ``actor_rollout_ref.rollout.agent.default_agent_loop=search_r1_agent`` (or the
dataset column ``agent_name``); knobs in ``search_r1.protocol`` (:class:`~.config.ProtocolConfig`).

One trajectory is one assistant stream after the chat-templated prompt:

1. generate a turn (at most ``turn_max_tokens`` and the remaining response budget) with the
   stop strings ``</search>`` and ``</answer>``; the turn is also cut token-exactly at the first
   stop string (:func:`~.parser.stop_cut`) for engines without stop strings. The kept tokens are
   exactly the sampled ones (mask 1, with their sampler log-probs): nothing is re-tokenized;
2. parse its action (:func:`~.parser.parse_action`):

   * ``answer`` → done;
   * ``search`` → the search tool's documents as ``\\n\\n<information>…</information>\\n\\n``
     within ``max_obs_tokens`` (documents cut, closing tag kept), mask 0;
   * invalid → the invalid-action feedback (``invalid_action_message``), mask 0;

3. after ``max_turns`` such rounds, one final turn (``final_turn``) in which a search is not run.

An observation is appended only if at least one more token can be generated after it, so the
last response token is always a sampled one (where verl puts the reward). Observation tokens
have ``response_mask`` 0: verl's V1 trainer uses that mask for the policy loss, the entropy
and KL terms, the token-mean normaliser and the advantages (``tests/test_search_r1_masking.py``).

``extra_fields`` keep the server's weight versions (``min_global_steps`` of the first turn,
``max_global_steps`` of the last, which verl's V1 trainer reads) and add (passed to the reward
manager as ``tool_extra_fields``): ``search_r1_searches``,
``search_r1_invalid_actions``, ``search_r1_answered``, ``search_r1_turns``,
``search_r1_refused_searches`` (in the final turn), ``search_r1_truncated_observations``,
``search_r1_failed_searches`` (timeouts and retriever errors).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, ToolListWrap, register
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.tools.base_tool import BaseTool
from verl.utils.profiler import simple_timer

from .config import AGENT_NAME, ProtocolConfig, SearchR1Settings
from .observation import observation_ids
from .parser import ANSWER, SEARCH, STOP_STRINGS, parse_action, stop_cut
from .tool import shared_search_tool

__all__ = ["SearchR1AgentLoop", "TrajectoryStats"]


@dataclass
class TrajectoryStats:
    """Counts of one trajectory (``extra_fields`` with the ``search_r1_`` prefix)."""

    searches: int = 0
    invalid_actions: int = 0
    answered: int = 0
    turns: int = 0
    refused_searches: int = 0
    truncated_observations: int = 0
    failed_searches: int = 0

    def as_extra_fields(self) -> dict[str, int]:
        return {f"search_r1_{k}": v for k, v in asdict(self).items()}


@register(AGENT_NAME)
class SearchR1AgentLoop(AgentLoopBase):
    """Search-R1 rollout (see the module docstring).

    The search tool is the verl tool named ``search_r1.protocol.tool_name`` when a tool YAML
    declares one, else a :class:`~.tool.SearchR1Tool` built from ``search_r1.retriever``.
    """

    def __init__(self, *args: Any, tools: ToolListWrap | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        settings = SearchR1Settings.from_config(self.config)
        self.protocol: ProtocolConfig = settings.protocol
        configured = {t.name: t for t in (tools.tools if tools else [])}
        self.tool: BaseTool = configured.get(self.protocol.tool_name) or shared_search_tool(settings.retriever, self.protocol.topk)
        self.response_length: int = self.rollout_config.response_length
        self.invalid_ids: list[int] = self.tokenizer.encode(self.protocol.feedback, add_special_tokens=False)

    async def _search(self, query: str, tools_kwargs: dict[str, Any]) -> tuple[str, bool]:
        """Run the tool once (create, execute, release); returns ``(text, ok)``."""
        create_kwargs = tools_kwargs.get(self.tool.name, {}).get("create_kwargs", {})
        instance_id, _ = await self.tool.create(create_kwargs=create_kwargs)
        try:
            response, _, metrics = await self.tool.execute(instance_id, {"query": query})
        finally:
            await self.tool.release(instance_id)
        return response.text or "", metrics.get("status", "ok") == "ok"

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs: Any) -> AgentLoopOutput:
        p = self.protocol
        metrics: dict[str, Any] = {}
        request_id = ToolAgentLoop._make_request_id(priority, self.rollout_config.full_determinism)
        tools_kwargs = kwargs.get("tools_kwargs") or {}
        prompt_ids = await self.ct_build_initial_tokens(list(kwargs["raw_prompt"]))
        params = dict(sampling_params)
        if p.stop_at_action:
            params["stop"] = sorted({*params.get("stop", []), *STOP_STRINGS})
            params["include_stop_str_in_output"] = True

        ids: list[int] = []
        mask: list[int] = []
        logprobs: list[float] | None = []
        stats = TrajectoryStats()
        server_fields: dict[str, Any] = {}  # weight versions etc. from the server, as verl's loops keep them
        rounds = 0
        num_preempted = 0
        while len(ids) < self.response_length:
            final = rounds >= p.max_turns
            budget = min(p.turn_max_tokens, self.response_length - len(ids))
            with simple_timer("generate_sequences", metrics):
                out = await self.server_manager.generate(
                    request_id=request_id, prompt_ids=prompt_ids + ids, sampling_params={**params, "max_tokens": budget}
                )
            num_preempted += out.num_preempted or 0
            if not server_fields:
                server_fields = dict(out.extra_fields)
            elif out.extra_fields.get("max_global_steps") is not None:
                server_fields["max_global_steps"] = out.extra_fields["max_global_steps"]
            keep = min(stop_cut(out.token_ids, self.tokenizer.decode), budget)
            turn = list(out.token_ids[:keep])
            ids += turn
            mask += [1] * len(turn)
            if logprobs is not None and out.log_probs is not None:
                logprobs += list(out.log_probs[:keep])
            else:
                logprobs = None
            stats.turns += 1
            action = parse_action(self.tokenizer.decode(turn))
            if action.kind == ANSWER:
                stats.answered = 1
                break
            if final:
                stats.refused_searches += action.kind == SEARCH
                break
            rounds += 1
            if rounds >= p.max_turns and not p.final_turn:  # no generation would follow this observation
                stats.refused_searches += action.kind == SEARCH
                break
            room = self.response_length - len(ids) - 1  # leave one token to generate after it
            if action.kind == SEARCH:
                stats.searches += 1
                with simple_timer("tool_calls", metrics):
                    documents, ok = await self._search(action.content, tools_kwargs)
                stats.failed_searches += not ok
                block = observation_ids(self.tokenizer, documents, min(p.max_obs_tokens, room))
                if block is None:
                    break
                obs, truncated = block
                stats.truncated_observations += truncated
            else:
                stats.invalid_actions += 1
                if len(self.invalid_ids) > room:
                    break
                obs = self.invalid_ids
            ids += obs
            mask += [0] * len(obs)
            if logprobs is not None:
                logprobs += [0.0] * len(obs)

        metrics["num_preempted"] = num_preempted
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=ids,
            response_mask=mask,
            response_logprobs=logprobs if logprobs else None,
            num_turns=2 * stats.turns,  # prompt + each generation + each observation but the last
            metrics=metrics,
            extra_fields={**server_fields, "turn_scores": [], "tool_rewards": [], **stats.as_extra_fields()},
        )
