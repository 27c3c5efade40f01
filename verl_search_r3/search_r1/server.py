"""Optional HTTP retrieval server speaking Search-R1's ``POST /retrieve`` schema over our index.

    python -m verl_search_r3.search_r1.server --index indexes/wiki18-e5 --port 8000

Existing Search-R1 setups (a trainer posting to ``http://127.0.0.1:8000/retrieve``) can use an
index built by ``build_index``. Request ``{"queries": [...], "topk": 3, "return_scores": true}``
(``topk`` null or 0 = the server's default); response ``{"result": [[hit, ...], ...]}`` with
``hit = {"document": {"id", "contents"}, "score": s}``, or the bare document without scores.
``contents`` is ``"title\\ntext"`` as in Search-R1's corpus. ``GET /health`` describes the index.

Unlike the original (bound to every interface, no limits), the server binds ``127.0.0.1`` by
default and refuses requests over ``max_request_bytes`` (413, checked while reading the body,
chunked or not), with more than ``max_queries`` queries (413), a query over
``max_query_chars`` or ``topk`` over ``max_topk`` (422); a retrieval taking longer than
``timeout_seconds`` is answered 504. At most ``max_concurrent`` retrievals run at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from .observation import Passage

__all__ = ["ServerConfig", "RetrieveRequest", "create_app", "BodyLimit", "main"]

logger = logging.getLogger(__name__)

SearchFn = Callable[[Sequence[str], int], list[list[Passage]]]


@dataclass(frozen=True)
class ServerConfig:
    """Server knobs (the CLI flags).

    Attributes:
        host: interface to bind (``127.0.0.1``: this machine only; ``0.0.0.0`` exposes it).
        port: TCP port.
        default_topk: passages per query when the request gives none (Search-R1: 3).
        max_topk: largest ``topk`` accepted.
        max_queries: most queries in one request.
        max_query_chars: longest query accepted.
        max_request_bytes: largest request body accepted.
        timeout_seconds: a retrieval taking longer is answered 504.
        max_concurrent: retrievals running at once (others wait).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    default_topk: int = 3
    max_topk: int = 100
    max_queries: int = 512
    max_query_chars: int = 4096
    max_request_bytes: int = 1 << 20
    timeout_seconds: float = 60.0
    max_concurrent: int = 4

    def __post_init__(self) -> None:
        for name in ("default_topk", "max_topk", "max_queries", "max_query_chars", "max_request_bytes", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"default_topk {self.default_topk} exceeds max_topk {self.max_topk}")
        if self.timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be > 0, got {self.timeout_seconds}")


class RetrieveRequest(BaseModel):
    """Search-R1's request body; any other field is refused (422), so a misspelt ``top_k`` is not
    silently ignored."""

    model_config = ConfigDict(extra="forbid")

    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


class BodyLimit:
    """ASGI middleware: refuse HTTP request bodies over ``max_bytes`` with 413.

    The body is read (and counted) before the app sees it, so an oversized upload is cut off as
    soon as it passes the limit, whether or not it declares a ``Content-Length``.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    @staticmethod
    async def _refuse(send: Callable[[dict], Awaitable[None]], limit: int) -> None:
        body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, self.max_bytes)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send, self.max_bytes)
                return
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


def create_app(search: SearchFn, config: ServerConfig = ServerConfig(), describe: Callable[[], dict] | None = None) -> Any:
    """The ASGI app: ``POST /retrieve`` and ``GET /health`` over ``search(queries, k)``."""
    app = FastAPI(title="verl-search-r3 retrieval", docs_url=None, redoc_url=None)
    gate = asyncio.Semaphore(config.max_concurrent)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **(describe() if describe is not None else {})}

    @app.post("/retrieve")
    async def retrieve(request: RetrieveRequest) -> dict:
        if not request.queries:
            raise HTTPException(422, "queries is empty")
        if len(request.queries) > config.max_queries:
            raise HTTPException(413, f"{len(request.queries)} queries; at most {config.max_queries} per request")
        blank = next((i for i, q in enumerate(request.queries) if not q.strip()), None)
        if blank is not None:
            raise HTTPException(422, f"query {blank} is empty")
        long = next((i for i, q in enumerate(request.queries) if len(q) > config.max_query_chars), None)
        if long is not None:
            raise HTTPException(422, f"query {long} has {len(request.queries[long])} characters; at most {config.max_query_chars}")
        k = request.topk or config.default_topk
        if not 1 <= k <= config.max_topk:
            raise HTTPException(422, f"topk must be between 1 and {config.max_topk}, got {k}")
        try:
            async with gate:
                results = await asyncio.wait_for(run_in_threadpool(search, request.queries, k), timeout=config.timeout_seconds)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"retrieval took longer than {config.timeout_seconds}s") from None
        docs = [[{"document": {"id": p.doc_id, "contents": p.contents}, "score": p.score} for p in row] for row in results]
        return {"result": docs if request.return_scores else [[hit["document"] for hit in row] for row in docs]}

    return BodyLimit(app, config.max_request_bytes)


def parser() -> argparse.ArgumentParser:
    d = ServerConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="python -m verl_search_r3.search_r1.server",
                                description="Serve a search index over HTTP with Search-R1's POST /retrieve schema.")
    p.add_argument("--index", required=True, metavar="DIR", help="index folder written by verl_search_r3.search_r1.build_index")
    p.add_argument("--model", default=None, metavar="DIR", help="query encoder folder (default: the one recorded in the index)")
    p.add_argument("--device", default=None, help="query encoder device (default: cuda if available, else cpu)")
    p.add_argument("--no-reasoning", action="store_true", help="Search-R3 index: embed queries without the generated analysis")
    for name, help_text in (
        ("host", "interface to bind; 0.0.0.0 exposes the server to the network"),
        ("port", "TCP port"),
        ("default_topk", "passages per query when the request gives no topk"),
        ("max_topk", "largest topk accepted"),
        ("max_queries", "most queries per request"),
        ("max_query_chars", "longest query accepted"),
        ("max_request_bytes", "largest request body accepted"),
        ("timeout_seconds", "seconds before a retrieval is answered 504"),
        ("max_concurrent", "retrievals running at once"),
    ):
        default = d[name].default
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=f"{help_text} (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 stopped, 1 the index or model cannot be served (a message, no traceback),
    2 bad options, 130 interrupted during start-up."""
    p = parser()
    args = p.parse_args(argv)
    try:
        config = ServerConfig(**{k: getattr(args, k) for k in ServerConfig.__dataclass_fields__})
    except ValueError as e:
        p.error(str(e))
    try:
        retrieval = open_retrieval(args)
    except (OSError, ValueError) as e:  # a missing or damaged index, a model that does not match it
        print(f"error: cannot serve {args.index!r}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    import uvicorn

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    logger.info("serving %s on http://%s:%d/retrieve", retrieval.describe(), config.host, config.port)
    uvicorn.run(create_app(retrieval.search, config, retrieval.describe), host=config.host, port=config.port, log_level="warning")
    return 0


def open_retrieval(args: argparse.Namespace) -> Any:
    """The :class:`~.retrieval.Retrieval` of ``--index`` (Ray started first for a sharded index)."""
    from .config import RetrieverConfig
    from .index_layout import IndexManifest
    from .retrieval import Retrieval

    if IndexManifest.load(args.index).num_shards > 1:
        import ray

        ray.init(include_dashboard=False)
    return Retrieval(RetrieverConfig(index_dir=args.index, model=args.model, device=args.device, placement="local",
                                     reasoning=not args.no_reasoning))


if __name__ == "__main__":
    sys.exit(main())
