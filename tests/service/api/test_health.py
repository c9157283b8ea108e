"""/healthz, /readyz and /metrics: readiness through start-up, failure and a store outage, and the
request counts."""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from service.methods import slots

from tests.fakes import FakeEngine
from tests.service.api.harness import make_app, wait_ready


def test_ready_server(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "error": None}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["backbone"]["name"] == "fake-minilm" and ready["backbone"]["fingerprint"] == "fake0000"
    for probe in ("/healthz", "/readyz"):  # load balancers probe with HEAD: same status, no body
        head = client.head(probe)
        assert (head.status_code, head.content) == (200, b"")


def test_not_ready_until_warmup_is_done(store: Path) -> None:
    engine = FakeEngine()
    engine.warmup_gate = threading.Event()
    with TestClient(make_app(store, engine)) as client:
        assert client.get("/healthz").status_code == 200  # alive while loading
        starting = client.get("/readyz")
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
        assert client.head("/readyz").status_code == 503 and client.head("/healthz").status_code == 200  # HEAD agrees
        refused = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
        assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready"
        assert refused.headers["Retry-After"] == "1"  # soon, as a 429 says
        engine.warmup_gate.set()
        wait_ready(client)
        assert engine.warmed
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200


def test_a_failed_startup_is_reported_by_both_probes(store: Path) -> None:
    engine = FakeEngine(warmup_error=RuntimeError("CUDA out of memory"))
    with TestClient(make_app(store, engine)) as client:
        wait_failed = lambda: client.get("/healthz").status_code == 503  # noqa: E731
        for _ in range(1000):
            if wait_failed():
                break
        health = client.get("/healthz").json()
        assert health["status"] == "failed" and "CUDA out of memory" in health["error"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
        assert response.status_code == 503 and "CUDA out of memory" in response.json()["error"]
        assert "Retry-After" not in response.headers  # no retry helps until a restart


def test_metrics_count_requests_by_task_and_status(client: TestClient) -> None:
    client.post("/v1/tasks/sentiment/classify", json={"inputs": ["a", "b"]})
    client.post("/v1/tasks/sentiment/classify", json={"inputs": ["c"]})
    client.post("/v1/tasks/sentiment/classify", json={"inputs": []})
    client.post("/v1/tasks/no-such-task/classify", json={"inputs": ["x"]})
    client.post("/v1/tasks/made-up-1/classify", json={"inputs": ["x"] * 2000})  # 413 from the body limit
    assert client.get("/v1/tasks/sentiment/classify").status_code == 405  # never reached the task
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'adaptserve_requests_total{status="200",task="sentiment"} 2.0' in text
    assert 'adaptserve_requests_total{status="422",task="sentiment"} 1.0' in text
    # Unknown names share one label: clients cannot create series.
    assert 'adaptserve_requests_total{status="404",task="_unknown"} 1.0' in text
    assert 'adaptserve_requests_total{status="413",task="_unknown"} 1.0' in text
    assert 'adaptserve_requests_total{status="405",task="_unknown"} 1.0' in text
    assert "no-such-task" not in text and "made-up-1" not in text
    assert 'adaptserve_request_duration_seconds_count{task="sentiment"} 3.0' in text
    assert "adaptserve_batch_size_count 2.0" in text
    assert "adaptserve_cache_hits_total 1.0" in text
    assert "adaptserve_cache_misses_total 1.0" in text
    assert "adaptserve_cache_loads_total 1.0" in text
    assert "adaptserve_cache_bytes 1000.0" in text
    assert "adaptserve_queue_depth 0.0" in text
    assert "adaptserve_ready 1.0" in text


@pytest.mark.parametrize("required", [False, True])
def test_metrics_need_a_known_token_only_when_the_setting_asks(store: Path, required: bool) -> None:
    """The per-task series name every task in the store: ADAPTSERVE_METRICS_REQUIRE_TOKEN keeps
    them from whoever can reach the port; without it Prometheus scrapes with no token, auth on."""
    app = make_app(store, FakeEngine(), admin_tokens="admin-1", inference_tokens="reader-1",
                   metrics_require_token=required)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]},
                           headers={"Authorization": "Bearer reader-1"}).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic cmVhZGVyLTE="}):
            for method in ("GET", "HEAD"):
                answer = client.request(method, "/metrics", headers=headers)
                assert answer.status_code == (401 if required else 200), (method, headers)
                assert ('task="sentiment"' in answer.text) is (method == "GET" and not required)
            if required:
                assert answer.headers["www-authenticate"].startswith("Bearer")
                assert client.get("/metrics", headers=headers).json()["error_type"] == "unauthorized"
        for token in ("reader-1", "admin-1"):  # an inference token suffices
            answer = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200 and 'adaptserve_requests_total{status="200",task="sentiment"} 1.0' in answer.text
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200  # probes: never


def test_metrics_report_the_bytes_the_slot_pools_hold(client: TestClient, monkeypatch) -> None:
    """The methods' slot pools (device copies of batched tasks, on top of the cache) show in a
    gauge: what every pool on the service's budget holds at scrape time."""
    monkeypatch.setattr(slots, "BUDGET", slots.Budget())
    pools = [slots.SlotPool(lambda w: {"k": (w,)}) for _ in range(2)]
    assert "adaptserve_slot_pool_bytes 0.0" in client.get("/metrics").text
    weights = torch.ones(4, 8)  # 128 bytes a slot; a fresh pool starts with 8 slots
    pools[0].gather([weights], torch.zeros(1, dtype=torch.long))
    pools[1].gather([weights[:2]], torch.zeros(1, dtype=torch.long))
    assert "adaptserve_slot_pool_bytes 1536.0" in client.get("/metrics").text  # 8 x 128 + 8 x 64


@contextlib.contextmanager
def _store_gone(store: Path) -> Iterator[None]:
    """The store's directory moved away (an unmounted volume) for the block, then put back."""
    moved = store.rename(store.with_name(store.name + "-moved"))
    try:
        yield
    finally:
        moved.rename(store)


def test_a_store_outage_keeps_served_tasks_serving_and_counts_the_rest_as_503(client: TestClient, store: Path,
                                                                              caplog) -> None:
    """The store's directory gone (an unmounted volume): a task this replica served keeps its
    version from memory, as it would with Redis or S3; one it never served is a 503
    `store_unavailable`, counted in adaptserve_requests_total without an ERROR (the metrics label's
    `Registry.known` used to raise: two tracebacks per request, uncounted)."""
    served = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
    assert served.status_code == 200
    with _store_gone(store):
        caplog.clear()
        again = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
        assert again.status_code == 200 and again.json()["version"] == served.json()["version"]
        unseen = client.post("/v1/tasks/nli/classify", json={"inputs": [["a", "b"]]})
        assert unseen.status_code == 503 and unseen.json()["error_type"] == "store_unavailable"
        assert unseen.headers["retry-after"] == "1"  # an outage to retry, as on S3
        assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
        assert any("cannot be read" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        text = client.get("/metrics").text
        assert 'adaptserve_requests_total{status="503",task="_unknown"} 1.0' in text, text
        assert 'adaptserve_requests_total{status="200",task="sentiment"} 2.0' in text, text
    assert client.post("/v1/tasks/nli/classify", json={"inputs": [["a", "b"]]}).status_code == 200


def test_readyz_stays_200_while_the_store_directory_is_gone(client: TestClient, store: Path) -> None:
    """The replica still serves what it holds, so it stays in the Service; /healthz stays 200 too: a
    dependency outage is no reason to restart the process."""
    assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200
    with _store_gone(store):
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200
        assert client.get("/readyz").status_code == 200 and client.head("/readyz").status_code == 200
        assert client.get("/healthz").status_code == 200 and client.head("/healthz").status_code == 200


def test_an_empty_store_is_ready(tmp_path: Path, engine: FakeEngine) -> None:
    root = tmp_path / "store"
    root.mkdir()
    with TestClient(make_app(root, engine), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.get("/readyz").json()["status"] == "ready"


def test_each_app_has_its_own_metrics(store: Path) -> None:
    with TestClient(make_app(store, FakeEngine())) as first, TestClient(make_app(store, FakeEngine())) as second:
        wait_ready(first)
        wait_ready(second)
        first.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
        assert 'task="sentiment"' in first.get("/metrics").text
        assert 'task="sentiment"' not in second.get("/metrics").text


def test_a_cache_budget_beyond_the_memory_is_warned_of_at_start(store: Path, engine: FakeEngine, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="service.app"):
        with TestClient(make_app(store, engine, cache_max_bytes=10**30)) as client:
            wait_ready(client)
            assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200  # it serves
    warned = [r.getMessage() for r in caplog.records if "ADAPTSERVE_CACHE_MAX_BYTES" in r.getMessage()]
    assert len(warned) == 1 and "this process can have" in warned[0]



def test_with_tokens_the_probes_give_their_reasons_only_to_a_caller_holding_one(store: Path) -> None:
    """The probes need no token, but their reasons name internal hosts and paths (Redis's address,
    a model folder): with tokens configured a caller without one reads the status alone."""
    import socket

    from service.api.health import HIDDEN

    with socket.socket() as s:  # a port nothing listens on: Redis is away
        s.bind(("127.0.0.1", 0))
        redis_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    tokens = dict(admin_tokens="adm-7c1e", inference_tokens="inf-3b9d")
    reader = {"Authorization": "Bearer inf-3b9d"}
    with TestClient(make_app(store, FakeEngine(), redis_url=redis_url, redis_reconnect_min_s=0.05, **tokens)) as client:
        wait_ready(client)
        for _ in range(2000):
            if "error" in client.get("/readyz", headers=reader).json()["registry"]:
                break
        registry = client.get("/readyz", headers=reader).json()["registry"]
        assert registry["connected"] is False and redis_url.split("//")[1].split("/")[0] in registry["error"]
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            hidden = client.get("/readyz", headers=headers)
            assert hidden.status_code == 200 and hidden.json()["registry"]["error"] == HIDDEN
    engine = FakeEngine(warmup_error=RuntimeError("cannot read /models/secret-path/config.json"))
    with TestClient(make_app(store, engine, **tokens)) as client:
        for _ in range(1000):
            if client.get("/healthz").status_code == 503:
                break
        for probe in ("/healthz", "/readyz"):
            assert client.get(probe).json()["error"] == HIDDEN
            assert "secret-path" in client.get(probe, headers=reader).json()["error"]
    with TestClient(make_app(store, FakeEngine(warmup_error=RuntimeError("no tokens: shown")))) as client:
        for _ in range(1000):
            if client.get("/healthz").status_code == 503:
                break
        assert client.get("/readyz").json()["error"].endswith("no tokens: shown")  # auth off: everyone sees it
