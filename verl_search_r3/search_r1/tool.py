"""verl tool adapters of the Search-R1 protocol: the search tool and the ``search_r1`` tool parser.

* :class:`SearchR1Tool` — a verl ``BaseTool`` (``execute(query=...)`` or ``query_list``) over a
  search index (:mod:`.retrieval`). Its text is Search-R1's numbered document list; the
  ``search_r1_agent`` loop wraps it in ``<information>`` within a token budget, verl's
  ``tool_agent`` passes it on as a tool message. Declared in a tool YAML::

      tools:
        - class_name: verl_search_r3.search_r1.tool.SearchR1Tool
          config: {type: native, topk: 3, retriever: {index_dir: /path/to/index}}

  (``retriever`` takes every :class:`~.config.RetrieverConfig` key; no ``tool_schema`` needed).
  ``search_r1_agent`` builds the same tool from the ``search_r1.retriever`` block when no tool of
  that name is configured. Retrieval clients are shared by every tool of one process.
* :class:`SearchR1ToolParser` — ``<search> q </search>`` as a call of that tool, for verl's
  ``tool_agent`` (``multi_turn.format=search_r1``); the ``hermes`` format keeps working with the
  same tool, whose schema takes ``query``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from verl.experimental.agent_loop.tool_parser import FunctionCall, ToolParser
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.utils.ray_utils import get_event_loop

from .config import ProtocolConfig, RetrieverConfig
from .observation import format_passages
from .parser import SEARCH, parse_action

logger = logging.getLogger(__name__)

__all__ = ["SearchR1Tool", "SearchR1ToolParser", "PARSER_NAME", "search_tool_schema", "shared_search_tool"]

#: Name under which :class:`SearchR1ToolParser` is registered (``multi_turn.format``).
PARSER_NAME = "search_r1"

#: Tool-call failures answered to the model (mask 0) instead of documents.
TIMEOUT_TEXT = "The search engine did not answer in time; no documents this turn."
FAILURE_TEXT = "The search engine failed on this query; no documents this turn."
BAD_ARGUMENTS_TEXT = "The search needs a non-empty 'query' string (or a 'query_list' of them)."


def search_tool_schema(name: str = SEARCH) -> OpenAIFunctionToolSchema:
    """The tool's OpenAI schema (used by chat templates that render tools, e.g. for ``hermes``)."""
    return OpenAIFunctionToolSchema.model_validate(
        {
            "type": "function",
            "function": {
                "name": name,
                "description": "Look up a question in the document collection and return the best matching passages.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "What to search for, as a short question or phrase."}},
                    "required": ["query"],
                },
            },
        }
    )


class SearchR1Tool(BaseTool):
    """Searches the index of ``config["retriever"]`` and returns the top ``config["topk"]`` passages.

    Args:
        config: ``{"type": "native", "topk": int, "retriever": {RetrieverConfig keys}}``.
        tool_schema: optional schema; default :func:`search_tool_schema`.
    """

    _clients: dict[RetrieverConfig, Any] = {}

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None = None):
        values = dict(config)
        values.pop("type", None)
        self.topk = int(values.pop("topk", ProtocolConfig().topk))
        self.retriever = RetrieverConfig.from_dict(values.pop("retriever", None))
        if values:
            raise ValueError(f"unknown SearchR1Tool config keys {sorted(values)}; known: type, topk, retriever")
        if self.topk < 1:
            raise ValueError(f"SearchR1Tool topk must be >= 1, got {self.topk}")
        super().__init__(config, tool_schema or search_tool_schema())

    def client(self) -> Any:
        """The process-wide :class:`~.retrieval.RetrieverClient` of this retriever (created on first use)."""
        if self.retriever not in SearchR1Tool._clients:
            from .retrieval import RetrieverClient

            SearchR1Tool._clients[self.retriever] = RetrieverClient(self.retriever)
        return SearchR1Tool._clients[self.retriever]

    @staticmethod
    def queries(parameters: dict[str, Any]) -> list[str] | None:
        """The queries of a call (``query`` or ``query_list``), or None when malformed."""
        raw = parameters.get("query_list", parameters.get("query"))
        items = raw if isinstance(raw, list) else [raw]
        queries = [q.strip() for q in items if isinstance(q, str) and q.strip()]
        return queries if queries and len(queries) == len(items) else None

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs) -> tuple[ToolResponse, float, dict]:
        """Search; returns the formatted passages (one block per query), step reward 0 and metrics
        ``{queries, results, status}`` (status ``ok``, ``bad_arguments``, ``timeout`` or ``error``)."""
        queries = self.queries(parameters)
        if queries is None:
            return ToolResponse(text=BAD_ARGUMENTS_TEXT), 0.0, {"queries": 0, "results": 0, "status": "bad_arguments"}
        try:
            results = await self.client().search(queries, self.topk)
        except asyncio.TimeoutError:
            logger.warning("search timed out after %ss for %r", self.retriever.timeout_seconds, queries)
            return ToolResponse(text=TIMEOUT_TEXT), 0.0, {"queries": len(queries), "results": 0, "status": "timeout"}
        except Exception:  # a failing retriever must not kill the rollout; the model sees an error text
            logger.exception("search failed for %r", queries)
            return ToolResponse(text=FAILURE_TEXT), 0.0, {"queries": len(queries), "results": 0, "status": "error"}
        text = "\n".join(format_passages(passages) for passages in results)
        return ToolResponse(text=text), 0.0, {"queries": len(queries), "results": sum(map(len, results)), "status": "ok"}


_shared_tools: dict[tuple[RetrieverConfig, int], SearchR1Tool] = {}


def shared_search_tool(retriever: RetrieverConfig, topk: int) -> SearchR1Tool:
    """One :class:`SearchR1Tool` per (retriever, topk) and process (agent loops are built per trajectory)."""
    key = (retriever, topk)
    if key not in _shared_tools:
        _shared_tools[key] = SearchR1Tool({"type": "native", "topk": topk, "retriever": retriever.to_dict()})
    return _shared_tools[key]


@ToolParser.register(PARSER_NAME)
class SearchR1ToolParser(ToolParser):
    """``<search> query </search>`` as a call of the search tool, for verl's ``tool_agent``.

    A turn whose action (:func:`~.parser.parse_action`) is a search becomes one call
    ``{"name": tool_name, "arguments": {"query": ...}}``; an answer or an invalid turn has none,
    so ``tool_agent`` ends the trajectory there. The ``search_r1_agent`` loop parses turns itself
    and adds the invalid-action feedback, the final turn and the ``<information>`` observations.
    """

    #: Tool called for a search (the schema name of :class:`SearchR1Tool`).
    tool_name = SEARCH

    async def extract_tool_calls(self, responses_ids: list[int], tools=None) -> tuple[str, list[FunctionCall]]:
        text = await get_event_loop().run_in_executor(None, self.tokenizer.decode, responses_ids)
        action = parse_action(text)
        if action.kind != SEARCH:
            return text, []
        return text, [FunctionCall(name=self.tool_name, arguments=json.dumps({"query": action.content}, ensure_ascii=False))]
