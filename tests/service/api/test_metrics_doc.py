"""docs/metrics.md names every adaptserve_* series a replica exports, and no series it does not."""
from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"
# Exported only by a replica on the Redis registry: tests/hotswap/test_registry.py checks them there.
REDIS_ONLY = {"adaptserve_registry_resyncs_total"}


def exported_series(metrics_text: str) -> set[str]:
    """The adaptserve_* series a /metrics answer declares."""
    return {name for line in metrics_text.splitlines() if line.startswith("# TYPE adaptserve_")
            if not (name := line.split()[2]).endswith("_created")}  # the client library's start times


def documented_series() -> set[str]:
    return set(re.findall(r"`(adaptserve_[a-z_]+)`", DOC.read_text()))


def test_the_metrics_document_lists_every_series(client: TestClient) -> None:
    assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200
    exported = exported_series(client.get("/metrics").text)
    documented = documented_series()
    assert exported - {"adaptserve_exit_layer"} <= documented, f"not in docs/metrics.md: {sorted(exported - documented)}"
    assert documented <= exported | {"adaptserve_exit_layer"} | REDIS_ONLY, \
        f"documented but not exported: {sorted(documented - exported)}"
