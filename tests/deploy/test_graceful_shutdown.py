"""SIGTERM during a load of concurrent requests: every accepted request gets its answer.

A real `python -m service serve` process on the real MiniLM (so a forward takes real time), a
LoRA task, 12 concurrent clients of 64 inputs each. Once all of them are queued or running, the
process gets SIGTERM, as Docker and Kubernetes send it. Every one must come back 200 with all its
predictions; after the signal the server takes no new work; the process exits on its own.
"""
from __future__ import annotations

import re
import signal
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


def test_sigterm_drains_every_accepted_request(tmp_path, minilm_backbone):
    info = minilm_backbone.info
    g = torch.Generator().manual_seed(0)
    publish(tmp_path / "store", "sentiment", {"lora": random_lora(info, g, r=8), "head": random_head(info, g)},
            ["negative", "positive"], max_length=128, fingerprint=info.fingerprint)
    server = Replica("drain", tmp_path, {
        "ADAPTSERVE_STORE": str(tmp_path / "store"),
        "ADAPTSERVE_REQUEST_TIMEOUT_S": "300",  # this test is about draining, not deadlines
        "ADAPTSERVE_MAX_BATCH_SIZE": "32",
    }).start()
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
