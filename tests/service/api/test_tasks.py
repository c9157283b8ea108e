from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.fakes import write_task
from tests.hotswap.bundles import files, raw_safetensors


def test_list_tasks_shows_active_versions_and_broken_tasks(client: TestClient) -> None:
    client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
    tasks = {task["name"]: task for task in client.get("/v1/tasks").json()["tasks"]}
    assert sorted(tasks) == ["ambiguous", "broken", "buggy", "nli", "sentiment"]
    assert tasks["sentiment"] == {"name": "sentiment", "version": "v1", "location": "device", "error": None,
                                 "problem": None}
    assert tasks["nli"] == {"name": "nli", "version": "v2", "location": "store", "error": None, "problem": None}
    assert tasks["ambiguous"]["version"] is None and "ACTIVE" in tasks["ambiguous"]["error"]


def test_task_info_of_a_task_not_yet_resident_does_not_cache_it(client: TestClient) -> None:
    info = client.get("/v1/tasks/nli").json()
    assert info["name"] == "nli" and info["version"] == "v2" and info["location"] == "store"
    assert info["method"] == "fake" and info["labels"] == ["entail", "neutral", "contradict"]
    assert client.get("/v1/tasks/nli").json()["location"] == "store"


def test_task_info_of_a_resident_task(client: TestClient) -> None:
    client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
    info = client.get("/v1/tasks/sentiment").json()
    assert (info["location"], info["version"], info["trainable_params"]) == ("device", "v1", 10)


def _upload(client: TestClient, task: str) -> str:
    config = json.dumps({"labels": ["neg", "pos"], "backbone": {"fingerprint": "sha256:fake"}}).encode()
    weights = raw_safetensors({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    response = client.post(f"/v1/tasks/{task}/versions", files=files(config, weights))
    assert response.status_code == 201, response.text
    return response.json()["version"]


def _problems(client: TestClient, task: str) -> tuple[str | None, dict[str, str | None]]:
    """(the task listing's problem for `task`, {version: problem} of its versions listing)."""
    listed = {row["name"]: row for row in client.get("/v1/tasks").json()["tasks"]}[task]
    return listed["problem"], {row["version"]: row["problem"] for row in client.get(f"/v1/tasks/{task}/versions").json()["versions"]}


def _damage_missing(bundle: Path) -> str:
    (bundle / "adapter_model.safetensors").unlink()
    return "adapter_model.safetensors missing from local:"


def _damage_size(bundle: Path) -> str:
    (bundle / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    return "bytes, not the"


@pytest.mark.parametrize("damage", [_damage_missing, _damage_size], ids=["a file missing", "a file of another size"])
def test_the_versions_listing_shows_a_version_damaged_on_disk_before_any_request(client: TestClient, store: Path, damage) -> None:
    version = _upload(client, "fresh")
    assert _problems(client, "fresh") == (None, {version: None})
    fragment = damage(store / "fresh" / version)
    task_problem, version_problems = _problems(client, "fresh")
    assert fragment in version_problems[version] and "upload the bundle again" in version_problems[version]
    # The all-task listing reads nothing per task (on S3 that would be a LIST each): it shows a
    # failed load only (the next test), and the copy the upload loaded still serves.
    assert task_problem is None
    assert client.post("/v1/tasks/fresh/classify", json={"inputs": ["x"]}).status_code == 200
    assert client.get("/v1/tasks/fresh/versions").json()["versions"][0]["bytes"] > 0  # the uploaded size, still


def test_listings_show_the_last_failed_load_without_reading_the_store(client: TestClient, store: Path, engine) -> None:
    assert _problems(client, "broken") == (None, {"v1": None})  # no size recorded, both files there: nothing known yet
    assert client.post("/v1/tasks/broken/classify", json={"inputs": ["x"]}).status_code == 503
    loads = len(engine.loads)
    task_problem, version_problems = _problems(client, "broken")
    assert task_problem.startswith("its last load failed: task broken@v1 cannot be loaded: cannot read adapter_config.json")
    assert version_problems == {"v1": task_problem}
    assert len(engine.loads) == loads  # a listing reads no bundle
    write_task(store, "broken", "v1")  # repaired on disk: a load that succeeds clears it (activating reads afresh)
    assert client.post("/v1/tasks/broken/versions/v1/activate").status_code == 200
    assert _problems(client, "broken") == (None, {"v1": None})


def test_the_versions_listing_says_why_a_task_has_no_active_version(client: TestClient) -> None:
    # (A dangling ACTIVE, on either registry: tests/hotswap/test_registry.py.)
    listed = {row["name"]: row for row in client.get("/v1/tasks").json()["tasks"]}["ambiguous"]
    versions = client.get("/v1/tasks/ambiguous/versions").json()
    assert versions["active"] is None and [row["version"] for row in versions["versions"]] == ["v1", "v2"]
    assert versions["error"] == listed["error"] and "ACTIVE" in versions["error"]
    assert client.get("/v1/tasks/nli/versions").json()["error"] is None
