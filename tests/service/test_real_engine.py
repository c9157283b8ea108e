"""The serving shell over the real engine: create_app loads the backbone itself, tasks come
from real bundles, and what the HTTP API answers equals what the engine computes directly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.backbone import load_backbone
from service.engine.engine import Engine
from service.engine.model_id import BUNDLED_MODEL_ID
from service.engine.types import INLINE_TOKENIZE_CHARS, ClassifyItem, TaskKey
from service.settings import Settings
from tests.factories import publish, random_head, random_lora, save_tiny_backbone
from tests.service.api.harness import wait_ready


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random BERT folder and a store with a single-text and a pair task for it."""
    root = tmp_path_factory.mktemp("real")
    backbone_dir = save_tiny_backbone("bert", root / "backbone")
    info = load_backbone(backbone_dir, device="cpu", dtype="float32").info
    store = root / "store"
    g = torch.Generator().manual_seed(0)
    for name, kind in (("sentiment", "single"), ("nli", "pair")):
        weights = {"lora": random_lora(info, g), "head": random_head(info, g, labels=3)}
        publish(store, name, weights, ["a", "b", "c"], input_kind=kind, fingerprint=info.fingerprint)
    (store / "broken" / "v1").mkdir(parents=True)
    (store / "broken" / "v1" / "adapter_config.json").write_text('{"format": "adaptserve/1"}')
    (store / "broken" / "v1" / "adapter_model.safetensors").write_bytes(b"")
    return backbone_dir, store


@pytest.fixture(scope="module")
def client(tiny: tuple[Path, Path]):
    backbone_dir, store = tiny
    app = create_app(Settings(store=store, backbone=backbone_dir, device="cpu", dtype="float32"))  # no engine given
    with TestClient(app) as client:
        wait_ready(client, timeout_s=60)
        yield client


def test_served_predictions_equal_the_engine_alone(client: TestClient, tiny: tuple[Path, Path]) -> None:
    texts = ["great movie", "the plot was boring", "fun"]
    body = client.post("/v1/tasks/sentiment/classify", json={"inputs": texts}).json()

    backbone_dir, store = tiny
    engine = Engine(load_backbone(backbone_dir, device="cpu", dtype="float32"))
    version = (store / "sentiment" / "ACTIVE").read_text().strip()
    task = engine.load_task(store / "sentiment" / version, TaskKey("sentiment", version))
    expected = engine.classify([ClassifyItem(task, text) for text in texts])
    assert body["version"] == version
    for served, alone in zip(body["predictions"], expected):
        assert served["label"] == alone.label
        assert served["scores"] == pytest.approx(alone.scores, abs=1e-5)


def test_a_busy_tokenizer_holds_up_long_requests_only(tiny: tuple[Path, Path]) -> None:
    """While the shared tokenizer is busy (a long request being tokenised), short requests are
    tokenised by the event loop on its own copy and answered; a long one waits for it in a worker
    thread, never past its deadline, and never on the forward thread."""
    backbone_dir, store = tiny
    engine = Engine(load_backbone(backbone_dir, device="cpu", dtype="float32"))
    long = "word " * (INLINE_TOKENIZE_CHARS // 5 + 1)
    settings = Settings(store=store, backbone=backbone_dir, device="cpu", dtype="float32", max_chars_per_input=len(long))
    with TestClient(create_app(settings, engine=engine)) as client:
        wait_ready(client, timeout_s=60)
        with engine._tok_lock:
            short = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["good", "bad"]})
            late = client.post("/v1/tasks/sentiment/classify", json={"inputs": [long], "timeout_ms": 300})
        assert short.status_code == 200, short.text
        assert late.status_code == 504 and "tokenised" in late.json()["error"]
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": [long]}).status_code == 200


def test_real_tasks_check_their_input_kind(client: TestClient) -> None:
    assert client.post("/v1/tasks/nli/classify", json={"inputs": [["good", "bad"]]}).status_code == 200
    response = client.post("/v1/tasks/nli/classify", json={"inputs": ["good"]})
    assert response.status_code == 422 and response.json()["error_type"] == "invalid_input"


def test_a_malformed_real_bundle_is_task_unavailable(client: TestClient) -> None:
    response = client.post("/v1/tasks/broken/classify", json={"inputs": ["x"]})
    assert response.status_code == 503 and response.json()["error_type"] == "task_unavailable"
    assert client.get("/v1/tasks/broken").status_code == 503


def test_real_task_info(client: TestClient) -> None:
    client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
    info = client.get("/v1/tasks/sentiment").json()
    assert info["location"] == "device" and info["labels"] == ["a", "b", "c"]
    ready = client.get("/readyz").json()
    assert ready["backbone"]["device"] == "cpu" and ready["backbone"]["fingerprint"].startswith("sha256:")


@pytest.mark.slow
def test_the_bundled_minilm_serves_end_to_end(minilm_engine, tmp_path: Path) -> None:
    assert minilm_engine.backbone.model_id == BUNDLED_MODEL_ID  # what PEFT adapters' base model is compared with
    info = minilm_engine.backbone.info
    g = torch.Generator().manual_seed(1)
    publish(tmp_path, "sentiment", {"lora": random_lora(info, g), "head": random_head(info, g)}, ["neg", "pos"],
            fingerprint=info.fingerprint)
    with TestClient(create_app(Settings(store=tmp_path), engine=minilm_engine)) as client:
        wait_ready(client, timeout_s=60)
        response = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["what a great film", "dull"]})
        assert response.status_code == 200, response.text
        assert [p["label"] in ("neg", "pos") for p in response.json()["predictions"]] == [True, True]
