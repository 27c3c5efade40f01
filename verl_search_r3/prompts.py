"""Prompt templates for reason-then-embed models, rendered through the tokenizer's chat template.

Three prompt forms (wording is ours; every string is an argument so a recipe can change it):

* **query with reasoning** — system + user turns only. The model writes a short analysis of the
  query and ends its reply with ``<|embed_token|>``; this is the RL rollout prompt and the
  inference prompt for queries with ``reasoning=True``.
* **query direct** — system + user + an assistant turn that is just ``Embedding: <|embed_token|>``.
* **document** — the same shape for corpus documents, which are embedded without reasoning so
  the corpus can be pre-encoded once per model version.

The embed prompts are *cut right after the last* ``<|embed_token|>`` of the rendered chat, so the
token sequence ends at the embedding position whatever the chat template appends after an
assistant turn (``<|im_end|>``, a newline, ...). :func:`embed_prompt_ids` tokenizes them with a
length budget that truncates the *content* and never drops the embed token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from .tokens import EMBED_TOKEN

__all__ = [
    "PromptTemplates",
    "DEFAULT_TEMPLATES",
    "format_document",
    "query_reasoning_messages",
    "query_direct_messages",
    "document_messages",
    "render_generation_prompt",
    "render_embed_prompt",
    "embed_prompt_ids",
    "EmbedKind",
]

EmbedKind = Literal["query", "document"]

_QUERY_REASONING_SYSTEM = (
    "You prepare search queries for a vector search engine. Read the query, then write a short "
    "analysis that a good embedding should capture: the main concepts and how they relate, the "
    "key terms with one-line definitions, useful synonyms or alternative phrasings, and the kind "
    "of document that would answer it. Be brief and do not answer the query itself. "
    f"Finish your reply with {EMBED_TOKEN}, which stands for the embedding of the query."
)
_QUERY_DIRECT_SYSTEM = "Encode the search query below as a vector for finding documents that answer it."
_DOCUMENT_SYSTEM = "Encode the document below as a vector so that search queries it answers can find it."
_EMBED_REPLY = f"Embedding: {EMBED_TOKEN}"


@dataclass(frozen=True)
class PromptTemplates:
    """The wording of the three prompt forms. ``embed_reply`` must contain ``embed_token``."""

    query_reasoning_system: str = _QUERY_REASONING_SYSTEM
    query_direct_system: str = _QUERY_DIRECT_SYSTEM
    document_system: str = _DOCUMENT_SYSTEM
    embed_reply: str = _EMBED_REPLY
    embed_token: str = EMBED_TOKEN

    def __post_init__(self) -> None:
        if self.embed_token not in self.embed_reply:
            raise ValueError(f"embed_reply {self.embed_reply!r} must contain {self.embed_token!r}")


DEFAULT_TEMPLATES = PromptTemplates()


def format_document(title: str | None, text: str) -> str:
    """The text of a corpus document as every component embeds it: ``title + " " + text``."""
    title = (title or "").strip()
    text = (text or "").strip()
    return f"{title} {text}".strip()


def query_reasoning_messages(query: str, t: PromptTemplates = DEFAULT_TEMPLATES) -> list[dict[str, str]]:
    """Chat messages (system, user) asking the model to analyse ``query`` and end with the token."""
    return [{"role": "system", "content": t.query_reasoning_system}, {"role": "user", "content": query}]


def query_direct_messages(query: str, t: PromptTemplates = DEFAULT_TEMPLATES) -> list[dict[str, str]]:
    """Chat messages (system, user, assistant ending in the embed token) for a query without reasoning."""
    return [
        {"role": "system", "content": t.query_direct_system},
        {"role": "user", "content": query},
        {"role": "assistant", "content": t.embed_reply},
    ]


def document_messages(document: str, t: PromptTemplates = DEFAULT_TEMPLATES) -> list[dict[str, str]]:
    """Chat messages (system, user, assistant ending in the embed token) for a corpus document."""
    return [
        {"role": "system", "content": t.document_system},
        {"role": "user", "content": document},
        {"role": "assistant", "content": t.embed_reply},
    ]


def _messages(kind: EmbedKind, content: str, t: PromptTemplates) -> list[dict[str, str]]:
    if kind == "query":
        return query_direct_messages(content, t)
    if kind == "document":
        return document_messages(content, t)
    raise ValueError(f"unknown prompt kind {kind!r}; use 'query' or 'document'")


def render_generation_prompt(tokenizer: PreTrainedTokenizerBase, query: str, t: PromptTemplates = DEFAULT_TEMPLATES) -> str:
    """The reasoning prompt for ``query`` as text, ending with the assistant header."""
    return tokenizer.apply_chat_template(query_reasoning_messages(query, t), tokenize=False, add_generation_prompt=True)


def render_embed_prompt(
    tokenizer: PreTrainedTokenizerBase, content: str, kind: EmbedKind, t: PromptTemplates = DEFAULT_TEMPLATES
) -> str:
    """A direct-query or document prompt as text, ending exactly with the embed token."""
    text = tokenizer.apply_chat_template(_messages(kind, content, t), tokenize=False)
    cut = text.rfind(t.embed_token)
    if cut < 0:  # a chat template that drops assistant content would lose the token
        raise ValueError(f"the chat template of {type(tokenizer).__name__} dropped {t.embed_token!r}")
    return text[: cut + len(t.embed_token)]


def embed_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    content: str,
    kind: EmbedKind,
    max_length: int | None = None,
    t: PromptTemplates = DEFAULT_TEMPLATES,
) -> list[int]:
    """Token ids of an embed prompt, at most ``max_length`` long, always ending with the embed token.

    The prompt is split into (template prefix, content, template suffix); only the content is
    truncated (from the right) to fit the budget. Pieces are tokenized separately, which is
    how every component in this project tokenizes embed prompts, so training and inference agree.
    """
    sentinel = "\x00CONTENT\x00"
    rendered = render_embed_prompt(tokenizer, sentinel, kind, t)
    if rendered.count(sentinel) != 1:
        raise ValueError("the chat template must include the user content exactly once")
    prefix, suffix = rendered.split(sentinel)

    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    pre, body, suf = enc(prefix), enc(content), enc(suffix)
    if max_length is not None:
        budget = max_length - len(pre) - len(suf)
        if budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for content (template takes {len(pre) + len(suf)} tokens)")
        body = body[:budget]
    return pre + body + suf
