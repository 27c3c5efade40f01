"""Stage-1 data: (query, positive, hard negatives) groups from ``pairs.parquet`` for verl's SFT trainer.

One dataset item is one **group** of ``G = 2 + num_negatives`` sequences, in this order::

    [query, positive, negative_1, ..., negative_N]

:class:`GroupCollator` flattens a batch of ``B`` groups into ``B * G`` sequences (jagged nested
tensors, verl's ``no_padding`` layout), group after group. verl keeps them together: the trainer
sets verl's ``force_group_size = G`` on every batch, and ``prepare_micro_batches``
(``verl/workers/engine/utils.py``) then splits only at group boundaries, with dynamic batch
sizes (``rearrange_micro_batches`` balances whole groups; a group longer than
``max_token_len_per_gpu`` is a clear verl error) and with fixed ones (``micro_batch_size_per_gpu``
then counts *groups*). The loss re-checks the layout (:func:`check_groups`), so a split group is
an error, never a silent wrong loss.

Every sequence is a chat prompt that ends exactly at ``<|embed_token|>``:

* queries: the **query-direct** form (:func:`~verl_search_r3.prompts.query_direct_messages`), or,
  for rows with a reasoning trace (column ``reasoning_key``) and with probability
  ``reasoning_fraction``, the **query-with-reasoning** form: the reasoning prompt followed by the
  trace and the token, as the model will generate it;
* positives and negatives: the **document** form.

``loss_mask`` is 1 on the assistant turn of the reasoning form (the tokens the model will
generate: the trace and the token), for the SFT and KL terms; with ``train_fixed_replies`` also on
the fixed reply ``Embedding: <|embed_token|>`` of the direct forms.
Groups with fewer hard negatives than ``num_negatives`` are padded with empty documents marked
invalid (:data:`VALID_KEY`); invalid sequences are masked out of every loss.

Per-sequence tensors besides ``input_ids`` / ``position_ids`` / ``loss_mask`` (``S = B * G``):

* :data:`ROLE_KEY` ``(S,)``: :data:`ROLE_QUERY`, :data:`ROLE_POSITIVE` or :data:`ROLE_NEGATIVE`;
* :data:`GROUP_KEY` ``(S,)``: the dataset index of the sequence's group;
* :data:`DOC_KEY` ``(S,)``: stable 63-bit key of the document id (queries: of the query id);
* :data:`VALID_KEY` ``(S,)``: False for padding negatives;
* :data:`RELEVANT_KEY` ``(S, R)``: keys of every document relevant to the group's query (all
  rows of the input files, any split), ``-1`` padded — so a document relevant to query ``i``
  is never one of its in-batch negatives (:func:`relevance_exclusion`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from ..config_utils import dataclass_from_dict
from ..prompts import PromptTemplates, embed_prompt_ids, query_reasoning_messages, render_generation_prompt
from ..tokens import embed_token_id

__all__ = [
    "ROLE_QUERY",
    "ROLE_POSITIVE",
    "ROLE_NEGATIVE",
    "ROLE_KEY",
    "GROUP_KEY",
    "DOC_KEY",
    "VALID_KEY",
    "RELEVANT_KEY",
    "GroupDataConfig",
    "PairsGroupDataset",
    "GroupCollator",
    "stable_key",
    "check_groups",
    "split_groups",
    "relevance_exclusion",
]

logger = logging.getLogger(__name__)

ROLE_QUERY, ROLE_POSITIVE, ROLE_NEGATIVE = 0, 1, 2
ROLE_KEY = "search_r3_role"
GROUP_KEY = "search_r3_group"
DOC_KEY = "search_r3_doc_key"
VALID_KEY = "search_r3_valid"
RELEVANT_KEY = "search_r3_relevant"

_FROM_CONFIG = "from_config"
"""Default ``split`` of :class:`PairsGroupDataset`: ``data.search_r3.train_split``."""
_REQUIRED_COLUMNS = ("query_id", "query", "pos_id", "pos_text", "neg_ids", "neg_texts")
_ID_COLUMNS = ("query_id", "pos_id")
_TEXT_COLUMNS = ("query", "pos_text")
_LIST_COLUMNS = ("neg_ids", "neg_texts")
_PAD_KEY = -1


@dataclass
class GroupDataConfig:
    """Dataset knobs (config block ``data.search_r3``).

    Attributes:
        num_negatives: hard negatives per group (first ones of ``neg_ids``, i.e. the hardest);
            fewer are padded with masked empty documents. Group size is ``2 + num_negatives``.
        query_max_length: token budget of a query prompt (direct form cuts the query text;
            reasoning form cuts the trace).
        doc_max_length: token budget of a document prompt (the text is cut, never the token).
        reasoning_key: column holding a reasoning trace for the query; absent or empty = none.
        reasoning_fraction: share of the queries *with a trace* trained in the reasoning form
            (the rest use the direct form); drawn once per row from ``seed``.
        train_split: ``split`` value of the training rows; null = all rows.
        val_split: ``split`` value of the validation rows; null = all rows.
        seed: seed of the reasoning/direct draw.
        train_fixed_replies: SFT and KL also on the fixed reply (``Embedding: <|embed_token|>``) of
            the query-direct and document forms. Those replies are prompt text at inference (the
            direct prompts end at the token; nothing is generated), so the default (False) trains
            generation only where the model writes: the reasoning form. True teaches the model to
            answer ``Embedding:`` to the reasoning prompt too, skipping the analysis
            (``benchmarks/reasoning_cold_start.py``: replies of ~5 tokens instead of ~40).
        templates: overrides of :class:`~verl_search_r3.prompts.PromptTemplates` fields
            (``query_reasoning_system``, ``query_direct_system``, ``document_system``, ``embed_reply``).
    """

    num_negatives: int = 4
    query_max_length: int = 256
    doc_max_length: int = 512
    reasoning_key: str = "reasoning"
    reasoning_fraction: float = 0.5
    train_split: str | None = "train"
    val_split: str | None = "val"
    seed: int = 0
    train_fixed_replies: bool = False
    templates: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_negatives < 0:
            raise ValueError(f"data.search_r3.num_negatives must be >= 0, got {self.num_negatives}")
        if not 0.0 <= self.reasoning_fraction <= 1.0:
            raise ValueError(f"data.search_r3.reasoning_fraction must be in [0, 1], got {self.reasoning_fraction}")

    @property
    def group_size(self) -> int:
        """Sequences per group: query, positive and the negatives."""
        return 2 + self.num_negatives

    @classmethod
    def from_config(cls, cfg: Any) -> GroupDataConfig:
        """From a mapping or an OmegaConf node (missing keys take the defaults above)."""
        return dataclass_from_dict(cls, cfg, "data.search_r3")


def stable_key(text: str) -> int:
    """A non-negative 63-bit integer key of ``text``, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def _column_types(table: pa.Table, name: str) -> pa.Table:
    """``table`` with its id columns as strings (integer ids are accepted and written as text) and
    list columns as ``list<string>``; any other type is an error naming the column."""
    columns = {}
    for col in table.column_names:
        data, t = table.column(col), table.schema.field(col).type
        if (col in _ID_COLUMNS and pa.types.is_integer(t)) or (col in (*_ID_COLUMNS, *_TEXT_COLUMNS) and pa.types.is_null(t)):
            data = data.cast(pa.string())
        elif col in _LIST_COLUMNS and pa.types.is_null(t):
            data = data.cast(pa.list_(pa.string()))
        elif col in _LIST_COLUMNS and (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type)
        ):
            data = data.cast(pa.list_(pa.string()))
        t = data.type
        if col in _LIST_COLUMNS and not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text(t.value_type)):
            hint = " (a list written as text? store it as a list column)" if _is_text(t) else ""
            raise ValueError(f"{name}: column {col!r} has type {t}, expected list<string>{hint}")
        if col in (*_ID_COLUMNS, *_TEXT_COLUMNS) and not _is_text(t):
            raise ValueError(f"{name}: column {col!r} has type {t}, expected string")
        columns[col] = data
    return pa.table(columns)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _usable_rows(table: pa.Table, name: str) -> pa.Table:
    """``table`` without the rows that cannot make a group: a null or blank ``query_id``,
    ``query``, ``pos_id`` or ``pos_text`` (a null query would train as an empty one). Each
    skipped row is counted in one warning naming the first few; none left is an error."""
    bad = np.zeros(table.num_rows, dtype=bool)
    reasons = np.full(table.num_rows, "", dtype=object)
    for col in (*_ID_COLUMNS, *_TEXT_COLUMNS):
        blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table.column(col))), 0), True)
        blank = np.asarray(blank.to_numpy(zero_copy_only=False), dtype=bool)
        reasons[blank & ~bad] = f"null or empty {col!r}"
        bad |= blank
    if not bad.any():
        return table
    rows = np.flatnonzero(bad)
    qids = table.column("query_id").to_pylist()
    examples = "; ".join(f"row {r} (query_id={qids[r]!r}): {reasons[r]}" for r in rows[:3])
    if bad.all():
        raise ValueError(f"{name}: no usable row: {examples}")
    logger.warning("%s: skipped %d of %d rows that cannot make a group, e.g. %s", name, len(rows), table.num_rows, examples)
    return table.filter(pa.array(~bad))


def _select_columns(table: pa.Table, name: str, reasoning_key: str) -> pa.Table:
    """The columns the dataset reads; clear error naming ``name`` when one is missing or has the
    wrong type."""
    missing = [c for c in _REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; expected the pairs.parquet layout of data_prep/build_pairs.py")
    table = table.select([*_REQUIRED_COLUMNS, *(c for c in ("split", reasoning_key) if c in table.column_names)])
    return _column_types(table, name)


def _read_pairs(source: str | Sequence[str] | pa.Table, reasoning_key: str) -> tuple[pa.Table, str]:
    """All usable pairs as one table (see :func:`_usable_rows`), and a name for messages."""
    if isinstance(source, pa.Table):
        return _usable_rows(_select_columns(source, "pairs table", reasoning_key), "pairs table"), "pairs table"
    paths = [source] if isinstance(source, str) else [str(p) for p in source]
    tables = [_select_columns(_read_parquet(p), p, reasoning_key) for p in paths]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    name = ", ".join(paths)
    return _usable_rows(table, name), name


def _read_parquet(path: str) -> pa.Table:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs parquet {path!r} does not exist")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


class PairsGroupDataset(Dataset):
    """``pairs.parquet`` rows as (query, positive, negatives) groups of token sequences.

    The constructor signature is the one verl's ``create_sft_dataset`` uses for
    ``data.custom_cls``; ``split`` selects rows by their ``split`` column (default:
    ``data.search_r3.train_split``).

    Args:
        parquet_files: one path or a list of paths with :data:`~verl_search_r3.data.outputs.PAIRS_SCHEMA`,
            or a ``pyarrow.Table`` with those columns.
        tokenizer: a tokenizer that has ``<|embed_token|>``.
        config: verl's ``data`` config block (its ``search_r3`` sub-block is read) or a
            :class:`GroupDataConfig`.
        processor: unused (verl's signature).
        max_samples: keep the first ``max_samples`` groups of the split; -1 = all.
        split: rows whose ``split`` equals this; None = all rows.
    """

    def __init__(
        self,
        parquet_files: str | Sequence[str] | pa.Table,
        tokenizer: PreTrainedTokenizerBase,
        config: Any = None,
        processor: Any = None,
        max_samples: int = -1,
        split: str | None = _FROM_CONFIG,
    ):
        if isinstance(config, GroupDataConfig):
            self.config = config
        else:
            block = None if config is None else config.get("search_r3", None)
            self.config = GroupDataConfig.from_config(block)
            pad_mode = None if config is None else config.get("pad_mode", "no_padding")
            if pad_mode not in (None, "no_padding"):
                raise ValueError(f"PairsGroupDataset needs data.pad_mode=no_padding (got {pad_mode!r})")
        cfg = self.config
        self.tokenizer = tokenizer
        self.templates = PromptTemplates(**cfg.templates)
        self.embed_id = embed_token_id(tokenizer, self.templates.embed_token)
        self.split = cfg.train_split if split == _FROM_CONFIG else split
        table, self.source = _read_pairs(parquet_files, cfg.reasoning_key)
        query_ids = table.column("query_id").to_pylist()
        relevant: dict[str, set[str]] = {}
        for qid, pid in zip(query_ids, table.column("pos_id").to_pylist()):
            relevant.setdefault(qid, set()).add(pid)
        self._relevant = {q: sorted(stable_key(p) for p in docs) for q, docs in relevant.items()}

        if self.split is not None:
            if "split" not in table.column_names:
                raise ValueError(f"{self.source}: no 'split' column to select split={self.split!r}; set it to null")
            rows = np.flatnonzero(np.asarray(table.column("split").to_pylist(), dtype=object) == self.split)
            table = table.take(pa.array(rows, type=pa.int64()))
        if max_samples is not None and max_samples >= 0:
            table = table.slice(0, max_samples)
        if table.num_rows == 0:
            raise ValueError(f"{self.source}: no rows with split={self.split!r}")
        self._columns = {name: table.column(name) for name in table.column_names}
        self._has_reasoning = cfg.reasoning_key in table.column_names
        self._header = self._assistant_header()

    def __len__(self) -> int:
        return len(self._columns["query_id"])

    def distinct_queries(self, limit: int) -> list[str]:
        """The texts of the first ``limit`` distinct queries of the selected rows (file order)."""
        seen: dict[str, str] = {}
        for qid, query in zip(self._columns["query_id"].to_pylist(), self._columns["query"].to_pylist()):
            if len(seen) >= limit:
                break
            seen.setdefault(qid, query)
        return list(seen.values())

    @property
    def group_size(self) -> int:
        return self.config.group_size

    def _value(self, column: str, index: int) -> Any:
        return self._columns[column][index].as_py()

    def _assistant_header(self) -> list[int]:
        """Token ids that open the assistant turn (``<|im_start|>assistant\\n`` for Qwen)."""
        msgs = query_reasoning_messages("x", self.templates)
        with_header = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        without = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        if not with_header.startswith(without) or len(with_header) == len(without):
            raise ValueError(f"cannot find the assistant header of {type(self.tokenizer).__name__}'s chat template")
        return self.tokenizer(with_header[len(without):], add_special_tokens=False)["input_ids"]

    def _embed_sequence(self, content: str, kind: str, max_length: int) -> tuple[list[int], int]:
        """Direct prompt ids and the index where the assistant turn starts."""
        ids = embed_prompt_ids(self.tokenizer, content, kind, max_length, self.templates)  # type: ignore[arg-type]
        header = self._header
        for start in range(len(ids) - len(header), -1, -1):
            if ids[start : start + len(header)] == header:
                return ids, start + len(header)
        raise ValueError(f"the {kind} prompt has no assistant header {header}; the chat template is not supported")

    def _reasoning_sequence(self, index: int, query: str, trace: str) -> tuple[list[int], int]:
        """Reasoning prompt + trace + embed token, the trace cut to ``query_max_length``."""
        prompt = self.tokenizer(render_generation_prompt(self.tokenizer, query, self.templates), add_special_tokens=False)["input_ids"]
        budget = self.config.query_max_length - len(prompt) - 1
        if budget < 0:
            raise ValueError(
                f"{self.source} row {index} (query_id={self._value('query_id', index)!r}): the reasoning prompt has "
                f"{len(prompt)} tokens, over data.search_r3.query_max_length={self.config.query_max_length}"
            )
        trace = trace.strip()
        if trace.endswith(self.templates.embed_token):
            trace = trace[: -len(self.templates.embed_token)].rstrip()
        body = self.tokenizer(trace, add_special_tokens=False)["input_ids"][:budget]
        return prompt + body + [self.embed_id], len(prompt)

    def _uses_reasoning(self, index: int) -> str | None:
        if not self._has_reasoning:
            return None
        trace = self._value(self.config.reasoning_key, index)
        if not trace or not str(trace).strip():
            return None
        draw = np.random.default_rng([self.config.seed, index]).random()
        return str(trace) if draw < self.config.reasoning_fraction else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        cfg = self.config
        query, qid = self._value("query", index), self._value("query_id", index)
        trace = self._uses_reasoning(index)
        if trace is None:
            seqs = [self._embed_sequence(query, "query", cfg.query_max_length)]
        else:
            seqs = [self._reasoning_sequence(index, query, trace)]
        seqs.append(self._embed_sequence(self._value("pos_text", index), "document", cfg.doc_max_length))
        neg_ids = list(self._value("neg_ids", index) or [])
        neg_texts = list(self._value("neg_texts", index) or [])
        if len(neg_ids) != len(neg_texts):
            raise ValueError(f"{self.source} row {index} (query_id={qid!r}): neg_ids and neg_texts differ in length")
        negatives = [(d, t) for d, t in zip(neg_ids, neg_texts) if d and d.strip() and t and t.strip()][: cfg.num_negatives]
        neg_ids, neg_texts = [d for d, _ in negatives], [t for _, t in negatives]  # null or empty negatives are padding
        n_pad = cfg.num_negatives - len(neg_ids)
        seqs += [self._embed_sequence(text, "document", cfg.doc_max_length) for text in neg_texts]
        seqs += [self._embed_sequence("", "document", cfg.doc_max_length)] * n_pad

        valid = [True] * (len(seqs) - n_pad) + [False] * n_pad
        trained = [trace is not None or cfg.train_fixed_replies] + [cfg.train_fixed_replies] * (len(seqs) - 1)
        input_ids, loss_mask = [], []
        for (ids, start), ok, train in zip(seqs, valid, trained):
            mask = torch.zeros(len(ids), dtype=torch.long)
            if ok and train:
                mask[start:] = 1
            input_ids.append(torch.tensor(ids, dtype=torch.long))
            loss_mask.append(mask)
        keys = [stable_key(qid), stable_key(self._value("pos_id", index))]
        keys += [stable_key(d) for d in neg_ids] + [_PAD_KEY] * n_pad
        return {
            "input_ids": input_ids,
            "position_ids": [torch.arange(len(t)) for t in input_ids],
            "loss_mask": loss_mask,
            ROLE_KEY: torch.tensor([ROLE_QUERY, ROLE_POSITIVE] + [ROLE_NEGATIVE] * cfg.num_negatives),
            GROUP_KEY: torch.full((len(seqs),), index, dtype=torch.long),
            DOC_KEY: torch.tensor(keys, dtype=torch.long),
            VALID_KEY: torch.tensor(valid),
            RELEVANT_KEY: torch.tensor(self._relevant[qid], dtype=torch.long),
        }


_SEQUENCE_KEYS = ("input_ids", "position_ids", "loss_mask")
_GROUP_KEYS = (ROLE_KEY, GROUP_KEY, DOC_KEY, VALID_KEY)


class GroupCollator:
    """Flatten a list of groups into one batch of sequences, group after group.

    ``input_ids`` / ``position_ids`` / ``loss_mask`` become jagged nested tensors ``(S, j)``
    (verl's ``no_padding`` layout); the per-sequence keys become ``(S,)`` tensors and
    :data:`RELEVANT_KEY` an ``(S, R)`` tensor padded with -1.
    """

    def __call__(self, groups: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for key in _SEQUENCE_KEYS:
            batch[key] = torch.nested.as_nested_tensor([t for g in groups for t in g[key]], layout=torch.jagged)
        for key in _GROUP_KEYS:
            batch[key] = torch.cat([g[key] for g in groups])
        width = max(len(g[RELEVANT_KEY]) for g in groups)
        rows = []
        for g in groups:
            rel = torch.full((width,), _PAD_KEY, dtype=torch.long)
            rel[: len(g[RELEVANT_KEY])] = g[RELEVANT_KEY]
            rows.append(rel.expand(len(g[ROLE_KEY]), width))
        batch[RELEVANT_KEY] = torch.cat(rows)
        return batch


def check_groups(roles: Tensor, groups: Tensor, group_size: int) -> None:
    """Raise unless the sequences form whole groups: ``[query, positive, negative * N]`` blocks
    of ``group_size`` sequences sharing one group index."""
    n = roles.shape[0]
    expected = torch.tensor([ROLE_QUERY, ROLE_POSITIVE] + [ROLE_NEGATIVE] * (group_size - 2), device=roles.device)
    ok = n % group_size == 0
    if ok and n:
        ok = bool((roles.view(-1, group_size) == expected).all()) and bool(
            (groups.view(-1, group_size) == groups.view(-1, group_size)[:, :1]).all()
        )
    if not ok:
        raise ValueError(
            f"a micro-batch of {n} sequences does not consist of whole (query, positive, negatives) groups of "
            f"{group_size}: the batch must carry verl's force_group_size={group_size} (set by the Search-R3 SFT "
            "trainer) so prepare_micro_batches never splits a group"
        )


def split_groups(values: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B * G, ...)`` per-sequence values -> query ``(B, ...)``, positive ``(B, ...)``, negatives ``(B, N, ...)``."""
    grouped = values.reshape(-1, group_size, *values.shape[1:])
    return grouped[:, 0], grouped[:, 1], grouped[:, 2:]


def relevance_exclusion(positive_keys: Tensor, negative_keys: Tensor, relevant: Tensor) -> Tensor:
    """``(B, B + B*N)`` bool: candidate ``c`` (InfoNCE column order: positives, then negatives
    group by group) is a document relevant to query ``i``.

    Args:
        positive_keys: ``(B,)`` document keys of the positives.
        negative_keys: ``(B, N)`` document keys of the negatives (-1 for padding).
        relevant: ``(B, R)`` keys relevant to each query, -1 padded.
    """
    candidates = torch.cat([positive_keys, negative_keys.reshape(-1)])
    hit = (relevant[:, :, None] == candidates[None, None, :]) & (relevant[:, :, None] != _PAD_KEY)
    return hit.any(dim=1)
