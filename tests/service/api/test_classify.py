from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.fakes import FakeEngine


def test_classify_single_texts(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["good", "bad!"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["task"], body["version"]) == ("sentiment", "v1")
    # The fake favours label len(text) % 2: "good" -> neg, "bad!" -> neg; check one of each.
    labels = [p["label"] for p in body["predictions"]]
    assert labels == ["neg", "neg"]
    for prediction in body["predictions"]:
        assert set(prediction["scores"]) == {"neg", "pos"}
        assert sum(prediction["scores"].values()) == pytest.approx(1.0)
        assert prediction["score"] == max(prediction["scores"].values())
        assert prediction["version"] == "v1"
    assert engine.seen_texts() == {"good", "bad!"}


def test_classify_pairs_uses_the_active_version(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/tasks/nli/classify", json={"inputs": [["a man sleeps", "a person rests"], ["x", "y"]]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == "v2" and [p["version"] for p in body["predictions"]] == ["v2", "v2"]
    assert engine.loads[-1].version == "v2"


def test_predictions_keep_input_order(client: TestClient) -> None:
    texts = ["a", "bb", "ccc", "dddd"]
    body = client.post("/v1/tasks/sentiment/classify", json={"inputs": texts}).json()
    assert [p["label"] for p in body["predictions"]] == ["pos", "neg", "pos", "neg"]


def test_a_task_is_loaded_once_and_then_served_from_the_cache(client: TestClient, engine: FakeEngine) -> None:
    for _ in range(3):
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200
    assert [key.name for key in engine.loads] == ["sentiment"]


def test_activating_a_new_version_serves_it_without_restart(client: TestClient, store) -> None:
    assert client.post("/v1/tasks/nli/classify", json={"inputs": [["a", "b"]]}).json()["version"] == "v2"
    (store / "nli" / "ACTIVE").write_text("v1")
    assert client.post("/v1/tasks/nli/classify", json={"inputs": [["a", "b"]]}).json()["version"] == "v1"


def test_client_timeout_beyond_the_server_deadline_is_capped(client: TestClient) -> None:
    response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"], "timeout_ms": 3_600_000})
    assert response.status_code == 200


def test_a_slow_forward_past_the_deadline_is_504(client: TestClient) -> None:
    response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["sleep:0.3"], "timeout_ms": 20})
    assert response.status_code == 504 and response.json()["error_type"] == "deadline_exceeded"


def test_openapi_documents_the_routes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/v1/tasks/{task}/classify", "/v1/tasks", "/v1/tasks/{task}", "/healthz", "/readyz"} <= set(schema["paths"])
    assert "ClassifyRequest" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200
