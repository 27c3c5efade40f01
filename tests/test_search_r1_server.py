"""The optional HTTP retrieval server: Search-R1's POST /retrieve schema, limits, timeouts, CLI."""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from verl_search_r3.search_r1.build_index import BuildIndexOptions, build_index
from verl_search_r3.search_r1.config import RetrieverConfig
from verl_search_r3.search_r1.observation import Passage
from verl_search_r3.search_r1.retrieval import Retrieval
from verl_search_r3.search_r1.server import ServerConfig, create_app

QUERY = "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft"


@pytest.fixture(scope="module")
def bm25_index(cranfield_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sr1_server") / "bm25")
    build_index(BuildIndexOptions(input=cranfield_dir, output=out, format="beir", progress=False))
    return out


def test_retrieve_answers_in_search_r1_schema(bm25_index):
    retrieval = Retrieval(RetrieverConfig(index_dir=bm25_index, placement="local"))
    client = TestClient(create_app(retrieval.search, ServerConfig(), retrieval.describe))
    res = client.post("/retrieve", json={"queries": [QUERY, "heat transfer"], "topk": 2, "return_scores": True})
    assert res.status_code == 200
    result = res.json()["result"]
    assert len(result) == 2 and all(len(row) == 2 for row in result)
    hit = result[0][0]
    assert set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"}
    assert hit["document"]["contents"].startswith("theory of aircraft structural models subjected to aerodynamic heating and external loads .\n")
    assert result[0][0]["score"] >= result[0][1]["score"]
    # no topk: the server default (3); no scores: bare documents
    bare = client.post("/retrieve", json={"queries": [QUERY]}).json()["result"]
    assert len(bare[0]) == 3 and set(bare[0][0]) == {"id", "contents"}
    assert client.get("/health").json()["num_docs"] == 1398


def _fake_search(queries, k):
    return [[Passage(str(i), "T", "x", 1.0) for i in range(k)] for _ in queries]


def test_oversized_and_invalid_requests_are_refused():
    client = TestClient(create_app(_fake_search, ServerConfig(max_request_bytes=2000, max_queries=4, max_topk=5, max_query_chars=50)))
    big = {"queries": ["x" * 40] * 100}
    res = client.post("/retrieve", json=big)  # declared Content-Length over the limit
    assert res.status_code == 413 and "over 2000 bytes" in res.json()["detail"]

    def chunks():  # no Content-Length: cut off while reading
        body = json.dumps(big).encode()
        for i in range(0, len(body), 500):
            yield body[i : i + 500]

    res = client.post("/retrieve", content=chunks(), headers={"content-type": "application/json"})
    assert res.status_code == 413
    assert client.post("/retrieve", json={"queries": ["q"] * 5}).status_code == 413
    assert client.post("/retrieve", json={"queries": ["q"], "topk": 6}).status_code == 422
    assert client.post("/retrieve", json={"queries": ["q" * 51]}).status_code == 422
    assert client.post("/retrieve", json={"queries": []}).status_code == 422
    assert client.post("/retrieve", json={"query": "q"}).status_code == 422
    assert client.post("/retrieve", json={"queries": ["q"], "topk": 5}).status_code == 200


def test_slow_retrieval_times_out():
    def slow(queries, k):
        time.sleep(2)
        return _fake_search(queries, k)

    client = TestClient(create_app(slow, ServerConfig(timeout_seconds=0.2)))
    res = client.post("/retrieve", json={"queries": ["q"]})
    assert res.status_code == 504 and "longer than 0.2s" in res.json()["detail"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_on_localhost(bm25_index):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "verl_search_r3.search_r1.server", "--index", bm25_index, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                res = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"queries": [QUERY], "topk": 1}, timeout=10)
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
                time.sleep(0.5)
        assert res.status_code == 200 and res.json()["result"][0][0]["id"] == "51"
        assert ServerConfig().host == "127.0.0.1"  # the CLI binds the loopback interface unless told otherwise
    finally:
        proc.terminate()
        proc.wait(timeout=30)
