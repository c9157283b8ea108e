"""Fixtures of the hot-swap tests: one tiny random BERT (saved once per session, so replica
processes can load it too) and an engine over it shared by the in-process apps."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.backbone import load_backbone
from service.engine.engine import Engine
from service.engine.spec import BackboneInfo
from service.settings import Settings
from tests.factories import save_tiny_backbone
from tests.service.api.harness import wait_ready

ADMIN = "admin-token-7f3a9c2e51d04b68"
READER = "inference-token-2b8e6d1f9a0c4e37"
AUTH_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
AUTH_READER = {"Authorization": f"Bearer {READER}"}


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_backbone("bert", tmp_path_factory.mktemp("hotswap") / "backbone")


@pytest.fixture(scope="session")
def engine(backbone_dir: Path) -> Engine:
    return Engine(load_backbone(backbone_dir, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def info(engine: Engine) -> BackboneInfo:
    return engine.backbone.info


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def make_client(store: Path, engine: Engine) -> Iterator[Callable[..., TestClient]]:
    """`make_client(**settings)`: a running app over `store` and the tiny engine, tokens configured."""
    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        settings = dict(store=store, admin_tokens=ADMIN, inference_tokens=READER, max_wait_ms=1.0) | overrides
        client = TestClient(create_app(Settings(**settings), engine=engine), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
