"""Upload, list, activate, roll back and delete task versions over HTTP, on the tiny real engine."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

import pytest
from fastapi.testclient import TestClient

import service.engine.bundle
from service.engine.bundle import content_version
from service.engine.types import TaskKey
from tests.hotswap.bundles import CONFIG, WEIGHTS, files, make_bundle, tar_gz_bytes, zip_bytes
from tests.hotswap.conftest import AUTH_ADMIN, AUTH_READER
from tests.service.api.harness import admin_actions

VERSIONS = "/v1/tasks/{}/versions"


def classify_version(client: TestClient, task: str = "sentiment") -> str:
    response = client.post(f"/v1/tasks/{task}/classify", json={"inputs": ["great fun", "boring"]}, headers=AUTH_READER)
    assert response.status_code == 200, response.text
    versions = {p["version"] for p in response.json()["predictions"]}
    assert versions == {response.json()["version"]}  # every row of a request on one version
    return response.json()["version"]


def upload(client: TestClient, task: str, bundle: tuple[bytes, bytes], **params: object):
    return client.post(VERSIONS.format(task), files=files(*bundle), params=params, headers=AUTH_ADMIN)


def test_upload_activates_and_serves_the_content_hash_version(make_client, info, store: Path) -> None:
    client = make_client()
    bundle = make_bundle(info, seed=1)
    response = upload(client, "sentiment", bundle)
    assert response.status_code == 201, response.text
    body = response.json()
    version = content_version(*bundle)
    assert body == {"task": "sentiment", "version": version, "active": True, "created": True, "source": "files", "kind": "native",
                    "warnings": []}
    assert (store / "sentiment" / version / WEIGHTS).read_bytes() == bundle[1]  # stored byte for byte
    assert (store / "sentiment" / "ACTIVE").read_text().strip() == version
    assert classify_version(client) == version
    again = upload(client, "sentiment", bundle)
    assert again.status_code == 200 and again.json()["created"] is False and again.json()["version"] == version


def test_activate_rollback_and_history(make_client, info) -> None:
    client = make_client()
    v1 = upload(client, "sentiment", make_bundle(info, seed=1)).json()["version"]
    v2 = upload(client, "sentiment", make_bundle(info, seed=2), activate="false").json()["version"]
    assert classify_version(client) == v1  # uploaded, not active
    listed = client.get(VERSIONS.format("sentiment"), headers=AUTH_READER).json()
    assert {row["version"]: row["active"] for row in listed["versions"]} == {v1: True, v2: False}

    state = client.post(f"{VERSIONS.format('sentiment')}/{v2}/activate", headers=AUTH_ADMIN).json()
    assert (state["active"], state["rollback_to"]) == (v2, v1)
    assert classify_version(client) == v2
    back = client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN)
    assert back.status_code == 200 and back.json()["active"] == v1
    assert classify_version(client) == v1
    nothing = client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN)
    assert nothing.status_code == 409 and nothing.json()["error_type"] == "conflict"
    actions = [entry["action"] for entry in client.get(VERSIONS.format("sentiment"), headers=AUTH_READER).json()["history"]]
    assert actions == ["upload", "activate", "upload", "activate", "rollback"]


def test_rollback_goes_back_through_the_activation_stack(make_client, info) -> None:
    client = make_client()
    v = [upload(client, "sentiment", make_bundle(info, seed=s)).json()["version"] for s in (1, 2, 3)]
    assert client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN).json()["active"] == v[1]
    assert client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN).json()["active"] == v[0]
    assert classify_version(client) == v[0]


def test_a_swapped_out_version_waits_in_host_memory(make_client, info) -> None:
    client = make_client()
    v1 = upload(client, "sentiment", make_bundle(info, seed=1)).json()["version"]
    classify_version(client)
    assert client.get("/v1/tasks/sentiment", headers=AUTH_READER).json()["location"] == "device"
    v2 = upload(client, "sentiment", make_bundle(info, seed=2)).json()["version"]
    rows = {r["version"]: r["location"] for r in client.get(VERSIONS.format("sentiment"), headers=AUTH_READER).json()["versions"]}
    assert rows[v2] == "device" and rows[v1] in ("device", "host")  # its copy to host may still be running
    client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN)
    info_after = client.get("/v1/tasks/sentiment", headers=AUTH_READER).json()
    assert (info_after["version"], info_after["location"]) == (v1, "device")


def test_delete_refuses_the_active_version_but_deletes_the_task(make_client, info, store: Path) -> None:
    client = make_client()
    v1 = upload(client, "sentiment", make_bundle(info, seed=1)).json()["version"]
    v2 = upload(client, "sentiment", make_bundle(info, seed=2)).json()["version"]
    refused = client.delete(f"{VERSIONS.format('sentiment')}/{v2}", headers=AUTH_ADMIN)
    assert refused.status_code == 409 and "active version" in refused.json()["error"]
    assert client.delete(f"{VERSIONS.format('sentiment')}/{v1}", headers=AUTH_ADMIN).status_code == 200
    assert not (store / "sentiment" / v1).exists()
    assert client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN).status_code == 409  # v1 is gone
    missing = client.delete(f"{VERSIONS.format('sentiment')}/{v1}", headers=AUTH_ADMIN)
    assert missing.status_code == 404 and missing.json()["error_type"] == "version_not_found"
    assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}, headers=AUTH_READER).status_code == 200
    assert 'task="sentiment"' in client.get("/metrics").text
    assert client.delete("/v1/tasks/sentiment", headers=AUTH_ADMIN).status_code == 200
    assert not (store / "sentiment").exists()
    assert 'task="sentiment"' not in client.get("/metrics").text  # its series went with it
    gone = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}, headers=AUTH_READER)
    assert gone.status_code == 404
    assert client.delete("/v1/tasks/sentiment", headers=AUTH_ADMIN).status_code == 404


def test_admin_requests_are_counted_once_by_action_and_outcome(make_client, info) -> None:
    """Whatever answered: the route, the token check, the body's media type, a bad task name. No
    task name or version becomes a label."""
    client = make_client()
    sentiment = VERSIONS.format("sentiment")
    bundle = make_bundle(info, seed=1)
    v1 = upload(client, "sentiment", bundle).json()["version"]  # 201
    assert upload(client, "sentiment", bundle).status_code == 200  # the same again: nothing created, still ok
    v2 = upload(client, "sentiment", make_bundle(info, seed=2), activate="false").json()["version"]
    assert client.post(sentiment, files=files(*bundle)).status_code == 401  # no token
    assert client.post(sentiment, files=files(*bundle), headers=AUTH_READER).status_code == 403
    assert client.post(sentiment, content=b"{}", headers={**AUTH_ADMIN, "content-type": "application/json"}).status_code == 415
    assert client.post(f"{sentiment}/{v2}/activate", headers=AUTH_ADMIN).status_code == 200
    assert client.post(f"{sentiment}/nosuchversion/activate", headers=AUTH_ADMIN).status_code == 404
    assert client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN).status_code == 200
    assert client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN).status_code == 409  # nothing to go back to
    assert client.delete(f"{sentiment}/{v1}", headers=AUTH_ADMIN).status_code == 409  # the active one
    assert client.delete(f"{sentiment}/{v2}/", headers=AUTH_ADMIN).status_code == 200  # a trailing slash is the same path
    assert client.delete("/v1/tasks/bad%20name", headers=AUTH_ADMIN).status_code == 422
    assert client.delete("/v1/tasks/sentiment", headers=AUTH_ADMIN).status_code == 200
    assert client.delete("/v1/tasks/sentiment", headers=AUTH_ADMIN).status_code == 404
    assert client.get(sentiment, headers=AUTH_READER).status_code == 404  # a read: not an admin action
    text = client.get("/metrics").text
    assert admin_actions(text) == {
        ("upload", "ok"): 3, ("upload", "denied"): 2, ("upload", "invalid"): 1,
        ("activate", "ok"): 1, ("activate", "not_found"): 1,
        ("rollback", "ok"): 1, ("rollback", "conflict"): 1,
        ("delete_version", "conflict"): 1, ("delete_version", "ok"): 1,
        ("delete_task", "invalid"): 1, ("delete_task", "ok"): 1, ("delete_task", "not_found"): 1,
    }
    assert v1 not in text and "bad name" not in text


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_of_a_bundle_upload_like_the_two_files(make_client, info, kind: str) -> None:
    client = make_client()
    config, weights = make_bundle(info, seed=4)
    members = {f"my-task/{CONFIG}": config, f"my-task/{WEIGHTS}": weights, "my-task/README.md": b"# notes"}
    archive = zip_bytes(members) if kind == "zip" else tar_gz_bytes(members)
    response = client.post(VERSIONS.format("sentiment"), files={"bundle": (f"bundle.{kind}", archive)}, headers=AUTH_ADMIN)
    assert response.status_code == 201, response.text
    assert (response.json()["version"], response.json()["source"]) == (content_version(config, weights), kind)
    assert classify_version(client) == content_version(config, weights)


@pytest.mark.parametrize("plain", [True, False], ids=["writestr-default", "zip-tool-mode"])
def test_zips_whatever_their_writer_stores_as_the_mode(make_client, info, plain: bool) -> None:
    """ZipFile.writestr(name, data) stores permissions without a file type (0o600 << 16): a regular
    file all the same, as the `zip` tool's 0o100644 is."""
    client = make_client()
    config, weights = make_bundle(info, seed=5)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in ((CONFIG, config), (WEIGHTS, weights)):
            if plain:
                archive.writestr(name, data)
            else:
                member = zipfile.ZipInfo(name)
                member.external_attr = 0o100644 << 16
                archive.writestr(member, data)
    response = client.post(VERSIONS.format("sentiment"), files={"bundle": ("b.zip", buffer.getvalue())}, headers=AUTH_ADMIN)
    assert response.status_code == 201, response.text
    assert classify_version(client) == content_version(config, weights)


def test_activate_in_the_form_and_unknown_versions(make_client, info) -> None:
    client = make_client()
    v1 = upload(client, "sentiment", make_bundle(info, seed=1)).json()["version"]
    config, weights = make_bundle(info, seed=2)
    response = client.post(VERSIONS.format("sentiment"), files=files(config, weights), data={"activate": "no"}, headers=AUTH_ADMIN)
    assert response.status_code == 201 and response.json()["active"] is False
    assert classify_version(client) == v1
    unknown = client.post(f"{VERSIONS.format('sentiment')}/0000000000000000/activate", headers=AUTH_ADMIN)
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "version_not_found"
    unsafe = client.post(f"{VERSIONS.format('sentiment')}/..%2Fx/activate", headers=AUTH_ADMIN)
    assert unsafe.status_code == 404


def test_a_stored_version_that_cannot_load_is_never_activated(make_client, info, store: Path) -> None:
    client = make_client()
    v1 = upload(client, "sentiment", make_bundle(info, seed=1)).json()["version"]
    broken = store / "sentiment" / "broken1"
    broken.mkdir()
    (broken / CONFIG).write_text(json.dumps({"format": "adaptserve/1", "labels": ["a", "b"], "methods": {"head": {}}}))
    (broken / WEIGHTS).write_bytes(b"")
    response = client.post(f"{VERSIONS.format('sentiment')}/broken1/activate", headers=AUTH_ADMIN)
    assert response.status_code == 422 and "not activated" in response.json()["error"]
    assert classify_version(client) == v1


def test_a_peft_adapter_directory_uploads_as_an_archive(tmp_path: Path) -> None:
    from service.app import create_app
    from service.settings import Settings
    from tests.peft_fixtures import make_peft_bundle
    from tests.service.api.harness import wait_ready

    base_dir, adapter_dir, _ = make_peft_bundle("lora", tmp_path / "peft", num_labels=2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(adapter_dir, arcname="adapter")  # the directory PEFT's save_pretrained wrote
    (tmp_path / "store").mkdir()
    settings = Settings(store=tmp_path / "store", backbone=base_dir, device="cpu", dtype="float32")
    with TestClient(create_app(settings)) as client:
        wait_ready(client, timeout_s=60)
        response = client.post(VERSIONS.format("peft-task"), files={"file": ("adapter.tar.gz", buffer.getvalue())})
        assert response.status_code == 201, response.text
        assert response.json()["kind"] == "peft"
        served = client.post("/v1/tasks/peft-task/classify", json={"inputs": ["hello"]})
        assert served.status_code == 200 and served.json()["predictions"][0]["label"] in ("LABEL_0", "LABEL_1")


def _flip_a_weights_byte(version_dir: Path) -> None:
    data = bytearray((version_dir / WEIGHTS).read_bytes())
    data[-1] ^= 0x01  # still a valid safetensors file: only the hash can tell
    (version_dir / WEIGHTS).write_bytes(bytes(data))


# id -> (damage to the stored copy, swap by exchange (else two renames), activate on the re-upload)
DAMAGED: dict[str, tuple[Callable[[Path], None], bool, bool]] = {
    "a flipped byte, swapped in one exchange": (_flip_a_weights_byte, True, True),
    "a flipped byte, swapped by two renames": (_flip_a_weights_byte, False, True),
    "the config missing, re-sent without activating": (lambda d: (d / CONFIG).unlink(), True, False),
}


@pytest.mark.parametrize("case", list(DAMAGED), ids=list(DAMAGED))
def test_uploading_a_damaged_version_again_repairs_it(make_client, info, store: Path, monkeypatch: pytest.MonkeyPatch,
                                                       case: str) -> None:
    damage, exchange, activate = DAMAGED[case]
    swaps: list[bool] = []  # each attempt to exchange the new copy with the damaged one, and whether it did
    real_exchange = service.engine.bundle._exchange

    def exchange_or_not(a: Path, b: Path) -> bool:  # without: a filesystem lacking RENAME_EXCHANGE (NFS, some overlays)
        swaps.append(exchange and real_exchange(a, b))
        return swaps[-1]

    monkeypatch.setattr(service.engine.bundle, "_exchange", exchange_or_not)
    client = make_client()
    v1 = upload(client, "sentiment", make_bundle(info, seed=1)).json()["version"]
    bundle = make_bundle(info, seed=2)
    v2 = upload(client, "sentiment", bundle, activate="false").json()["version"]
    damage(store / "sentiment" / v2)
    refused = client.post(f"{VERSIONS.format('sentiment')}/{v2}/activate", headers=AUTH_ADMIN)
    assert refused.status_code == 422 and "not activated" in refused.json()["error"]

    again = upload(client, "sentiment", bundle, activate=str(activate).lower())
    assert again.status_code == 201, again.text
    assert (again.json()["created"], again.json()["active"]) == (True, activate)  # not "identical content already stored"
    assert swaps == [exchange]
    assert (store / "sentiment" / v2 / CONFIG).read_bytes() == bundle[0]
    assert (store / "sentiment" / v2 / WEIGHTS).read_bytes() == bundle[1]
    # Nothing left beside the versions: no temporary directory, no swapped-out copy.
    assert sorted(p.name for p in (store / "sentiment").iterdir()) == sorted([v1, v2, "ACTIVE", "HISTORY.json"])
    if not activate:
        assert client.post(f"{VERSIONS.format('sentiment')}/{v2}/activate", headers=AUTH_ADMIN).status_code == 200
    client.app.state.service.runtime.cache.drop(TaskKey("sentiment", v2))  # served from the store's copy, not a cached one
    assert classify_version(client) == v2


def _parts(config_part: tuple[str, str], weights_part: tuple[str, str]) -> Callable[[bytes, bytes], dict]:
    """httpx `files=` with the config under (field, file name) `config_part`, the weights under `weights_part`."""
    return lambda config, weights: {config_part[0]: (config_part[1], config), weights_part[0]: (weights_part[1], weights)}


@pytest.mark.parametrize(
    "parts",
    [
        _parts((CONFIG, "cfg.json"), (WEIGHTS, "w.st")),  # curl -F "adapter_config.json=@local.json;filename=cfg.json"
        _parts(("config", CONFIG), ("weights", WEIGHTS)),  # clients that name the files, not the fields
        _parts((CONFIG, WEIGHTS), (WEIGHTS, CONFIG)),  # the two disagree: the field name wins
    ],
    ids=["field names, other file names", "file names, other field names", "field and file names disagree"],
)
def test_a_part_is_the_file_its_field_names(make_client, info, parts: Callable[[bytes, bytes], dict]) -> None:
    client = make_client()
    config, weights = make_bundle(info, seed=1)
    response = client.post(VERSIONS.format("sentiment"), files=parts(config, weights), headers=AUTH_ADMIN)
    assert response.status_code == 201, response.text
    assert response.json()["version"] == content_version(config, weights)


@pytest.mark.parametrize("how", [{"params": {"activate": "false"}}, {"data": {"activate": "no"}}], ids=["query", "form"])
def test_the_first_version_of_a_task_cannot_be_held_back(make_client, info, store: Path, how: dict) -> None:
    client = make_client()
    bundle = make_bundle(info, seed=1)
    refused = client.post(VERSIONS.format("sentiment"), files=files(*bundle), headers=AUTH_ADMIN, **how)
    assert (refused.status_code, refused.json()["error_type"]) == (409, "conflict"), refused.text
    assert "task 'sentiment' has no version yet" in refused.json()["error"]
    assert "upload it without activate=false" in refused.json()["error"]
    assert not (store / "sentiment").exists()  # nothing stored
    assert client.get("/v1/tasks/sentiment", headers=AUTH_READER).status_code == 404
    assert upload(client, "sentiment", bundle).json()["active"] is True  # as the message says


def test_sending_the_active_version_again_changes_nothing(make_client, info, store: Path) -> None:
    client = make_client()
    bundle = make_bundle(info, seed=1)
    version = upload(client, "sentiment", bundle).json()["version"]
    before = client.get(VERSIONS.format("sentiment"), headers=AUTH_READER).json()
    assert [(h["action"], h["version"], h["from"]) for h in before["history"]] == [("upload", version, None),
                                                                                    ("activate", version, None)]
    history_file = (store / "sentiment" / "HISTORY.json").read_bytes()

    again = upload(client, "sentiment", bundle)
    assert again.status_code == 200 and (again.json()["created"], again.json()["active"]) == (False, True)
    same = client.post(f"{VERSIONS.format('sentiment')}/{version}/activate", headers=AUTH_ADMIN)
    assert same.status_code == 200 and same.json()["history"] == before["history"]
    assert client.get(VERSIONS.format("sentiment"), headers=AUTH_READER).json() == before  # uploaded_at too
    assert (store / "sentiment" / "HISTORY.json").read_bytes() == history_file


def test_activating_a_version_of_an_unknown_task_is_task_not_found(make_client, info) -> None:
    client = make_client()
    version = content_version(*make_bundle(info, seed=1))
    response = client.post(f"{VERSIONS.format('nope')}/{version}/activate", headers=AUTH_ADMIN)
    assert (response.status_code, response.json()["error_type"]) == (404, "task_not_found"), response.text


def test_an_upload_too_large_for_the_whole_cache_is_refused_before_it_is_stored(make_client, info, store: Path) -> None:
    """Before: the version was stored (its task's only one, so it served), the registry not told,
    and the uploader answered 503."""
    client = make_client(cache_max_bytes=1000)
    refused = upload(client, "big", make_bundle(info, seed=1))
    assert (refused.status_code, refused.json()["error_type"]) == (413, "upload_rejected"), refused.text
    assert "more than the whole task cache (1000 bytes)" in refused.json()["problems"][0]
    assert "ADAPTSERVE_CACHE_MAX_BYTES" in refused.json()["problems"][0]
    assert not (store / "big").exists()
