"""The Search-R1 action protocol: tags, the action parser and the token-exact turn cut (pure
Python; the verl ``ToolParser`` built on it is :class:`~verl_search_r3.search_r1.tool.SearchR1ToolParser`).

A turn of the model is free text that should contain one action:

* ``<search> query </search>`` — the environment answers with
  ``<information>`` numbered documents ``</information>``;
* ``<answer> text </answer>`` — the trajectory ends.

Parsing (:func:`parse_action`) takes the first complete ``<search>…</search>`` or
``<answer>…</answer>`` pair (tags must match; the content is stripped). The turn is invalid
when there is none (no tag, an unclosed tag, a turn cut by the length limit), when the content
is empty, or when it holds another protocol tag (``<search> a <search> b </search>``: nested).

Generation stops at the first ``</search>`` or ``</answer>`` (sampler stop strings). For
engines that ignore stop strings, :func:`stop_cut` finds, token-exactly, the shortest prefix of
the sampled tokens whose text contains a stop string: the turn keeps exactly those sampled
tokens (and their log-probs) and nothing is re-tokenized.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "SEARCH",
    "ANSWER",
    "INFORMATION",
    "STOP_STRINGS",
    "PROTOCOL_TAGS",
    "Action",
    "parse_action",
    "stop_cut",
    "last_answer",
    "strip_information",
    "count_searches",
]

SEARCH, ANSWER, INFORMATION = "search", "answer", "information"
#: Sampler stop strings: a turn ends right after its action.
STOP_STRINGS: tuple[str, ...] = (f"</{SEARCH}>", f"</{ANSWER}>")
#: Every tag of the protocol, opening and closing.
PROTOCOL_TAGS: tuple[str, ...] = tuple(f"<{s}{t}>" for t in (SEARCH, ANSWER, INFORMATION) for s in ("", "/"))

_ACTION_RE = re.compile(rf"<({SEARCH}|{ANSWER})>(.*?)</\1>", re.DOTALL)
_ANSWER_RE = re.compile(rf"<{ANSWER}>(.*?)</{ANSWER}>", re.DOTALL)
_SEARCH_RE = re.compile(rf"<{SEARCH}>(.*?)</{SEARCH}>", re.DOTALL)
_INFORMATION_RE = re.compile(rf"<{INFORMATION}>.*?</{INFORMATION}>", re.DOTALL)

ActionKind = Literal["search", "answer", "invalid"]
InvalidReason = Literal["", "no_action", "unclosed_tag", "empty", "nested_tags"]


@dataclass(frozen=True)
class Action:
    """One parsed turn.

    Attributes:
        kind: ``"search"``, ``"answer"`` or ``"invalid"``.
        content: the stripped query or answer (``""`` when invalid).
        end: character offset just past the closing tag of the matched pair; -1 without one.
        reason: why the turn is invalid (``no_action``, ``unclosed_tag``, ``empty``,
            ``nested_tags``); ``""`` for a valid action.
    """

    kind: ActionKind
    content: str = ""
    end: int = -1
    reason: InvalidReason = ""


def parse_action(text: str) -> Action:
    """The action of one turn's text (see the module docstring)."""
    m = _ACTION_RE.search(text)
    if m is None:
        opened = any(f"<{t}>" in text for t in (SEARCH, ANSWER))
        return Action("invalid", reason="unclosed_tag" if opened else "no_action")
    content = m.group(2).strip()
    if any(tag in content for tag in PROTOCOL_TAGS):
        return Action("invalid", end=m.end(), reason="nested_tags")
    if not content:
        return Action("invalid", end=m.end(), reason="empty")
    return Action(m.group(1), content, m.end())  # type: ignore[arg-type]


def stop_cut(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], stops: Sequence[str] = STOP_STRINGS) -> int:
    """Number of leading tokens to keep: the shortest prefix whose text contains a stop string,
    or all tokens when none does. ``decode`` maps token ids to text.

    Containing a stop string is monotone in the prefix length, so this is a binary search:
    ``O(log n)`` decodes of at most ``n`` tokens.
    """
    if not token_ids or not any(s in decode(token_ids) for s in stops):
        return len(token_ids)
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(token_ids[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def strip_information(text: str) -> str:
    """``text`` without its ``<information>…</information>`` blocks (what the model generated)."""
    return _INFORMATION_RE.sub("", text)


def last_answer(text: str) -> str | None:
    """The stripped content of the last ``<answer>…</answer>`` in ``text``, or None.

    Unlike the original Search-R1 scorer (which decodes prompt + response and so needs a second
    match to skip the prompt's example), this is meant for the *response* text only.
    """
    matches = _ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def count_searches(text: str) -> int:
    """Number of complete ``<search>…</search>`` pairs in ``text``."""
    return len(_SEARCH_RE.findall(text))
