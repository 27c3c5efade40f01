"""Reasoning cold start (data_prep/build_reasoning.py): sampling, cleaning, selection, cache, bad input, CLI.

The selection tests script the teacher's replies (a generator that answers from a table keyed by
each prompt's sampling seed), so the expected analyses and gains can be worked out by hand and
checked against an independent nDCG (pytrec_eval) over the same BM25 rankings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytrec_eval
import torch

from verl_search_r3.data.build import BuildOptions, build_pairs
from verl_search_r3.data.issues import DataFormatError
from verl_search_r3.data.negatives import NegativeOptions
from verl_search_r3.data.reasoning import (
    GenerationCache,
    ReasoningOptions,
    build_reasoning,
    clean_analysis,
    ndcg,
    sample_seed,
)
from verl_search_r3.prompts import format_document
from verl_search_r3.retrieval.bm25 import BM25Retriever
from verl_search_r3.retrieval.encoder import Sampling, SearchR3Encoder, TransformersGenerator, reasoning_prompt_ids
from verl_search_r3.tiny import build_tiny_qwen2, load_qwen_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "data_prep", "build_reasoning.py")

DOCS = {
    "d1": "flutter of swept wings at transonic speed",
    "d2": "heat conduction in composite slabs",
    "d3": "buckling of thin cylindrical shells under axial load",
    "d4": "boundary layer transition on a flat plate",
    "d5": "shock wave interaction with a turbulent boundary layer",
    "d6": "hypersonic flow over blunt bodies",
}
QUERIES = {  # no query shares a word with its relevant document
    "q1": ("aeroelastic instability", "d1"),
    "q2": ("thermal problems in layered plates", "d2"),
    "q3": ("stability of thin structures", "d3"),
    "q4": ("when does laminar flow become unsteady", "d4"),
}
# (reply text, ends with a stop id) for sample 0 and 1 of each query; k = 2
SCRIPT_REPLIES = {
    "q1": [("Heat conduction in slabs.", True), ("Flutter of swept wings is an aeroelastic instability.", True)],
    "q2": [("Heat conduction in composite slabs. More words that run on and on", False), ("", True)],
    "q3": [("buckling of cylindrical shells without a sentence end", False), ("Plates", False)],
    "q4": [("Shock waves and blunt bodies.", True), ("Boundary layer transition on a flat plate.<|im_end|>junk", False)],
}


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reasoning_data")
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in DOCS.items()))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, (t, _) in QUERIES.items()))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, (_, d) in QUERIES.items()))
    out = root / "pairs"
    build_pairs(BuildOptions(format="beir", input=str(beir), output=str(out), val_fraction=0.0,
                             negatives=NegativeOptions(method="bm25", num_negatives=1, min_rank=1)))
    return str(out)


class ScriptedGenerator:
    """A teacher that answers from :data:`SCRIPT_REPLIES`: the prompt with sampling seed
    ``sample_seed(0, qid, j)`` gets reply ``j`` of ``qid``. Counts the prompts it answered and
    raises ``KeyboardInterrupt`` on call number ``interrupt_at`` (a killed run)."""

    def __init__(self, tokenizer, stop_id: int, script=SCRIPT_REPLIES, interrupt_at: int | None = None):
        self.by_seed = {sample_seed(0, q, j): reply for q, replies in script.items() for j, reply in enumerate(replies)}
        self.tokenizer, self.stop_id, self.interrupt_at = tokenizer, stop_id, interrupt_at
        self.calls, self.prompts = 0, 0

    def generate(self, prompts, max_new_tokens, stop_ids, batch_size, sampling=None):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        self.prompts += len(prompts)
        out = []
        for seed in sampling.seeds:
            text, stops = self.by_seed[seed]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
            out.append(ids + [self.stop_id] if stops else ids)
        return out


@pytest.fixture()
def teacher(tiny_qwen):
    model, tok = tiny_qwen
    encoder = SearchR3Encoder(model, tok, show_progress=False)
    encoder.generator = ScriptedGenerator(tok, tok.convert_tokens_to_ids("<|im_end|>"))
    return encoder


def options(pairs_dir, out, **kw):
    defaults = dict(num_samples=2, temperature=1.0, max_new_tokens=24, max_analysis_tokens=12, depth=10, batch_size=1,
                    progress=False, teacher="scripted")
    return ReasoningOptions(input=pairs_dir, output=str(out), **{**defaults, **kw})


def trec_ndcg(ranked: list[str], relevant: str, k: int) -> float:
    """Independent nDCG@k: pytrec_eval over a run that scores ranked documents in order."""
    run = {"q": {d: float(len(ranked) - i) for i, d in enumerate(ranked)}}
    return pytrec_eval.RelevanceEvaluator({"q": {relevant: 1}}, {f"ndcg_cut.{k}"}).evaluate(run)["q"][f"ndcg_cut_{k}"]


def test_generation_selection_and_parquet_columns(pairs_dir, teacher, tmp_path):
    out = tmp_path / "out"
    report = build_reasoning(options(pairs_dir, out), teacher=teacher)
    table = pq.read_table(out / "pairs.parquet")
    source = pq.read_table(os.path.join(pairs_dir, "pairs.parquet"))
    assert table.column_names == source.column_names + ["reasoning", "reasoning_gain"]
    assert table.drop_columns(["reasoning", "reasoning_gain"]).equals(source)  # the rest is untouched
    rows = {r["query_id"]: r for r in table.to_pylist()}

    # cleaning, worked out by hand (max_analysis_tokens = 12):
    # q2 sample 0 ran out of tokens -> cut back to its sentence end; sample 1 is empty
    # q3: no sentence end in either sample -> nothing usable
    # q4 sample 1: cut at the end-of-turn token, what follows is not analysis
    usable = {
        "q1": ["Heat conduction in slabs.", "Flutter of swept wings is an aeroelastic instability."],
        "q2": ["Heat conduction in composite slabs."],
        "q4": ["Shock waves and blunt bodies.", "Boundary layer transition on a flat plate."],
    }
    bm25 = BM25Retriever(list(DOCS), [format_document("", t) for t in DOCS.values()])
    for qid, (query, positive) in QUERIES.items():
        if qid not in usable:
            assert rows[qid]["reasoning"] is None and rows[qid]["reasoning_gain"] is None
            continue
        base = trec_ndcg(bm25.search([query], 10)[0][0], positive, 10)
        scores = [trec_ndcg(bm25.search([f"{query} {a}"], 10)[0][0], positive, 10) for a in usable[qid]]
        best = int(np.argmax(scores))
        assert rows[qid]["reasoning_gain"] == pytest.approx(scores[best] - base, abs=1e-6)
        assert rows[qid]["reasoning"] == (usable[qid][best] if scores[best] >= base else None)
    # the helpful analyses win: they name the relevant document's words
    assert rows["q1"]["reasoning"] == usable["q1"][1] and rows["q1"]["reasoning_gain"] > 0
    assert rows["q4"]["reasoning"] == usable["q4"][1] and rows["q4"]["reasoning_gain"] > 0

    s = json.load(open(out / "manifest.json"))["reasoning"]
    assert s == report.summary and s["teacher"] == "scripted" and s["scorer"] == "bm25"
    assert s["counts"]["queries"] == 4 and s["counts"]["generated"] == 8 and s["counts"]["from_cache"] == 0
    assert s["counts"]["kept"] == sum(r["reasoning"] is not None for r in rows.values())
    assert s["dropped"]["empty"] == 1 and s["dropped"]["unfinished"] == 2 and s["dropped"]["no_usable_analysis"] == 1
    assert s["stopped_by"] == {"end_of_turn": 4, "length_limit": 4}
    assert sorted(os.listdir(out)) == sorted(os.listdir(pairs_dir))


def test_cache_resumes_a_killed_run_and_serves_reruns(pairs_dir, tiny_qwen, tmp_path):
    model, tok = tiny_qwen
    eot = tok.convert_tokens_to_ids("<|im_end|>")

    def teacher(**kw):
        enc = SearchR3Encoder(model, tok, show_progress=False)
        enc.generator = ScriptedGenerator(tok, eot, **kw)
        return enc

    killed = teacher(interrupt_at=3)  # batch_size=1: two queries are generated and cached, then the kill
    with pytest.raises(KeyboardInterrupt):
        build_reasoning(options(pairs_dir, tmp_path / "out", cache_dir=str(tmp_path / "cache")), teacher=killed)
    assert not os.path.exists(tmp_path / "out")  # nothing half-written
    assert [n for n in os.listdir(tmp_path) if n != "cache"] == []
    (cache_file,) = os.listdir(tmp_path / "cache")
    assert len(open(tmp_path / "cache" / cache_file).readlines()) == 1 + 2  # header + two queries

    resumed = teacher()
    report = build_reasoning(options(pairs_dir, tmp_path / "out", cache_dir=str(tmp_path / "cache")), teacher=resumed)
    assert resumed.generator.prompts == 2 * 2 and report.summary["counts"]["from_cache"] == 2 * 2

    fresh = teacher()
    build_reasoning(options(pairs_dir, tmp_path / "fresh", cache_dir=str(tmp_path / "cache2")), teacher=fresh)
    assert fresh.generator.prompts == 4 * 2
    assert pq.read_table(tmp_path / "out" / "pairs.parquet").equals(pq.read_table(tmp_path / "fresh" / "pairs.parquet"))

    rerun = teacher()  # other selection settings: nothing is generated again
    build_reasoning(options(pairs_dir, tmp_path / "out", cache_dir=str(tmp_path / "cache"), min_gain=-1.0, overwrite=True), teacher=rerun)
    assert rerun.generator.calls == 0
    assert all(r is not None for r in pq.read_table(tmp_path / "out" / "pairs.parquet").column("reasoning_gain").to_pylist()
               if r is not None)
    other = teacher()  # other generation settings: another cache file
    build_reasoning(options(pairs_dir, tmp_path / "out3", cache_dir=str(tmp_path / "cache"), max_new_tokens=20), teacher=other)
    assert other.generator.prompts == 8 and len(os.listdir(tmp_path / "cache")) == 2


def test_cache_torn_last_line_is_dropped_and_corruption_is_an_error(tmp_path):
    from verl_search_r3.retrieval.encoder import Reply

    cache = GenerationCache(str(tmp_path), {"k": 1})
    cache.add([("q1", "query one", [Reply([1, 2], 3, "")]), ("q2", "query two", [Reply([4], None, "")])])
    with open(cache.path, "a") as f:
        f.write('{"query_id": "q3", "query": "query th')  # killed mid-write
    again = GenerationCache(str(tmp_path), {"k": 1})
    assert again.get("q1", "query one")[0].ids == [1, 2] and again.get("q1", "query one")[0].stop_id == 3
    assert again.get("q1", "another text") is None and again.get("q3", "query three") is None
    assert open(cache.path).read().endswith("\n")  # the torn line is gone, appends start clean

    lines = open(cache.path).readlines()
    lines[1] = '{"query_id": "q1", "replies": 5}\n'
    open(cache.path, "w").writelines(lines)
    with pytest.raises(DataFormatError, match=r"generations-.*\.jsonl:2: corrupted reasoning cache.*delete the file"):
        GenerationCache(str(tmp_path), {"k": 1})
    lines[1] = "not json\n"
    open(cache.path, "w").writelines(lines)
    with pytest.raises(DataFormatError, match=r"\.jsonl:2: corrupted reasoning cache \(not JSON"):
        GenerationCache(str(tmp_path), {"k": 1})


def test_clean_analysis_cases():
    tok = load_qwen_tokenizer(with_embed_token=False)  # a teacher that does not know the token spells it out
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    markers = ["<|embed_token|>", *tok.all_special_tokens]
    assert clean_analysis(enc(" Flutter is an instability. "), True, tok, 50, markers=markers) == ("Flutter is an instability.", None)
    assert clean_analysis(enc("One. Two <|embed_token|> three"), False, tok, 50, markers=markers) == ("One. Two", None)
    assert clean_analysis(enc("One. Two three"), False, tok, 50, markers=markers) == ("One.", None)  # ran out: last sentence end
    assert clean_analysis(enc("One two three. Four five."), True, tok, 4, markers=markers) == ("One two three.", None)  # capped
    assert clean_analysis(enc("Line one\nline two"), False, tok, 50) == ("Line one", None)
    assert clean_analysis(enc("no end at all"), False, tok, 50) == ("", "unfinished")
    assert clean_analysis(enc("   "), True, tok, 50) == ("", "empty")
    assert clean_analysis(enc("<|embed_token|>"), False, tok, 50, markers=markers) == ("", "empty")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert clean_analysis(enc("Kept") + [eot] + enc(" dropped"), False, tok, 50, special_ids={eot}) == ("Kept", None)


def test_ndcg_matches_trec_eval():
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(30)]
    for _ in range(20):
        ranked = list(rng.permutation(docs))
        grades = {d: float(rng.integers(1, 4)) for d in rng.choice(docs, size=4, replace=False)}
        run = {"q": {d: float(len(ranked) - i) for i, d in enumerate(ranked)}}
        expected = pytrec_eval.RelevanceEvaluator({"q": {d: int(g) for d, g in grades.items()}}, {"ndcg_cut.10"}).evaluate(run)
        assert ndcg(ranked, grades, 10) == pytest.approx(expected["q"]["ndcg_cut_10"], abs=1e-9)
    assert ndcg(["a", "b"], {}, 10) == 0.0


def test_sampling_depends_only_on_each_prompts_seed(tiny_qwen):
    model, tok = tiny_qwen
    gen = TransformersGenerator(model, tok.pad_token_id, show_progress=False)
    prompts = [reasoning_prompt_ids(tok, q) for q in ("flutter", "heat transfer in slabs", "buckling", "shock waves")]
    stops = [tok.convert_tokens_to_ids("<|im_end|>")]
    seeds = [11, 12, 13, 14]
    one = gen.generate(prompts, 8, stops, 1, Sampling(1.0, seeds))
    perm = [2, 0, 3, 1]
    mixed = gen.generate([prompts[i] for i in perm], 8, stops, 4, Sampling(1.0, [seeds[i] for i in perm]))
    assert mixed == [one[i] for i in perm]  # batch and order do not change a prompt's sample
    other = gen.generate(prompts, 8, stops, 4, Sampling(1.0, [21, 22, 23, 24]))
    assert other != one
    # at a vanishing temperature the Gumbel noise cannot beat the logit gaps: greedy decoding
    assert gen.generate(prompts, 8, stops, 2, Sampling(1e-6, seeds)) == gen.generate(prompts, 8, stops, 2)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(0.0, seeds)


def test_bad_input_names_the_problem_and_writes_nothing(pairs_dir, teacher, tiny_qwen, tmp_path):
    table = pq.read_table(os.path.join(pairs_dir, "pairs.parquet"))
    bad = tmp_path / "no_query"
    bad.mkdir()
    pq.write_table(table.drop_columns(["query"]), bad / "pairs.parquet")
    with pytest.raises(DataFormatError, match=r"no_query/pairs.parquet: missing column\(s\) \['query'\]"):
        build_reasoning(options(str(bad), tmp_path / "o1"), teacher=teacher)

    empty = tmp_path / "empty_query"
    empty.mkdir()
    queries = table.column("query").to_pylist()
    queries[2] = "  "
    pq.write_table(table.set_column(table.column_names.index("query"), "query", pa.array(queries)), empty / "pairs.parquet")
    with pytest.raises(DataFormatError, match=r"empty_query/pairs.parquet:row 2: empty or missing 'query' \(query_id='q3'\)"):
        build_reasoning(options(str(empty), tmp_path / "o2"), teacher=teacher)

    with pytest.raises(FileNotFoundError, match="build_pairs.py output folder"):
        build_reasoning(options(str(tmp_path / "missing"), tmp_path / "o3"), teacher=teacher)

    never = {q: [("and so it goes on and on without end", False)] * 2 for q in QUERIES}  # never stops, never ends a sentence
    teacher.generator = ScriptedGenerator(teacher.tokenizer, 0, script=never)
    with pytest.raises(DataFormatError, match=r"--teacher: none of the 8 generated analyses is usable.*--max-new-tokens"):
        build_reasoning(options(pairs_dir, tmp_path / "o4", cache_dir=str(tmp_path / "c4")), teacher=teacher)

    model, tok = tiny_qwen  # a base model: no chat template
    plain = tmp_path / "plain_teacher"
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    config = json.load(open(plain / "tokenizer_config.json"))
    config.pop("chat_template", None)
    json.dump(config, open(plain / "tokenizer_config.json", "w"))
    for name in os.listdir(plain):
        if name.endswith(".jinja"):
            os.remove(plain / name)
    with pytest.raises(ValueError, match=r"--teacher .*plain_teacher: the tokenizer has no chat template"):
        build_reasoning(options(pairs_dir, tmp_path / "o5", teacher=str(plain), device="cpu"))

    with pytest.raises(ValueError, match="lies inside the input"):
        build_reasoning(options(pairs_dir, os.path.join(pairs_dir, "inside")), teacher=teacher)
    assert not any(os.path.exists(tmp_path / f"o{i}") for i in range(1, 6))


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def cli_main():
    """The script's ``main`` imported in-process (one interpreter start is enough for the contract)."""
    spec = importlib.util.spec_from_file_location("build_reasoning_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_contract(pairs_dir, tmp_path, cli_main, capsys):
    with pytest.raises(SystemExit) as exit_help:
        cli_main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_help.value.code == 0
    for flag in ("--input", "--output", "--overwrite", "--splits", "--max-queries", "--cache-dir", "--teacher", "--gguf-file",
                 "--num-samples", "--temperature", "--max-new-tokens", "--max-analysis-tokens", "--seed", "--batch-size",
                 "--backend", "--device", "--dtype", "--scorer", "--min-gain", "--depth", "--doc-max-length", "--no-progress"):
        assert flag in help_text
    assert "reasoning_gain" in help_text and "no_usable_analysis" in help_text

    # a tiny teacher whose final norm is zero: every logit ties, greedy decoding writes token 0 ("!") forever
    model, tok = build_tiny_qwen2(seed=1)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    teacher = tmp_path / "bang_teacher"
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    out = tmp_path / "out"
    args = ["--input", pairs_dir, "--output", str(out), "--teacher", str(teacher), "--temperature", "0", "--num-samples", "1",
            "--max-new-tokens", "6", "--max-analysis-tokens", "4", "--min-gain", "-1", "--device", "cpu", "--no-progress"]
    res = cli(*args)  # as users run it
    assert res.returncode == 0, res.stderr
    assert "generated" in res.stdout and "kept" in res.stdout and "Traceback" not in res.stderr
    assert pq.read_table(out / "pairs.parquet").column("reasoning").to_pylist() == ["!!!!"] * 4

    assert cli_main(args) == 1  # the output folder is not empty now
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as bad_option:
        cli_main(args[:4] + ["--temperature", "0", "--num-samples", "2"])
    assert bad_option.value.code == 2 and "--num-samples 1" in capsys.readouterr().err
    assert cli_main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"), "--teacher", str(teacher)]) == 1
    assert "build_pairs.py output folder" in capsys.readouterr().err
