from __future__ import annotations

from fastapi.testclient import TestClient


def test_list_tasks_shows_active_versions_and_broken_tasks(client: TestClient) -> None:
    client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]})
    tasks = {task["name"]: task for task in client.get("/v1/tasks").json()["tasks"]}
    assert sorted(tasks) == ["ambiguous", "broken", "buggy", "nli", "sentiment"]
    assert tasks["sentiment"] == {"name": "sentiment", "version": "v1", "location": "device", "error": None}
    assert tasks["nli"] == {"name": "nli", "version": "v2", "location": "store", "error": None}
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
