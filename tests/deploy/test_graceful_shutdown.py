"""SIGTERM during a load of concurrent requests: every accepted request gets its answer.

A real `python -m service serve` process on the real MiniLM (so a forward takes real time), a
LoRA task, 12 concurrent clients of 64 inputs each. Once all of them are queued or running, the
process gets SIGTERM, as Docker and Kubernetes send it. Every one must come back 200 with all its
predictions; after the signal the server takes no new work; the process exits on its own.
And an upload whose body keeps coming slowly does not hold the drain past its bound.
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
import torch

from tests.factories import publish, random_head, random_lora
from tests.hotswap.servers import Replica, eventually

pytestmark = pytest.mark.slow

CLIENTS = 12
INPUTS = 64
SENTENCE = "the film is a gorgeous , witty and thoroughly engaging piece of work with a plot that never drags"


def _queued_rows(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=2).text
    m = re.search(r"^adaptserve_queue_depth (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _replica_with_a_task(name: str, tmp_path, backbone) -> Replica:
    """A started server on a store of one LoRA task, whose requests take as long as they queue."""
    info = backbone.info
    g = torch.Generator().manual_seed(0)
    publish(tmp_path / "store", "sentiment", {"lora": random_lora(info, g, r=8), "head": random_head(info, g)},
            ["negative", "positive"], max_length=128, fingerprint=info.fingerprint)
    return Replica(name, tmp_path, {
        "ADAPTSERVE_STORE": str(tmp_path / "store"),
        "ADAPTSERVE_REQUEST_TIMEOUT_S": "300",  # these tests are about draining, not deadlines
        "ADAPTSERVE_MAX_BATCH_SIZE": "32",
    }).start()


def test_sigterm_drains_every_accepted_request(tmp_path, minilm_backbone):
    server = _replica_with_a_task("drain", tmp_path, minilm_backbone)
    try:
        server.wait_ready(timeout_s=120)
        with httpx.Client(timeout=30) as c:  # load the task before the clock starts
            assert c.post(f"{server.url}/v1/tasks/sentiment/classify", json={"inputs": ["warm"]}).status_code == 200

        results: list[httpx.Response | Exception] = []
        lock = threading.Lock()

        def client() -> None:
            # A connection of its own per request: "accepted" is then unambiguous.
            try:
                with httpx.Client(timeout=300) as c:
                    r = c.post(f"{server.url}/v1/tasks/sentiment/classify", json={"inputs": [SENTENCE] * INPUTS})
            except Exception as e:  # noqa: BLE001 - recorded and asserted below
                r = e
            with lock:
                results.append(r)

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        # every request accepted and queued (the backlog is far larger than one batch)
        eventually(lambda: _queued_rows(server.url) >= (CLIENTS - 2) * INPUTS, timeout_s=60, interval_s=0.02)
        server.process.send_signal(signal.SIGTERM)

        time.sleep(1.0)  # let the server act on the signal: it stops listening first
        try:  # no new work once the signal is in: refused outright, or told it is shutting down
            late = httpx.post(f"{server.url}/v1/tasks/sentiment/classify", json={"inputs": ["late"]}, timeout=5)
            assert late.status_code == 503, late.text
        except httpx.ConnectError:
            pass
        for t in threads:
            t.join(timeout=300)
        assert len(results) == CLIENTS
        failures = [r for r in results if not isinstance(r, httpx.Response) or r.status_code != 200]
        assert not failures, failures
        for r in results:
            preds = r.json()["predictions"]
            assert len(preds) == INPUTS and all(p["label"] in ("negative", "positive") for p in preds)
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.stop()


def test_sigint_drains_as_sigterm_does_and_exits_130_without_a_traceback(tmp_path, minilm_backbone):
    # Ctrl-C in a terminal, or `docker compose up` stopped there: uvicorn raises SIGINT again once
    # it has drained, and Python printed a KeyboardInterrupt traceback after a clean stop.
    server = _replica_with_a_task("sigint", tmp_path, minilm_backbone)
    try:
        server.wait_ready(timeout_s=120)
        results: list[httpx.Response | Exception] = []

        def client() -> None:
            try:
                results.append(httpx.post(f"{server.url}/v1/tasks/sentiment/classify",
                                          json={"inputs": [SENTENCE] * INPUTS}, timeout=300))
            except Exception as e:  # noqa: BLE001 - asserted below
                results.append(e)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        eventually(lambda: _queued_rows(server.url) >= INPUTS, timeout_s=60, interval_s=0.02)
        server.process.send_signal(signal.SIGINT)
        for t in threads:
            t.join(timeout=300)
        assert [r.status_code if isinstance(r, httpx.Response) else r for r in results] == [200] * 3
        assert server.process.wait(timeout=60) == 130, server.logs()
        assert "Traceback" not in server.logs() and "KeyboardInterrupt" not in server.logs(), server.logs()
        assert "Application shutdown complete" in server.logs()
    finally:
        server.stop()


def test_sigterm_does_not_wait_for_an_upload_that_never_ends(tmp_path):
    # An upload has no deadline: a body that keeps coming is read for as long as it comes. The
    # drain is bounded all the same (request timeout + margin), so the process exits on its own
    # long before an orchestrator's SIGKILL, and a slow upload is cut rather than waited for.
    request_timeout_s = 2
    (tmp_path / "store").mkdir()
    server = Replica("upload-drain", tmp_path, {
        "ADAPTSERVE_STORE": str(tmp_path / "store"),
        "ADAPTSERVE_REQUEST_TIMEOUT_S": str(request_timeout_s),
        "ADAPTSERVE_MAX_CONCURRENT_UPLOADS": "1",
    }).start()
    stop = threading.Event()
    sock = None
    try:
        server.wait_ready(timeout_s=120)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"POST /v1/tasks/slow/versions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 200000\r\n\r\n"
                     b'--b\r\nContent-Disposition: form-data; name="adapter_model.safetensors"; '
                     b'filename="adapter_model.safetensors"\r\n\r\n')

        def trickle() -> None:  # 16 bytes every 0.2 s: well inside the body-read timeout, for ~4 minutes
            while not stop.wait(0.2):
                try:
                    sock.sendall(b"\0" * 16)
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        # The upload is being read: it holds the only upload slot, so a second one is refused.
        eventually(lambda: httpx.post(f"{server.url}/v1/tasks/other/versions", files={"x": b"y"},
                                      timeout=2).status_code == 429, timeout_s=10, interval_s=0.1)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=request_timeout_s + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still draining {request_timeout_s + 20} s after SIGTERM, held by a slow upload")
        assert code in (0, -signal.SIGTERM), server.logs()
        assert time.monotonic() - signalled < request_timeout_s + 15
        assert "timeout graceful shutdown exceeded" in server.logs()  # uvicorn says it cut the upload
    finally:
        stop.set()
        if sock is not None:
            sock.close()
        server.stop()
