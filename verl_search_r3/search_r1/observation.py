"""Retrieved documents and how they are shown to the model.

* :class:`Passage` — one retrieved document: id, title, text, score. Index texts are stored in
  Search-R1's ``contents`` form, the title on the first line (:func:`split_contents`).
* :func:`format_passages` — Search-R1's document list, ``Doc {i}(Title: {title}) {text}`` per
  line, numbered from 1. Protocol tags inside documents are removed, so a retrieved text can
  neither close the observation early nor hand the model (or the reward) an ``<answer>``.
* :func:`observation_ids` — ``"\\n\\n<information>" + documents + "</information>\\n\\n"`` as
  token ids within a token budget: the documents are cut (right side), the wrapper is never.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .parser import INFORMATION, PROTOCOL_TAGS

__all__ = [
    "Passage",
    "split_contents",
    "join_contents",
    "format_passages",
    "observation_ids",
    "OBSERVATION_OPEN",
    "OBSERVATION_CLOSE",
]

#: The observation wrapper of Search-R1 (newlines included).
OBSERVATION_OPEN = f"\n\n<{INFORMATION}>"
OBSERVATION_CLOSE = f"</{INFORMATION}>\n\n"


def split_contents(contents: str) -> tuple[str, str]:
    """``(title, text)`` of a ``contents`` string: the first line is the title."""
    title, _, text = contents.partition("\n")
    return title.strip(), text.strip()


def join_contents(title: str | None, text: str) -> str:
    """The ``contents`` string of a document: title (newlines flattened) on the first line, then the text."""
    return f"{' '.join((title or '').split())}\n{(text or '').strip()}"


@dataclass(frozen=True)
class Passage:
    """One retrieved document (``score``: the retriever's, higher is better)."""

    doc_id: str
    title: str
    text: str
    score: float

    @classmethod
    def from_contents(cls, doc_id: str, contents: str, score: float) -> Passage:
        title, text = split_contents(contents)
        return cls(doc_id, title, text, float(score))

    @property
    def contents(self) -> str:
        return join_contents(self.title, self.text)


def _untag(text: str) -> str:
    for tag in PROTOCOL_TAGS:
        text = text.replace(tag, "")
    return text


def format_passages(passages: Sequence[Passage]) -> str:
    """Search-R1's numbered document list (one line per document, protocol tags removed)."""
    return "".join(f"Doc {i}(Title: {_untag(p.title)}) {_untag(p.text)}\n" for i, p in enumerate(passages, 1))


def observation_ids(tokenizer: PreTrainedTokenizerBase, documents: str, budget: int) -> tuple[list[int], bool] | None:
    """Token ids of the ``<information>`` block around ``documents``, at most ``budget`` tokens.

    Returns ``(ids, truncated)``, or None when even the empty wrapper does not fit. The
    documents are tokenized alone and cut on the right; the opening and closing parts are
    tokenized separately and always kept whole.
    """
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    head, tail = encode(OBSERVATION_OPEN), encode(OBSERVATION_CLOSE)
    room = budget - len(head) - len(tail)
    if room < 0:
        return None
    body = encode(documents.strip())
    return head + body[:room] + tail, len(body) > room
