"""Building and waiting for an app over the fake engine (used by fixtures and tests alike)."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from tests.fakes import FakeEngine

# Small limits so the tests can cross them cheaply.
LIMITS = dict(max_inputs_per_request=4, max_chars_per_input=50, max_body_bytes=4096, max_wait_ms=1.0)


def make_app(store: Path, engine: FakeEngine, **overrides: object) -> FastAPI:
    return create_app(Settings(store=store, **(LIMITS | overrides)), engine=engine)


def wait_ready(client: TestClient, timeout_s: float = 5.0) -> None:
    give_up = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < give_up, "server never got ready"
        time.sleep(0.005)


def server_timing(header: str) -> dict[str, tuple[float, str | None]]:
    """A `Server-Timing` header as {name: (ms, desc or None)}."""
    spans = {}
    for span in header.split(", "):
        name, *params = span.split(";")
        fields = dict(param.split("=", 1) for param in params)
        spans[name] = (float(fields["dur"]), fields["desc"].strip('"') if "desc" in fields else None)
    return spans


def admin_actions(metrics_text: str) -> dict[tuple[str, str], float]:
    """`adaptserve_admin_actions_total` of a /metrics answer as {(action, outcome): count}."""
    return {(sample.labels["action"], sample.labels["outcome"]): sample.value
            for family in text_string_to_metric_families(metrics_text) if family.name == "adaptserve_admin_actions"
            for sample in family.samples if sample.name == "adaptserve_admin_actions_total"}
