"""QA exports (question + golden answers) to verl parquet for Search-R1 training and evaluation.

Inputs are local files you already have: NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, Musique, Bamboogle
(e.g. the FlashRAG exports: ``question``, ``golden_answers``) as JSON lines, parquet or a
``datasets`` folder. Each source is ``SPLIT:NAME=PATH``; sources of one split are concatenated
into ``<output>/<split>.parquet`` and ``extra_info.index`` is unique over the whole output (the
GRPO group id must not collide across datasets, unlike the original's per-dataset index).

Row layout (verl ``RLHFDataset``, :data:`QA_SCHEMA`): ``data_source`` (``search_r1/<name>``),
``prompt`` (one user turn: :data:`DEFAULT_INSTRUCTION` with the question), ``ability``,
``reward_model: {style: rule, ground_truth: {target: [answers]}}``, ``extra_info: {index,
split, question, need_tools_kwargs, tools_kwargs: {<tool>: {create_kwargs: {data_source}}}}``,
``agent_name`` (``search_r1_agent``).

Bad rows follow the project's rules (:mod:`verl_search_r3.data.issues`): a malformed JSON line,
a missing question or answers field, a question that is not a string, an empty question,
answers that are not strings (or none left after dropping empty ones), bytes that are not
UTF-8, a repeated id (with ``id_field``) — skipped with a warning naming file, line (or row) and
field, and counted; ``strict`` makes each an error. Outputs are written atomically.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import write_json
from ..data.issues import DataFormatError, IssueLog
from ..data.outputs import AtomicFolder
from ..data.readers import TableKind, is_utf8, iter_records, sha256_path, text_field
from .config import AGENT_NAME
from .parser import SEARCH

__all__ = ["QASource", "QADataOptions", "QADataReport", "build_qa_data", "qa_schema", "DEFAULT_INSTRUCTION", "parse_source"]

#: The task instruction (our wording of Search-R1's structure-only template); ``{question}`` is filled in.
DEFAULT_INSTRUCTION = (
    "Answer the question below. Think it through between <think> and </think> every time you receive new "
    "information. When you find you are missing some knowledge, you can query a search engine by writing "
    "<search> your query </search>, and the best results will come back between <information> and "
    "</information>. You may search as many times as you need. Once no more information is needed, give only "
    "the final answer between <answer> and </answer>, without explanation, for example <answer> Paris </answer>. "
    "Question: {question}\n"
)
MANIFEST_VERSION = 1
#: The placeholder of the instruction that the question replaces; other braces (a JSON example in
#: the prompt) are kept as written.
QUESTION_FIELD = "{question}"


def qa_schema(tool_name: str) -> pa.Schema:
    """The parquet schema of the output rows (the tool name is a field of ``tools_kwargs``)."""
    tools = pa.struct([(tool_name, pa.struct([("create_kwargs", pa.struct([("data_source", pa.string())]))]))])
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))])),
            (
                "extra_info",
                pa.struct(
                    [("index", pa.int64()), ("split", pa.string()), ("question", pa.string()), ("need_tools_kwargs", pa.bool_()),
                     ("tools_kwargs", tools)]
                ),
            ),
            ("agent_name", pa.string()),
        ]
    )


@dataclass(frozen=True)
class QASource:
    """One input: its output split, dataset name and path (``kind`` from the path when None)."""

    split: str
    name: str
    path: str
    kind: TableKind | None = None

    def table_kind(self) -> TableKind:
        if self.kind is not None:
            return self.kind
        if os.path.isdir(self.path):
            return "hf-disk"
        if self.path.endswith(".parquet"):
            return "parquet"
        if self.path.endswith((".jsonl", ".json")):
            return "jsonl"
        raise ValueError(f"cannot tell the format of {self.path!r} (use .jsonl, .parquet or a datasets folder)")


def parse_source(spec: str) -> QASource:
    """``SPLIT:NAME=PATH`` → :class:`QASource` (``ValueError`` naming the spec otherwise)."""
    head, sep, path = spec.partition("=")
    split, colon, name = head.partition(":")
    if not sep or not colon or not split or not name or not path:
        raise ValueError(f"source {spec!r} is not SPLIT:NAME=PATH (e.g. train:nq=nq-train.jsonl)")
    for part, what in ((split, "split"), (name, "name")):
        if not part.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"source {spec!r}: {what} {part!r} must be letters, digits, '-' or '_'")
    return QASource(split, name, path)


@dataclass
class QADataOptions:
    """Everything :func:`build_qa_data` needs (the CLI flags one to one).

    Attributes:
        sources: the inputs, in output order.
        output: the output folder (created; must be empty unless ``overwrite``).
        question_field, answers_field: field names (answers: a list of strings or one string).
        id_field: optional row id field; a repeated id within a source is skipped.
        hf_split: the split of a saved ``DatasetDict`` (``datasets`` folders).
        add_question_mark: append ``?`` to questions that do not end with one (as the original).
        instruction: the prompt template; every ``{question}`` is replaced by the question, other
            braces are kept.
        ability: the ``ability`` column.
        agent_name: the ``agent_name`` column (the agent loop of each row).
        tool_name: the search tool's name in ``tools_kwargs``.
        strict, overwrite, batch_rows, max_warnings, progress: as for ``build_pairs.py``.
    """

    sources: list[QASource]
    output: str
    question_field: str = "question"
    answers_field: str = "golden_answers"
    id_field: str | None = None
    hf_split: str | None = None
    add_question_mark: bool = True
    instruction: str = DEFAULT_INSTRUCTION
    ability: str = "fact-reasoning"
    agent_name: str = AGENT_NAME
    tool_name: str = SEARCH
    strict: bool = False
    overwrite: bool = False
    batch_rows: int = 10_000
    max_warnings: int = 10
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("at least one source is needed")
        if QUESTION_FIELD not in self.instruction:
            raise ValueError(f"the instruction must contain {QUESTION_FIELD}")
        if self.batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        seen = Counter((s.split, s.name) for s in self.sources)
        twice = [f"{s}:{n}" for (s, n), c in seen.items() if c > 1]
        if twice:
            raise ValueError(f"source(s) given twice: {', '.join(twice)}")


@dataclass
class QADataReport:
    """What a run wrote (the manifest) and how long it took."""

    output: str
    manifest: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _answers(rec: dict[str, Any], opts: QADataOptions, place: str, issues: IssueLog) -> list[str] | None:
    f = opts.answers_field
    if f not in rec or rec[f] is None:
        issues.skip("missing_field", f"{place}: missing field {f!r}")
        return None
    value = rec[f]
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(a, str) for a in items):
        got = type(value).__name__ if items is None else "a list with non-strings"
        issues.skip("invalid_field", f"{place}: field {f!r} should be a string or a list of strings, got {got}")
        return None
    if not all(is_utf8(a) for a in items):
        issues.skip("bad_encoding", f"{place}: field {f!r} is not valid UTF-8")
        return None
    answers = [a.strip() for a in items if a.strip()]
    if not answers:
        issues.skip("empty_text", f"{place}: field {f!r} holds no non-empty answer")
        return None
    return answers


def _rows(source: QASource, opts: QADataOptions, issues: IssueLog) -> Iterator[tuple[str, list[str]]]:
    """``(question, answers)`` of every well-formed row of one source."""
    seen: set[str] = set()
    for place, rec in iter_records(source.path, source.table_kind(), issues, opts.hf_split, opts.batch_rows, opts.progress):
        if opts.id_field is not None:
            row_id = text_field(rec, opts.id_field, place, issues, is_id=True)
            if row_id is None:
                continue
            if row_id in seen:
                issues.skip("duplicate_id", f"{place}: duplicate {opts.id_field} {row_id!r} (the first one is kept)")
                continue
            seen.add(row_id)
        question = text_field(rec, opts.question_field, place, issues)
        if question is None:
            continue
        question = question.strip()
        if not question:
            issues.skip("empty_text", f"{place}: empty {opts.question_field!r}")
            continue
        answers = _answers(rec, opts, place, issues)
        if answers is None:
            continue
        if opts.add_question_mark and not question.endswith("?"):
            question += "?"
        yield question, answers


def _row(question: str, answers: list[str], source: QASource, index: int, opts: QADataOptions) -> dict[str, Any]:
    data_source = f"search_r1/{source.name}"
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": opts.instruction.replace(QUESTION_FIELD, question)}],
        "ability": opts.ability,
        "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
        "extra_info": {
            "index": index,
            "split": source.split,
            "question": question,
            "need_tools_kwargs": True,
            "tools_kwargs": {opts.tool_name: {"create_kwargs": {"data_source": data_source}}},
        },
        "agent_name": opts.agent_name,
    }


def build_qa_data(opts: QADataOptions) -> QADataReport:
    """Convert every source and write ``<split>.parquet`` files plus ``manifest.json`` atomically.

    Raises :class:`DataFormatError` for bad input (the first skipped row when ``strict``, or a
    split without rows), ``OSError`` / ``ValueError`` for bad paths (an output that is, contains
    or lies inside a source).
    """
    start = time.perf_counter()
    issues = IssueLog(strict=opts.strict, max_warnings=opts.max_warnings)
    schema = qa_schema(opts.tool_name)
    counts: dict[str, dict[str, int]] = {}
    index = 0
    with AtomicFolder(opts.output, overwrite=opts.overwrite, inputs=[s.path for s in opts.sources]) as out:
        writers: dict[str, pq.ParquetWriter] = {}
        try:
            for source in opts.sources:
                writer = writers.get(source.split) or writers.setdefault(source.split, pq.ParquetWriter(out.file(f"{source.split}.parquet"), schema))
                batch: list[dict[str, Any]] = []
                n = 0
                for question, answers in _rows(source, opts, issues):
                    batch.append(_row(question, answers, source, index, opts))
                    index += 1
                    n += 1
                    if len(batch) == opts.batch_rows:
                        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                        batch = []
                if batch:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                counts.setdefault(source.split, {})[source.name] = n
        finally:
            for w in writers.values():
                w.close()
        empty = [s for s, by_name in counts.items() if not sum(by_name.values())]
        if empty:
            raise DataFormatError(f"no usable row for split(s) {empty}; check the field names (--question-field, --answers-field)")
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "created_by": f"verl-search-r3 {version('verl-search-r3')}",
            "arguments": {**asdict(opts), "sources": [asdict(s) for s in opts.sources]},
            "counts": counts,
            "rows": index,
            "skipped": issues.as_dict(),
            "inputs": {f"{s.split}:{s.name}": sha256_path(s.path) for s in opts.sources},
            "outputs": {f"{split}.parquet": sha256_path(out.file(f"{split}.parquet")) for split in counts},
        }
        write_json(out.file("manifest.json"), manifest)
        out.commit()
    return QADataReport(output=opts.output, manifest=manifest, seconds=time.perf_counter() - start)
