"""/readyz fails while a local store's directory cannot be read under the local registry: every
classify and listing is then a 503 `store_unavailable`, so a replica that says "ready" keeps
drawing traffic it can only refuse. Before, /readyz stayed 200 throughout. /healthz stays 200: a
dependency outage is no reason to restart the process."""
from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.fakes import FakeEngine, write_task
from tests.service.api.harness import make_app, wait_ready


def test_readyz_is_503_while_the_store_directory_is_gone_and_recovers(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_task(root, "sentiment", "v1", labels=["neg", "pos"], active=True)
    with TestClient(make_app(root, FakeEngine()), raise_server_exceptions=False) as client:
        wait_ready(client)
        moved = root.rename(tmp_path / "moved")
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["status"] == "store_unavailable" and str(root) in body["error"]
        assert client.head("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200 and client.head("/healthz").status_code == 200
        moved.rename(root)
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200


def test_an_empty_store_is_ready(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    with TestClient(make_app(root, FakeEngine()), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.get("/readyz").json()["status"] == "ready"
