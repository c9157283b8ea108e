"""Fixtures of the API tests: a small store, a fake engine, and a running app over both.

Store: `sentiment` (single texts, one version), `nli` (pairs, ACTIVE=v2 of two), `broken`
(adapter_config.json is not JSON), `ambiguous` (two versions, no ACTIVE), `buggy` (the engine
raises a plain ValueError while loading it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.fakes import FakeEngine, write_task
from tests.service.api.harness import make_app, wait_ready


@pytest.fixture
def store(tmp_path: Path) -> Path:
    write_task(tmp_path, "sentiment", "v1", labels=["neg", "pos"])
    write_task(tmp_path, "nli", "v1", labels=["entail", "neutral", "contradict"], input_kind="pair")
    write_task(tmp_path, "nli", "v2", labels=["entail", "neutral", "contradict"], input_kind="pair", active=True)
    write_task(tmp_path, "broken", "v1", config_text="{not json")
    write_task(tmp_path, "ambiguous", "v1")
    write_task(tmp_path, "ambiguous", "v2")
    write_task(tmp_path, "buggy", "v1", config_text='{"bug": true}')
    return tmp_path


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(store: Path, engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(make_app(store, engine), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client
