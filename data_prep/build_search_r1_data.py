#!/usr/bin/env python
"""Build Search-R1 training and test parquets from QA files you already have (no downloads).

    python data_prep/build_search_r1_data.py --output data/search_r1 \\
        --source train:nq=raw/nq-train.jsonl --source train:hotpotqa=raw/hotpotqa-train.jsonl \\
        --source test:nq=raw/nq-test.jsonl --source test:bamboogle=raw/bamboogle-test.parquet

The work is done by :func:`verl_search_r3.search_r1.data.build_qa_data`; this script maps flags
to :class:`~verl_search_r3.search_r1.data.QADataOptions` and prints the summary. Exit status:
0 done, 1 bad input data or paths (message names file, line and field), 2 bad options, 130
interrupted (Ctrl-C), 143 terminated (SIGTERM); an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import logging
import sys

from verl_search_r3.atomic import exit_status, sigterm_as_interrupt
from verl_search_r3.data.issues import SKIP_REASONS
from verl_search_r3.data.outputs import check_distinct
from verl_search_r3.search_r1.data import QADataOptions, QADataReport, build_qa_data, parse_source

EPILOG = """\
outputs (in --output, written atomically):
  <split>.parquet   verl RLHFDataset rows: data_source (search_r1/<name>), prompt, ability,
                    reward_model.ground_truth.target (golden answers), extra_info (index unique over
                    the whole output, split, question, tools_kwargs), agent_name
  manifest.json     counts per split and dataset, options, skipped rows by reason, SHA-256 of files

skipped rows (a warning each, counted in the summary; errors with --strict):
""" + "\n".join(f"  {k:17s}  {v}" for k, v in SKIP_REASONS.items())


def parser() -> argparse.ArgumentParser:
    """The command line (every option documented in ``--help``)."""
    d = QADataOptions.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="build_search_r1_data.py",
        description="Convert QA exports (question + golden answers) into verl parquets for Search-R1.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", action="append", required=True, metavar="SPLIT:NAME=PATH",
                   help="an input: output split, dataset name (data_source = search_r1/NAME) and a .jsonl, "
                   ".parquet or datasets folder; repeat for several (rows keep this order)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder; created, and must be empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder (only after the new one is complete; an output that is, "
                   "contains or lies inside an input is always refused)")
    p.add_argument("--question-field", default=d["question_field"].default, help="question field (default: %(default)s)")
    p.add_argument("--answers-field", default=d["answers_field"].default,
                   help="golden answers field: a list of strings or one string (default: %(default)s)")
    p.add_argument("--id-field", default=None, help="row id field; repeated ids are skipped (default: none)")
    p.add_argument("--hf-split", default=None, help="split of a saved DatasetDict (datasets folders)")
    p.add_argument("--no-question-mark", action="store_true", help="do not append '?' to questions without one")
    p.add_argument("--instruction-file", default=None, metavar="FILE",
                   help="prompt template file; its {question} is replaced by the question, other braces are kept "
                   "as written (default: the built-in instruction)")
    p.add_argument("--ability", default=d["ability"].default, help="ability column (default: %(default)s)")
    p.add_argument("--agent-name", default=d["agent_name"].default, help="agent loop of every row (default: %(default)s)")
    p.add_argument("--tool-name", default=d["tool_name"].default, help="search tool name in tools_kwargs (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="make every skipped row an error (exit 1)")
    p.add_argument("--batch-rows", type=int, default=d["batch_rows"].default, help="rows per parquet batch (default: %(default)s)")
    p.add_argument("--max-warnings", type=int, default=d["max_warnings"].default,
                   help="skip warnings shown per reason; all are counted (default: %(default)s)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p


def options(args: argparse.Namespace) -> QADataOptions:
    """Map parsed flags to :class:`QADataOptions` (``ValueError`` / ``OSError`` on bad values)."""
    extra = {}
    if args.instruction_file is not None:
        check_distinct(args.output, [args.instruction_file])
        with open(args.instruction_file, encoding="utf-8") as f:
            extra["instruction"] = f.read()
    return QADataOptions(
        sources=[parse_source(s) for s in args.source],
        output=args.output,
        question_field=args.question_field,
        answers_field=args.answers_field,
        id_field=args.id_field,
        hf_split=args.hf_split,
        add_question_mark=not args.no_question_mark,
        ability=args.ability,
        agent_name=args.agent_name,
        tool_name=args.tool_name,
        strict=args.strict,
        overwrite=args.overwrite,
        batch_rows=args.batch_rows,
        max_warnings=args.max_warnings,
        progress=args.progress,
        **extra,
    )


def summary(report: QADataReport) -> str:
    """Rows per split and dataset, skipped rows by reason, time."""
    m = report.manifest
    lines = [f"wrote {report.output}"]
    for split, by_name in m["counts"].items():
        lines.append(f"  {split + '.parquet':28s} {sum(by_name.values()):>10,}")
        lines += [f"    {name:26s} {n:>10,}" for name, n in by_name.items()]
    lines.append(f"  {'skipped rows':28s} {sum(m['skipped'].values()):>10,}")
    lines += [f"    {k:26s} {v:>10,}" for k, v in m["skipped"].items()]
    lines.append(f"  {'time':28s} {report.seconds:>9.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        opts = options(args)
    except (ValueError, OSError) as e:
        p.error(str(e))
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        with sigterm_as_interrupt():
            report = build_qa_data(opts)
    except (OSError, ValueError) as e:  # DataFormatError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the temporary output is already removed
        print("interrupted; nothing was written", file=sys.stderr)
        return exit_status(e)
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
