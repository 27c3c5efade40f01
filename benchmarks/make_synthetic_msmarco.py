#!/usr/bin/env python
"""Write a synthetic MS MARCO-style folder (``collection.tsv``, ``queries.train.tsv``,
``qrels.train.tsv``) for timing ``data_prep/build_pairs.py`` on a large input.

Passages are words drawn from a Zipf-distributed vocabulary of pseudo-words, about as long as MS
MARCO's (~56 words); each query is a few words of its relevant passage (some queries get a second
relevant passage), so BM25 has something to find. Prints a JSON summary.

    python benchmarks/make_synthetic_msmarco.py --output /tmp/synthetic-msmarco --passages 1000000
    /usr/bin/time -v python data_prep/build_pairs.py --format msmarco --input /tmp/synthetic-msmarco \
        --output /tmp/synthetic-msmarco-out --no-progress
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]


def vocabulary(size: int) -> np.ndarray:
    """``size`` distinct pseudo-words (two to four syllables), as an object array."""
    words = []
    base = len(SYLLABLES)
    for i in range(size):
        n, parts = i + base, []
        while n:
            n, r = divmod(n, base)
            parts.append(SYLLABLES[r])
        words.append("".join(parts + [SYLLABLES[i % base]]))
    return np.array(words, dtype=object)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to create (must not exist)")
    p.add_argument("--passages", type=int, default=1_000_000, help="passages in collection.tsv (default: %(default)s)")
    p.add_argument("--queries", type=int, default=57_000, help="judged queries; MS MARCO train has ~57 per 1,000 passages (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=100_000, help="vocabulary size (default: %(default)s)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of word frequencies (default: %(default)s)")
    p.add_argument("--mean-words", type=float, default=56.0, help="mean passage length in words (default: %(default)s)")
    p.add_argument("--query-words", type=int, nargs=2, default=(3, 8), help="query length range in words (default: 3 8)")
    p.add_argument("--second-positive", type=float, default=0.06, help="share of queries with two relevant passages (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=50_000, help="passages generated per chunk (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = p.parse_args()

    start = time.perf_counter()
    os.makedirs(args.output)
    rng = np.random.default_rng(args.seed)
    words = vocabulary(args.vocab)
    probs = 1.0 / np.arange(1, args.vocab + 1) ** args.zipf
    probs /= probs.sum()

    judged = np.sort(rng.choice(args.passages, size=args.queries, replace=False))
    keep: dict[int, np.ndarray] = {}  # word ids of the passages that get a query
    next_judged = 0
    with open(os.path.join(args.output, "collection.tsv"), "w", encoding="utf-8") as f:
        for lo in range(0, args.passages, args.chunk):
            n = min(args.chunk, args.passages - lo)
            lengths = np.clip(rng.poisson(args.mean_words, n), 5, None)
            ids = rng.choice(args.vocab, size=int(lengths.sum()), p=probs)
            ends = np.cumsum(lengths)
            starts = ends - lengths
            f.writelines(f"{lo + i}\t{' '.join(words[ids[s:e]])}\n" for i, (s, e) in enumerate(zip(starts, ends)))
            while next_judged < len(judged) and judged[next_judged] < lo + n:
                i = judged[next_judged] - lo
                keep[int(judged[next_judged])] = ids[starts[i] : ends[i]]
                next_judged += 1

    qlo, qhi = args.query_words
    with open(os.path.join(args.output, "queries.train.tsv"), "w", encoding="utf-8") as fq, open(
        os.path.join(args.output, "qrels.train.tsv"), "w", encoding="utf-8"
    ) as fr:
        for qid, pid in enumerate(rng.permutation(judged)):
            passage = keep[int(pid)]
            k = min(len(passage), int(rng.integers(qlo, qhi + 1)))
            fq.write(f"{qid}\t{' '.join(words[rng.choice(passage, size=k, replace=False)])}\n")
            fr.write(f"{qid}\t0\t{pid}\t1\n")
            if rng.random() < args.second_positive:
                fr.write(f"{qid}\t0\t{int(rng.integers(args.passages))}\t1\n")

    sizes = {f: os.path.getsize(os.path.join(args.output, f)) for f in sorted(os.listdir(args.output))}
    print(json.dumps({"passages": args.passages, "queries": args.queries, "bytes": sizes, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
