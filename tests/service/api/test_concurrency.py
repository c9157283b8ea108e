"""The HTTP layer under concurrent load, driven in-process: backpressure, client disconnects,
graceful shutdown. The fake engine's gate holds a forward so queues can be built on purpose."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import AsyncIterator

import httpx
from fastapi import FastAPI

from service.state import ServiceState
from tests.aio import async_test, wait_until
from tests.fakes import FakeEngine
from tests.service.api.harness import make_app

CLASSIFY = "/v1/tasks/sentiment/classify"


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan, wait until ready, and give a client talking to it in-process."""
    async with app.router.lifespan_context(app):
        state: ServiceState = app.state.service
        await wait_until(lambda: state.ready)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


async def raw_request(
    app: FastAPI, path: str, body: bytes, *, headers: dict[str, str] | None = None, disconnect: asyncio.Event | None = None
) -> tuple[int, dict]:
    """One POST straight through ASGI, so the test controls when the client disconnects."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        await (disconnect or asyncio.Event()).wait()  # without an event: never disconnect
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    header_list = [(b"content-type", b"application/json")]
    header_list += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": header_list,
        "client": ("127.0.0.1", 1234), "server": ("test", 80),
    }
    await app(scope, receive, send)
    status = next(message["status"] for message in sent if message["type"] == "http.response.start")
    payload = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return status, json.loads(payload)


async def hold_a_forward(client: httpx.AsyncClient, engine: FakeEngine) -> asyncio.Future:
    """Send one request and keep its forward waiting at the gate."""
    engine.gate = threading.Event()
    first = asyncio.ensure_future(client.post(CLASSIFY, json={"inputs": ["first"]}))
    await wait_until(engine.in_forward.is_set)
    return first


@async_test
async def test_a_full_queue_answers_429_with_retry_after(store: Path) -> None:
    engine = FakeEngine()
    app = make_app(store, engine, max_batch_size=1, max_queue=4)
    async with serving(app) as client:
        first = await hold_a_forward(client, engine)
        queued = asyncio.ensure_future(client.post(CLASSIFY, json={"inputs": ["a", "b", "c", "d"]}))
        await wait_until(lambda: app.state.service.runtime.scheduler.queue_depth == 4)
        refused = await client.post(CLASSIFY, json={"inputs": ["e"]})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1" and refused.json()["error_type"] == "overloaded"
        engine.gate.set()
        assert (await first).status_code == 200 and (await queued).status_code == 200
        assert "e" not in engine.seen_texts()


@async_test
async def test_a_client_that_disconnects_is_dropped_before_its_forward(store: Path) -> None:
    engine = FakeEngine()
    app = make_app(store, engine, max_batch_size=1)
    async with serving(app) as client:
        first = await hold_a_forward(client, engine)
        disconnect = asyncio.Event()
        gone = asyncio.ensure_future(raw_request(app, CLASSIFY, b'{"inputs": ["gone"]}', disconnect=disconnect))
        await wait_until(lambda: app.state.service.runtime.scheduler.queue_depth == 1)
        disconnect.set()
        status, body = await gone
        assert status == 499 and body["error_type"] == "client_closed_request"
        engine.gate.set()
        assert (await first).status_code == 200
        assert (await client.post(CLASSIFY, json={"inputs": ["after"]})).status_code == 200
        assert engine.seen_texts() == {"first", "after"}


@async_test
async def test_shutdown_drains_queued_requests_and_refuses_new_ones(store: Path) -> None:
    engine = FakeEngine()
    app = make_app(store, engine, max_batch_size=1)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    await wait_until(lambda: app.state.service.ready)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        first = await hold_a_forward(client, engine)
        queued = asyncio.ensure_future(client.post(CLASSIFY, json={"inputs": ["queued"]}))
        await wait_until(lambda: app.state.service.runtime.scheduler.queue_depth == 1)
        stopping = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
        await wait_until(lambda: app.state.service.stopping)
        late = await client.post(CLASSIFY, json={"inputs": ["late"]})
        assert late.status_code == 503 and late.json()["error_type"] == "shutting_down"
        assert (await client.get("/readyz")).json()["status"] == "stopping"
        engine.gate.set()
        await stopping
        assert (await first).status_code == 200 and (await queued).status_code == 200
    assert engine.seen_texts() == {"first", "queued"}


@async_test
async def test_content_length_is_checked_before_the_body_is_read(store: Path) -> None:
    app = make_app(store, FakeEngine())
    async with serving(app):
        status, body = await raw_request(app, CLASSIFY, b"", headers={"content-length": "999999999"})
        assert (status, body["error_type"]) == (413, "payload_too_large")
        status, body = await raw_request(app, CLASSIFY, b"{}", headers={"content-length": "lots"})
        assert (status, body["error_type"]) == (400, "bad_request")
