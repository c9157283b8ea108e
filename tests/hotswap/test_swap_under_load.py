"""20 uploads, activations and rollbacks of one task under a steady stream of classify requests
from several clients, over real HTTP: no request fails, every request is answered by one version,
and that version was active at some point while the request was in flight."""
from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.settings import Settings
from tests.hotswap.bundles import files, make_bundle
from tests.hotswap.conftest import ADMIN, AUTH_ADMIN, AUTH_READER, READER
from tests.hotswap.servers import eventually

CLIENTS = 4


@dataclass(frozen=True)
class Answer:
    started: float
    finished: float
    status: int
    version: str | None
    row_versions: frozenset[str]


@dataclass(frozen=True)
class Change:
    started: float
    finished: float
    active: str  # the active version the change left behind


@pytest.fixture
def url(store: Path, engine) -> Iterator[str]:
    settings = Settings(store=store, admin_tokens=ADMIN, inference_tokens=READER, max_wait_ms=2.0, max_batch_size=8)
    app = create_app(settings, engine=engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    eventually(lambda: httpx.get(f"{url}/readyz").status_code == 200)
    yield url
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _classify_until(url: str, stop: threading.Event, answers: list[Answer]) -> None:
    with httpx.Client(base_url=url, headers=AUTH_READER, timeout=10) as client:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["great fun", "boring plot", f"day {n}"]})
            finished = time.monotonic()
            body = response.json() if response.status_code == 200 else {}
            answers.append(Answer(started, finished, response.status_code, body.get("version"),
                                  frozenset(p["version"] for p in body.get("predictions", []))))


def test_swaps_under_load_never_fail_a_request_or_serve_an_inactive_version(url: str, info) -> None:
    admin = httpx.Client(base_url=url, headers=AUTH_ADMIN, timeout=30)
    uploaded: list[str] = []
    seeds = iter(range(100, 200))

    def upload() -> str:
        response = admin.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=next(seeds))))
        assert response.status_code == 201, response.text
        uploaded.append(response.json()["version"])
        return response.json()["version"]

    def activate(index: int) -> Callable[[], str]:
        def run() -> str:
            response = admin.post(f"/v1/tasks/sentiment/versions/{uploaded[index]}/activate")
            assert response.status_code == 200, response.text
            return response.json()["active"]
        return run

    def rollback() -> str:
        response = admin.post("/v1/tasks/sentiment/rollback")
        assert response.status_code == 200, response.text
        return response.json()["active"]

    changes = [Change(-math.inf, -math.inf, upload())]  # v0, before the load starts
    plan: list[Callable[[], str]] = [
        upload, upload, rollback, upload, activate(0), rollback, upload, upload, rollback, rollback,
        upload, activate(1), upload, rollback, upload, activate(2), rollback, upload, upload, rollback,
    ]
    assert len(plan) == 20

    stop = threading.Event()
    answers: list[Answer] = []
    clients = [threading.Thread(target=_classify_until, args=(url, stop, answers)) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        eventually(lambda: len(answers) >= 2 * CLIENTS)  # the stream is flowing before the first swap
        for step in plan:
            started = time.monotonic()
            active = step()
            changes.append(Change(started, time.monotonic(), active))
            time.sleep(0.02)  # let some requests run on each version
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=30)
        admin.close()

    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {sorted({a.status for a in failed})}"
    assert len(answers) >= 40, "too few requests to say anything"
    assert len({c.active for c in changes}) >= 8  # the swaps really moved between many versions

    def possibly_active(version: str, started: float, finished: float) -> bool:
        # Change i takes effect somewhere in [its start, its end]; its version serves until the
        # next change takes effect, at the latest when that change's request returned.
        for i, change in enumerate(changes):
            until = changes[i + 1].finished if i + 1 < len(changes) else math.inf
            if change.active == version and change.started <= finished and until >= started:
                return True
        return False

    for answer in answers:
        assert answer.row_versions == {answer.version}, "one request, one version"
        assert possibly_active(answer.version, answer.started, answer.finished), answer
