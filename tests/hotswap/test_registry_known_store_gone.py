"""`Registry.known` picks the metrics label of a classify request after its answer was sent: it must
never raise. A local store whose directory is gone (an unmounted volume) made it raise
StoreUnavailable, so every classify request during the outage logged two ERROR tracebacks
("unhandled error ... Exception in ASGI application") and went uncounted in
adaptserve_requests_total."""
from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.registry.local import LocalRegistry
from service.store import LocalStore
from tests.fakes import FakeEngine, write_task
from tests.service.api.harness import make_app, wait_ready


def test_known_is_false_not_an_exception_when_the_store_directory_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_task(root, "t", "v1", active=True)
    registry = LocalRegistry(LocalStore(root))
    assert registry.known("t")
    shutil.rmtree(root)
    assert registry.known("t") is False
    assert registry.known("other") is False


def _requests(client: TestClient) -> dict[tuple[str, str], float]:
    text = client.get("/metrics").text
    return {
        (s.labels["task"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text) if family.name == "adaptserve_requests"
        for s in family.samples if s.name == "adaptserve_requests_total"
    }


def test_a_classify_request_during_a_store_outage_is_a_counted_503(tmp_path: Path, caplog) -> None:
    root = tmp_path / "store"
    write_task(root, "sentiment", "v1", labels=["neg", "pos"], active=True)
    with TestClient(make_app(root, FakeEngine()), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200
        moved = root.rename(tmp_path / "moved")
        caplog.clear()
        response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
        assert response.status_code == 503
        assert response.json()["error_type"] == "store_unavailable"
        assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
        counted = _requests(client)
        assert counted.get(("_unknown", "503")) == 1.0, counted
        moved.rename(root)
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200
        assert _requests(client).get(("sentiment", "200")) == 2.0
