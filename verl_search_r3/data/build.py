"""One call from an input dataset to the output folder: convert → split → negatives → write.

:func:`build_pairs` is what ``data_prep/build_pairs.py`` runs; the converters, the negative
miner and the writers are the modules beside this one.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Any, Literal

import numpy as np

from ..atomic import write_json
from .beir import BeirPaths, convert_beir, iter_beir_corpus
from .collection import Collection
from .generic import FieldNames, convert_generic, dataset_name, iter_generic_documents
from .issues import IssueLog
from .msmarco import convert_msmarco
from .negatives import NegativeOptions, mine_negatives
from .outputs import AtomicFolder, write_pairs, write_rl
from .readers import sha256_path
from .titles import convert_titles

__all__ = ["FORMATS", "BuildOptions", "BuildReport", "build_pairs", "split_queries", "GROUND_TRUTH_DOC"]

Format = Literal["beir", "msmarco", "jsonl", "parquet", "hf-disk"]
FORMATS: tuple[str, ...] = ("beir", "msmarco", "jsonl", "parquet", "hf-disk")
#: ``--split`` when none is given, per format (generic files have no splits).
DEFAULT_SPLITS = {"beir": "test", "msmarco": "train"}
OUTPUT_FILES = ("corpus.parquet", "pairs.parquet", "rl_train.parquet", "rl_val.parquet")
GROUND_TRUTH_DOC = (
    "reward_model.ground_truth = {doc_ids: list<string>, grades: list<int32>}: the query's relevant "
    "documents (grade > 0), best grade first; doc_ids are corpus.parquet doc_id values"
)
MANIFEST_VERSION = 1


@dataclass
class BuildOptions:
    """Everything :func:`build_pairs` needs (the CLI flags one to one).

    Attributes:
        format: input format: ``beir``, ``msmarco``, ``jsonl``, ``parquet`` or ``hf-disk``.
        input: BEIR / MS MARCO folder, a JSON-lines or parquet file, or a ``save_to_disk`` folder.
        output: the output folder (created; must be empty unless ``overwrite``).
        split: qrels / queries split (BEIR default ``test``, MS MARCO ``train``) or the
            ``DatasetDict`` split of an ``hf-disk`` folder.
        name: dataset name for ``data_source = search_r3/<name>``; default: the input's base name.
        title_as_query: build title → text pairs from the corpus instead of reading queries.
        fields: field names of generic inputs.
        triples: MS MARCO ``qid, pos pid, neg pid`` TSV whose negatives are used first.
        negatives: how hard negatives are mined and chosen.
        val_fraction: share of queries in ``rl_val`` (and ``split == "val"`` pairs).
        seed: seed of the query split and of random negative sampling.
        ability: the ``ability`` column of the RL parquets.
        strict: make every skipped row an error.
        overwrite: replace a non-empty output folder (only once the new one is complete).
        batch_rows: rows per parquet batch when streaming (bounds memory).
        max_warnings: skip warnings shown per reason (all are counted).
        progress: show progress bars.
    """

    format: Format
    input: str
    output: str
    split: str | None = None
    name: str | None = None
    title_as_query: bool = False
    fields: FieldNames = field(default_factory=FieldNames)
    triples: str | None = None
    negatives: NegativeOptions = field(default_factory=NegativeOptions)
    val_fraction: float = 0.1
    seed: int = 0
    ability: str = "retrieval"
    strict: bool = False
    overwrite: bool = False
    batch_rows: int = 50_000
    max_warnings: int = 10
    progress: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; use one of {', '.join(FORMATS)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        if self.split is not None and self.format in ("jsonl", "parquet"):
            raise ValueError(f"--split does not apply to a {self.format} file")
        if self.title_as_query and self.format == "msmarco":
            raise ValueError("--title-as-query needs titles; MS MARCO passages have none")
        if self.triples and self.format != "msmarco":
            raise ValueError("--triples applies to the msmarco format only")
        if self.split is None:
            self.split = DEFAULT_SPLITS.get(self.format)


@dataclass
class BuildReport:
    """What a run wrote: the manifest's content plus time and peak memory of this process."""

    output: str
    manifest: dict[str, Any]
    seconds: float
    peak_rss_mb: float


def split_queries(qids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """``{qid: "train" | "val"}``: ``round(val_fraction * n)`` queries to val, by a seeded
    permutation of the sorted ids (so the split does not depend on input order)."""
    order = sorted(qids)
    n_val = round(val_fraction * len(order))
    val = {order[i] for i in np.random.default_rng(seed).permutation(len(order))[:n_val]}
    return {q: "val" if q in val else "train" for q in qids}


def _convert(opts: BuildOptions, corpus_path: str, issues: IssueLog) -> Collection:
    """Run the converter that ``opts.format`` (and ``title_as_query``) selects."""
    cap = opts.negatives.num_negatives
    common = {"batch_rows": opts.batch_rows}
    if opts.title_as_query:
        if opts.format == "beir":
            paths = BeirPaths.of(opts.input, need_qrels=False)
            docs = iter_beir_corpus(paths.corpus, issues, opts.progress)
            name, inputs, id_field, text_field = dataset_name(opts.input), [paths.corpus], "_id", "text"
        else:
            docs = iter_generic_documents(opts.input, opts.format, opts.fields, issues, opts.split, opts.batch_rows, opts.progress)
            name, inputs, id_field, text_field = dataset_name(opts.input), [opts.input], opts.fields.doc_id, opts.fields.text
        return convert_titles(docs, name, corpus_path, inputs, issues, id_field, text_field, **common)
    if opts.format == "beir":
        return convert_beir(opts.input, opts.split, corpus_path, issues, progress=opts.progress, **common)
    if opts.format == "msmarco":
        return convert_msmarco(opts.input, opts.split, corpus_path, issues, opts.triples, cap, progress=opts.progress, **common)
    return convert_generic(opts.input, opts.format, opts.fields, corpus_path, issues, opts.split, cap, progress=opts.progress, **common)


def _input_key(path: str, root: str) -> str:
    """How an input file is named in the manifest: relative to the input folder, or its base name."""
    if os.path.isdir(root) and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
        return os.path.relpath(path, root)
    return os.path.basename(os.path.normpath(path))


def build_pairs(opts: BuildOptions) -> BuildReport:
    """Convert ``opts.input`` and write the output folder atomically; returns the report.

    Raises :class:`~verl_search_r3.data.issues.DataFormatError` for bad input (the first skipped
    row when ``strict``), ``OSError`` (``FileNotFoundError``, ``FileExistsError``, ...) /
    ``ValueError`` for bad paths and options (an output that is, contains or lies inside an
    input); nothing is left in the output folder then.
    """
    start = time.perf_counter()
    model = opts.negatives.dense_model
    if model is not None and not os.path.isdir(model):
        raise FileNotFoundError(f"dense negatives: model folder {model!r} does not exist")
    issues = IssueLog(strict=opts.strict, max_warnings=opts.max_warnings)
    inputs = [opts.input, opts.triples, model]
    with AtomicFolder(opts.output, overwrite=opts.overwrite, inputs=inputs) as out:
        collection = _convert(opts, out.file("corpus.parquet"), issues)
        name = opts.name or collection.name
        data_source = f"search_r3/{name}"
        split_of = split_queries(list(collection.queries), opts.val_fraction, opts.seed)
        mined = mine_negatives(collection, opts.negatives, opts.seed, opts.batch_rows, opts.progress)
        pairs = write_pairs(out.file("pairs.parquet"), collection, split_of, mined.by_pair, data_source, opts.batch_rows, opts.progress)
        rl = write_rl({"train": out.file("rl_train.parquet"), "val": out.file("rl_val.parquet")}, collection, split_of, data_source, opts.ability)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "created_by": f"verl-search-r3 {version('verl-search-r3')}",
            "name": name,
            "data_source": data_source,
            "arguments": asdict(opts),
            "counts": {
                "documents": collection.num_docs,
                "queries": len(collection.queries),
                "relevant_judgements": collection.num_judgements,
                "pairs": pairs,
                "rl_train": rl["train"],
                "rl_val": rl["val"],
                **collection.stats,
                **mined.stats,
            },
            "skipped": issues.as_dict(),
            "ground_truth": GROUND_TRUTH_DOC,
            "inputs": {_input_key(p, opts.input): sha256_path(p) for p in collection.inputs},
            "outputs": {f: sha256_path(out.file(f)) for f in OUTPUT_FILES},
        }
        write_json(out.file("manifest.json"), manifest)
        out.commit()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return BuildReport(output=opts.output, manifest=manifest, seconds=time.perf_counter() - start, peak_rss_mb=peak_mb)
