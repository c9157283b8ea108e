"""docs/metrics.md names every adaptserve_* series a replica exports, and no series it does not."""
from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


def test_the_metrics_document_lists_every_series(client: TestClient) -> None:
    assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}).status_code == 200
    exported = {name for line in client.get("/metrics").text.splitlines() if line.startswith("# TYPE adaptserve_")
                if not (name := line.split()[2]).endswith("_created")}  # the client library's start times
    documented = set(re.findall(r"`(adaptserve_[a-z_]+)`", DOC.read_text()))
    assert exported - {"adaptserve_exit_layer"} <= documented, f"not in docs/metrics.md: {sorted(exported - documented)}"
    assert documented <= exported | {"adaptserve_exit_layer"}, f"documented but not exported: {sorted(documented - exported)}"
