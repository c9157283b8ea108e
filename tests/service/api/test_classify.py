from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.engine.types import INLINE_TOKENIZE_CHARS
from tests.fakes import FakeEngine
from tests.service.api.harness import make_app, server_timing, wait_ready


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


def test_rows_reach_the_forward_tokenised_by_the_event_loop(client: TestClient, engine: FakeEngine) -> None:
    assert client.post("/v1/tasks/nli/classify", json={"inputs": [["a", "b"], ["c", "d"]]}).status_code == 200
    assert engine.untokenized_rows == 0 and len(engine.pretokenized) == 1
    assert not engine.pretokenized[0].startswith(("asyncio_", "adaptserve-forward"))  # no thread hop for short rows


def test_a_long_request_is_tokenised_in_a_worker_thread(store, engine: FakeEngine) -> None:
    """Over INLINE_TOKENIZE_CHARS the loop hands the tokenizer work to a thread (asyncio_N): never the loop
    (every request waits on it), never the forward thread (every task waits on it)."""
    text = "word " * (INLINE_TOKENIZE_CHARS // 5 + 1)
    with TestClient(make_app(store, engine, max_chars_per_input=len(text), max_body_bytes=4 * len(text))) as big:
        wait_ready(big)
        assert big.post("/v1/tasks/sentiment/classify", json={"inputs": [text]}).status_code == 200
        assert big.post("/v1/tasks/sentiment/classify", json={"inputs": ["short"]}).status_code == 200
    assert [name.startswith("asyncio_") for name in engine.pretokenized] == [True, False]
    assert engine.untokenized_rows == 0


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


def test_the_answer_says_where_its_time_went(client: TestClient) -> None:
    first = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["sleep:0.05", "b", "c"]})
    again = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
    spans = server_timing(first.headers["server-timing"])
    assert list(spans) == ["task", "tokenize", "queue", "forward", "total"]
    assert spans["task"][1] == "store" and server_timing(again.headers["server-timing"])["task"][1] == "device"  # loaded, then cached
    assert spans["forward"] == (pytest.approx(spans["forward"][0]), "3 rows") and spans["forward"][0] >= 50
    assert all(dur >= 0 for dur, _ in spans.values())
    assert sum(spans[name][0] for name in ("task", "tokenize", "queue", "forward")) <= spans["total"][0] + 0.5  # rounding


def test_activating_a_new_version_serves_it_without_restart(client: TestClient, store) -> None:
    assert client.post("/v1/tasks/nli/classify", json={"inputs": [["a", "b"]]}).json()["version"] == "v2"
    (store / "nli" / "ACTIVE").write_text("v1")
    assert client.post("/v1/tasks/nli/classify", json={"inputs": [["a", "b"]]}).json()["version"] == "v1"


def test_client_timeout_beyond_the_server_deadline_is_capped(client: TestClient) -> None:
    response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"], "timeout_ms": 3_600_000})
    assert response.status_code == 200


@pytest.mark.parametrize("raw", [b"1e3", b"1000.0", b"1000"])
def test_a_whole_timeout_in_any_json_spelling_is_accepted(client: TestClient, raw: bytes) -> None:
    body = b'{"inputs": ["x"], "timeout_ms": ' + raw + b"}"
    response = client.post("/v1/tasks/sentiment/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("raw, message", [
    (b"1e400", "must be a whole number of milliseconds in [1, 3600000], got inf "
               "(JSON numbers beyond ±1.8e308, such as 1e400, read as inf)"),
    (b"4" * 400 + b".0", "must be a whole number of milliseconds in [1, 3600000], got inf"),
    (b"NaN", "must be a whole number of milliseconds in [1, 3600000], got nan"),
    (b"4" * 400, "Input should be less than or equal to 3600000"),
], ids=["1e400", "400-digit decimal", "NaN", "400 digits"])
def test_a_timeout_no_float_holds_is_422_naming_the_range(client: TestClient, raw: bytes, message: str) -> None:
    body = b'{"inputs": ["x"], "timeout_ms": ' + raw + b"}"
    response = client.post("/v1/tasks/sentiment/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error_type"] == "validation_error"
    assert response.json()["error"].startswith(f"body.timeout_ms: {message}"), response.text


def test_a_slow_forward_past_the_deadline_is_504(client: TestClient) -> None:
    response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["sleep:0.3"], "timeout_ms": 20})
    assert response.status_code == 504 and response.json()["error_type"] == "deadline_exceeded"


def test_a_deadline_too_short_for_a_resident_task_does_not_blame_its_load(client: TestClient) -> None:
    assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200  # resident now
    answers = [client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"], "timeout_ms": 1}) for _ in range(20)]
    late = [r.json()["error"] for r in answers if r.status_code == 504]
    assert late and not any("did not load" in message for message in late), late


def test_openapi_documents_the_routes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/v1/tasks/{task}/classify", "/v1/tasks", "/v1/tasks/{task}", "/healthz", "/readyz"} <= set(schema["paths"])
    assert "ClassifyRequest" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200
