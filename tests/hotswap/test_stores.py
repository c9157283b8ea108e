"""Both store backends behave alike: a local directory and an S3 bucket on a real S3-compatible
HTTP server (moto_server, started here on a loopback port). The app then runs on the S3 store."""
from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.bundle import content_version
from service.engine.types import TaskKey
from service.errors import ConfigurationError, TaskNotFound, TaskUnavailable
from service.settings import Settings
from service.store import ACTIVE_FILE, BundleStore, LocalStore, TaskListing
from tests.aio import async_test, wait_until
from tests.hotswap.bundles import CONFIG, WEIGHTS, files, make_bundle
from tests.hotswap.conftest import ADMIN, AUTH_ADMIN, AUTH_READER, READER
from tests.hotswap.servers import MotoServer, eventually
from tests.service.api.harness import wait_ready

pytest.importorskip("boto3")

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def bucket(moto: MotoServer, aws_env: None) -> str:
    import boto3

    name = f"tasks-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def s3_settings(moto: MotoServer, bucket: str, tmp_path: Path, **overrides: object) -> Settings:
    return Settings(store_backend="s3", s3_bucket=bucket, s3_endpoint_url=moto.url, s3_prefix="/team-a/",
                    s3_cache_dir=tmp_path / "s3-cache", store_pointer_ttl_s=0.0, **overrides)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BundleStore:
    if request.param == "local":
        (tmp_path / "local").mkdir()
        return LocalStore(tmp_path / "local")
    from service.store_s3 import S3Store

    moto, bucket = request.getfixturevalue("moto"), request.getfixturevalue("bucket")
    return S3Store.from_settings(s3_settings(moto, bucket, tmp_path))


def test_publish_list_resolve_fetch_delete(store: BundleStore, info) -> None:
    (c1, w1), (c2, w2) = make_bundle(info, seed=1), make_bundle(info, seed=2)
    v1, v2 = content_version(c1, w1), content_version(c2, w2)
    assert store.put_version("sentiment", v1, c1, w1) is True
    assert store.put_version("sentiment", v1, c1, w1) is False  # same content, same version
    assert store.resolve("sentiment") == TaskKey("sentiment", v1)  # the only version, no ACTIVE
    store.put_version("sentiment", v2, c2, w2)
    # Adding a second version pinned the first as ACTIVE: the task never becomes ambiguous.
    assert store.read_pointer("sentiment", ACTIVE_FILE).strip() == v1
    assert store.versions("sentiment") == sorted([v1, v2]) and store.has_version("sentiment", v2)
    store.write_pointer("sentiment", ACTIVE_FILE, v2 + "\n")
    assert store.list_tasks() == [TaskListing("sentiment", v2)]
    fetched = store.fetch(TaskKey("sentiment", v2))
    assert (fetched / CONFIG).read_bytes() == c2 and (fetched / WEIGHTS).read_bytes() == w2
    store.delete_version(TaskKey("sentiment", v1))
    assert store.versions("sentiment") == [v2]
    with pytest.raises(TaskUnavailable):
        store.fetch(TaskKey("sentiment", "0123456789abcdef"))
    store.delete_task("sentiment")
    assert not store.has_task("sentiment") and store.task_names() == []
    with pytest.raises(TaskNotFound):
        store.versions("sentiment")


def test_dropping_local_copies_never_touches_the_store_itself(store: BundleStore, tmp_path: Path, info) -> None:
    """What a replica does when it hears that another one deleted a version or a task: its own
    copies go (an S3 store's disk cache; a local store has none), the store's files are the deleting
    replica's business, and names heard from the feed build no path unless they are valid."""
    config, weights = make_bundle(info, seed=1)
    key = TaskKey("sentiment", content_version(config, weights))
    store.put_version(key.name, key.version, config, weights)
    fetched = store.fetch(key)
    outside = (getattr(store, "cache_dir", None) or store.root).parent / "outside"  # where `..` would lead
    outside.mkdir()
    before = sorted(tmp_path.rglob("*"))
    for name, version in (("..", "outside"), ("sentiment", ".."), ("sentiment/..", key.version)):
        store.drop_local_copy(TaskKey(name, version))
    store.drop_local_task("..")
    assert sorted(tmp_path.rglob("*")) == before

    store.drop_local_copy(key)
    assert fetched.is_dir() == isinstance(store, LocalStore)  # a local store's copy is the store's own
    store.fetch(key)
    store.drop_local_task(key.name)
    assert fetched.is_dir() == isinstance(store, LocalStore)
    assert store.versions(key.name) == [key.version]
    assert (store.bundle_dir(key) / WEIGHTS).read_bytes() == weights  # fetched again from the bucket


def _overwrite(store: BundleStore, key: TaskKey, name: str, data: bytes | None) -> None:
    """Damage one stored file of `key` behind the store's back (None: remove it)."""
    if isinstance(store, LocalStore):
        path = store.root / key.name / key.version / name
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        return
    object_key = store._key(key.name, key.version, name)  # type: ignore[attr-defined]
    if data is None:
        store.client.delete_object(Bucket=store.bucket, Key=object_key)  # type: ignore[attr-defined]
    else:
        store.client.put_object(Bucket=store.bucket, Key=object_key, Body=data)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "damage",
    [lambda w: (WEIGHTS, w[:-1] + bytes([w[-1] ^ 1])), lambda w: (WEIGHTS, w[:-100]), lambda w: (CONFIG, None)],
    ids=["a flipped bit", "truncated weights", "config missing"],
)
def test_publishing_a_damaged_version_again_repairs_it(store: BundleStore, info, damage) -> None:
    config, weights = make_bundle(info, seed=1)
    key = TaskKey("sentiment", content_version(config, weights))
    store.put_version(key.name, key.version, config, weights)
    _overwrite(store, key, *damage(weights))
    with pytest.raises(TaskUnavailable):
        store.bundle_dir(key)
    assert store.put_version(key.name, key.version, config, weights) is True  # written again, not "already there"
    repaired = store.bundle_dir(key)
    assert (repaired / CONFIG).read_bytes() == config and (repaired / WEIGHTS).read_bytes() == weights
    assert store.versions(key.name) == [key.version]
    assert store.put_version(key.name, key.version, config, weights) is False  # intact now: a no-op


@pytest.mark.parametrize("gone", [WEIGHTS, CONFIG])
def test_a_version_with_a_file_missing_is_listed_and_names_it(store: BundleStore, info, gone: str) -> None:
    """Both stores list a published version that lost a file (it exists, damaged: an activation
    names what is missing) and say which file when it is fetched."""
    (c1, w1), (c2, w2) = make_bundle(info, seed=1), make_bundle(info, seed=2)
    whole, key = TaskKey("sentiment", content_version(c1, w1)), TaskKey("sentiment", content_version(c2, w2))
    store.put_version(whole.name, whole.version, c1, w1)
    store.put_version(key.name, key.version, c2, w2)
    _overwrite(store, key, gone, None)
    if not isinstance(store, LocalStore) and gone == CONFIG:
        # Weights alone are a publish between its two PUTs until they are older than the grace period.
        assert store.versions(key.name) == [whole.version]
        store.partial_grace_s = 0.0  # type: ignore[attr-defined]
    assert store.versions(key.name) == sorted([whole.version, key.version]) and store.has_version(key.name, key.version)
    assert store.missing_files(key) == [gone] and store.missing_files(whole) == []
    kept = {CONFIG: len(c2), WEIGHTS: len(w2)}
    del kept[gone]  # what a listing sees of it without reading a file (service.store.stored_problem)
    assert store.file_sizes(key.name, [whole.version, key.version, "v9"]) == {
        whole.version: {CONFIG: len(c1), WEIGHTS: len(w1)}, key.version: kept}
    with pytest.raises(TaskUnavailable, match=re.escape(gone)):
        store.bundle_dir(key)
    store.delete_version(key)  # what an admin can do with it, besides uploading it again
    assert store.versions(key.name) == [whole.version]


def test_an_s3_version_that_lost_an_object_is_listed_and_refused_naming_it(moto, bucket: str, tmp_path: Path, engine,
                                                                           info) -> None:
    """Its weights object deleted from the bucket, a version is listed and activating it is 422
    naming the object (not 404 "no such version"), even while this replica's local cache of the
    bucket still holds a copy: every other replica would load it from the bucket."""
    import boto3

    settings = s3_settings(moto, bucket, tmp_path, admin_tokens=ADMIN, inference_tokens=READER, max_wait_ms=1.0)
    with TestClient(create_app(settings, engine=engine)) as client:
        wait_ready(client)
        v1, v2 = (client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=seed)),
                              headers=AUTH_ADMIN).json()["version"] for seed in (1, 2))
        client.app.state.service.store.bundle_dir(TaskKey("sentiment", v1))  # a local copy of it
        boto3.client("s3", endpoint_url=moto.url).delete_object(Bucket=bucket, Key=f"team-a/sentiment/{v1}/{WEIGHTS}")

        listed = client.get("/v1/tasks/sentiment/versions", headers=AUTH_READER).json()
        assert sorted(row["version"] for row in listed["versions"]) == sorted([v1, v2])
        refused = client.post(f"/v1/tasks/sentiment/versions/{v1}/activate", headers=AUTH_ADMIN)
        assert refused.status_code == 422 and refused.json()["error_type"] == "invalid_bundle", refused.text
        assert "not activated" in refused.json()["error"] and f"{WEIGHTS} missing" in refused.json()["error"]
        served = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fun"]}, headers=AUTH_READER)
        assert served.json()["version"] == v2
        assert client.delete(f"/v1/tasks/sentiment/versions/{v1}", headers=AUTH_ADMIN).status_code == 200
        listed = client.get("/v1/tasks/sentiment/versions", headers=AUTH_READER).json()
        assert [row["version"] for row in listed["versions"]] == [v2]


def test_an_s3_object_that_does_not_match_its_content_hash_is_refused(moto, bucket: str, tmp_path: Path, info) -> None:
    import boto3

    from service.store_s3 import S3Store

    store = S3Store.from_settings(s3_settings(moto, bucket, tmp_path))
    config, weights = make_bundle(info, seed=1)
    version = content_version(config, weights)
    store.put_version("sentiment", version, config, weights)
    boto3.client("s3", endpoint_url=moto.url).put_object(Bucket=bucket, Key=f"team-a/sentiment/{version}/{WEIGHTS}", Body=weights[:-4] + b"\0\0\0\0")
    with pytest.raises(TaskUnavailable, match="corrupt"):
        store.fetch(TaskKey("sentiment", version))


def test_a_missing_bucket_is_a_configuration_error(moto, aws_env: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be used"):
        create_app(s3_settings(moto, "no-such-bucket", tmp_path))


def test_an_invalid_bucket_name_names_the_setting_not_botocores_regex(aws_env: None, tmp_path: Path) -> None:
    # botocore refuses the name before sending anything: no S3 server is needed.
    with pytest.raises(ConfigurationError) as caught:
        create_app(Settings(store_backend="s3", s3_bucket="Bad_Bucket!", s3_endpoint_url="http://127.0.0.1:9",
                            s3_cache_dir=tmp_path))
    message = str(caught.value)
    assert "ADAPTSERVE_S3_BUCKET" in message and "'Bad_Bucket!' is not a valid bucket name" in message
    assert "regex" not in message and "arn:" not in message


def test_a_missing_bucket_says_it_does_not_exist_and_names_the_setting(moto, aws_env: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="the bucket 'no-such-bucket' does not exist; create it, or set "
                                                 "ADAPTSERVE_S3_BUCKET"):
        create_app(s3_settings(moto, "no-such-bucket", tmp_path))


def test_an_unreachable_endpoint_or_no_credentials_name_what_to_check(monkeypatch: pytest.MonkeyPatch,
                                                                    aws_env: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="check ADAPTSERVE_S3_ENDPOINT_URL and that the server is up"):
        create_app(Settings(store_backend="s3", s3_bucket="b", s3_endpoint_url="http://127.0.0.1:9", s3_cache_dir=tmp_path))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigurationError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID"):
        create_app(Settings(store_backend="s3", s3_bucket="b", s3_endpoint_url="http://127.0.0.1:9", s3_cache_dir=tmp_path))


def test_credentials_the_server_refuses_say_so(monkeypatch: pytest.MonkeyPatch, aws_env: None, tmp_path: Path) -> None:
    # A moto_server that checks signatures: the keys "testing" belong to no user it knows.
    # (Its root answers 500 without a signature, so readiness is asked of its own API.)
    import shutil
    import subprocess
    import sys

    import httpx

    from tests.hotswap.servers import eventually

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    server = MotoServer()
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    server.process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(server.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: httpx.get(f"{server.url}/moto-api/", timeout=1).status_code == 200, timeout_s=30, interval_s=0.05)
        with pytest.raises(ConfigurationError, match=r"access to the bucket 'tasks' is denied \(403\); check the "
                                                     "credentials \\(AWS_ACCESS_KEY_ID"):
            create_app(s3_settings(server, "tasks", tmp_path))
    finally:
        server.stop()


def test_a_malformed_endpoint_or_an_unwritable_cache_dir_names_the_setting(aws_env: None, tmp_path: Path) -> None:
    # Both fail before any request: no S3 server is needed.
    with pytest.raises(ConfigurationError, match="ADAPTSERVE_S3_ENDPOINT_URL"):
        create_app(Settings(store_backend="s3", s3_bucket="b", s3_endpoint_url="not a url", s3_cache_dir=tmp_path))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigurationError, match="ADAPTSERVE_S3_CACHE_DIR: cannot create"):
        create_app(Settings(store_backend="s3", s3_bucket="b", s3_endpoint_url="http://127.0.0.1:9",
                            s3_cache_dir=tmp_path / "a-file" / "cache"))


def test_the_service_uploads_to_and_serves_from_s3(moto, bucket: str, tmp_path: Path, engine, info) -> None:
    import boto3

    settings = s3_settings(moto, bucket, tmp_path, admin_tokens=ADMIN, inference_tokens=READER, max_wait_ms=1.0)
    with TestClient(create_app(settings, engine=engine)) as client:
        wait_ready(client)
        versions = []
        for seed in (1, 2):
            response = client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=seed)), headers=AUTH_ADMIN)
            assert response.status_code == 201, response.text
            versions.append(response.json()["version"])
        keys = {o["Key"] for o in boto3.client("s3", endpoint_url=moto.url).list_objects_v2(Bucket=bucket)["Contents"]}
        assert {f"team-a/sentiment/{v}/{name}" for v in versions for name in (CONFIG, WEIGHTS)} <= keys
        assert {"team-a/sentiment/ACTIVE", "team-a/sentiment/HISTORY.json"} <= keys

        def served() -> str:
            return client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fun"]}, headers=AUTH_READER).json()["version"]

        assert served() == versions[1]
        assert client.post("/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN).json()["active"] == versions[0]
        assert served() == versions[0]
        listed = client.get("/v1/tasks/sentiment/versions", headers=AUTH_READER).json()
        assert sorted(row["version"] for row in listed["versions"]) == sorted(versions)
        assert client.delete("/v1/tasks/sentiment", headers=AUTH_ADMIN).status_code == 200
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["x"]}, headers=AUTH_READER).status_code == 404


def test_the_s3_cache_keeps_to_its_byte_budget_least_recently_used_first(moto, bucket: str, tmp_path: Path, info) -> None:
    from service.store_s3 import S3Store

    store = S3Store.from_settings(s3_settings(moto, bucket, tmp_path, s3_cache_max_bytes=1 << 20))
    assert store.cache_max_bytes == 1 << 20  # the setting reaches the store
    bundles = [make_bundle(info, seed=k) for k in range(4)]
    keys = []
    for config, weights in bundles:
        keys.append(TaskKey("sentiment", content_version(config, weights)))
        store.put_version("sentiment", keys[-1].version, config, weights)
    one = max(len(c) + len(w) for c, w in bundles)
    store.cache_max_bytes, store.cache_grace_s = int(2.5 * one), 0.0  # room for two copies
    cached = lambda: {k for k in keys if (store.cache_dir / k.name / k.version).is_dir()}  # noqa: E731

    def use(key: TaskKey) -> Path:
        time.sleep(0.02)  # distinct mtimes: the cache's order of use
        return store.bundle_dir(key)

    use(keys[0]), use(keys[1])
    use(keys[0])  # used again: now keys[1] is the least recently used
    use(keys[2])
    assert cached() == {keys[0], keys[2]}
    again = use(keys[1])  # dropped copies are fetched again, whole and checked
    assert (again / CONFIG).read_bytes() == bundles[1][0] and (again / WEIGHTS).read_bytes() == bundles[1][1]
    assert cached() == {keys[2], keys[1]}
    store.cache_grace_s = 3600.0  # everything was used within the grace period: nothing is dropped
    use(keys[3])
    assert cached() == {keys[2], keys[1], keys[3]} and store.trim_cache() == []


def test_a_fetch_a_killed_process_left_half_way_is_removed_when_a_store_starts(moto, bucket: str, tmp_path: Path,
                                                                               info) -> None:
    import os

    from service.store_s3 import STALE_FETCH_S, S3Store

    store = S3Store.from_settings(s3_settings(moto, bucket, tmp_path))
    old, fresh = (store.cache_dir / ".fetch-old", store.cache_dir / ".fetch-fresh")
    for tmp in (old, fresh):
        tmp.mkdir()
        (tmp / CONFIG).write_bytes(b"{}")  # what a fetch killed between its two downloads leaves
    long_ago = time.time() - STALE_FETCH_S - 60
    for path in (old / CONFIG, old):
        os.utime(path, (long_ago, long_ago))
    config, weights = make_bundle(info, seed=0)
    key = TaskKey("sentiment", content_version(config, weights))
    store.put_version("sentiment", key.version, config, weights)
    store.bundle_dir(key)

    S3Store.from_settings(s3_settings(moto, bucket, tmp_path))  # another process starts on the same cache
    assert not old.exists()
    assert (fresh / CONFIG).is_file()  # may be a fetch of a process sharing the cache, still at work
    assert (store.cache_dir / key.name / key.version / WEIGHTS).is_file()  # cached copies stay


def test_a_long_running_store_sweeps_a_killed_fetchs_leftover_but_never_its_own_fetch_in_flight(
        moto, bucket: str, tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process sharing the cache directory is killed mid-fetch after this store started: a later
    fetch here removes its leftover once it is stale (before: only the next store to start did, so
    a replica that ran for weeks kept every one). A fetch of this process still in flight is never
    removed, however old its temp dir looks (a read that trickles)."""
    import os

    from service.store_s3 import STALE_FETCH_S, S3Store

    store = S3Store.from_settings(s3_settings(moto, bucket, tmp_path))
    store.fetch_sweep_every_s = 0.0  # every fetch sweeps (in service: at most every ten minutes)
    keys = []
    for seed in (0, 1):
        config, weights = make_bundle(info, seed=seed)
        keys.append(TaskKey("sentiment", content_version(config, weights)))
        store.put_version("sentiment", keys[-1].version, config, weights)
    long_ago = time.time() - STALE_FETCH_S - 60

    def backdate(tmp: Path) -> None:
        for path in (*tmp.iterdir(), tmp):
            os.utime(path, (long_ago, long_ago))

    killed = store.cache_dir / ".fetch-killed"
    killed.mkdir()
    (killed / CONFIG).write_bytes(b"{}")  # what a fetch killed between its two downloads leaves
    backdate(killed)
    reading, go_on = threading.Event(), threading.Event()
    real = store._get_bytes

    def held(object_key: str) -> bytes | None:
        if object_key.endswith(f"{keys[0].version}/{WEIGHTS}"):  # its config is written: still reading
            reading.set()
            assert go_on.wait(10)
        return real(object_key)

    monkeypatch.setattr(store, "_get_bytes", held)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(store.fetch, keys[0])
        assert reading.wait(10)
        (in_flight,) = [tmp for tmp in store.cache_dir.glob(".fetch-*") if tmp != killed]
        backdate(in_flight)
        store.bundle_dir(keys[1])  # another fetch: it sweeps
        assert not killed.exists()
        assert (in_flight / CONFIG).is_file()
        go_on.set()
        assert (slow.result(10) / WEIGHTS).is_file()  # the slow fetch lands whole
    assert list(store.cache_dir.glob(".fetch-*")) == []


def test_deleting_a_task_never_deletes_another_stores_prefix_or_objects_not_its_own(moto, bucket: str, tmp_path: Path,
                                                                                     info) -> None:
    """A store at the bucket root sees a store at `team-a/` as a prefix `team-a/`, like a task named
    team-a: deleting "task team-a" there is 404 (as its GET is) and leaves team-a's store whole.
    Deleting a real task removes its pointers and versions, not objects someone else put beside them."""
    import boto3
    from service.store_s3 import S3Store

    team = S3Store.from_settings(s3_settings(moto, bucket, tmp_path))  # prefix team-a/
    root = S3Store.from_settings(s3_settings(moto, bucket, tmp_path).model_copy(update={"s3_prefix": ""}))
    config, weights = make_bundle(info, seed=1)
    version = content_version(config, weights)
    team.put_version("sentiment", version, config, weights)
    team.write_pointer("sentiment", ACTIVE_FILE, version + "\n")
    s3 = boto3.client("s3", endpoint_url=moto.url)
    s3.put_object(Bucket=bucket, Key="junk/notes.txt", Body=b"someone's notes")

    def keys() -> set[str]:
        return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}

    before = keys()
    for name in ("team-a", "junk"):
        with pytest.raises(TaskNotFound):
            root.delete_task(name)
    assert keys() == before
    assert team.resolve("sentiment") == TaskKey("sentiment", version)

    root.put_version("sentiment", version, config, weights)
    s3.put_object(Bucket=bucket, Key="sentiment/notes.txt", Body=b"kept")
    root.delete_task("sentiment")
    assert keys() == before | {"sentiment/notes.txt"}


def test_an_s3_version_delete_that_failed_half_way_stays_listed_and_a_retry_finishes_it(
        moto, bucket: str, tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second DELETE of a version fails (S3 answers 500 twice): the client got a 503 and will
    retry, so the version must still be listed (the registry answers 404 for a version it does not
    list) and the retry must leave nothing of it behind."""
    import boto3
    from botocore.exceptions import ClientError
    from service.errors import StoreUnavailable
    from service.store_s3 import S3Store

    store = S3Store.from_settings(s3_settings(moto, bucket, tmp_path))
    config, weights = make_bundle(info, seed=1)
    version = content_version(config, weights)
    store.put_version("sentiment", version, config, weights)
    key = TaskKey("sentiment", version)
    real, calls = store.client.delete_object, []

    def second_fails(**kwargs: object) -> object:
        calls.append(kwargs["Key"])
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "DeleteObject")
        return real(**kwargs)

    monkeypatch.setattr(store.client, "delete_object", second_fails)
    with pytest.raises(StoreUnavailable, match="InternalError"):
        store.delete_version(key)
    assert store.has_version("sentiment", version)
    assert store.missing_files(key) == [WEIGHTS]  # listed as what it is: damaged, naming what is gone
    store.delete_version(key)
    left = boto3.client("s3", endpoint_url=moto.url).list_objects_v2(Bucket=bucket, Prefix=f"team-a/sentiment/{version}/")
    assert left["KeyCount"] == 0


@pytest.mark.parametrize("meanwhile", ["nothing", "another replica publishes the same bundle", "it repairs a damaged copy"])
def test_an_s3_publish_whose_config_put_failed_is_finished_by_a_retry_and_breaks_no_other_copy(
        moto, bucket: str, tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch, meanwhile: str) -> None:
    """A publish's config PUT fails (S3 answers 500 twice) after its weights PUT. Its weights object
    is the one every publish of the same bundle writes (same content, same id, same key): another
    replica may be publishing the same bundle, between its two PUTs when this one fails (a client's
    retry after a timeout), or this publish was repairing a version whose config is still there.
    That version is whole once the other publish ends, or is whole already, and must stay so:
    removing the weights on failure, even only when no config is there yet, would break it. A
    version whose config is missing is not listed (within the grace period); the client's retry
    of the upload finishes it."""
    from botocore.exceptions import ClientError

    from service.errors import StoreUnavailable
    from service.store_s3 import S3Store

    a, b = (S3Store.from_settings(s3_settings(moto, bucket, tmp_path / name)) for name in ("a", "b"))
    config, weights = make_bundle(info, seed=1)
    key = TaskKey("sentiment", content_version(config, weights))
    if meanwhile == "it repairs a damaged copy":
        a.put_version(key.name, key.version, config, weights)
        _overwrite(a, key, WEIGHTS, weights[:-100])
    real_a, real_b = a.client.put_object, b.client.put_object
    b_has_put_weights, a_has_failed = threading.Event(), threading.Event()

    def b_config_after_a_failed(**kwargs: object) -> object:
        if str(kwargs["Key"]).endswith(CONFIG):
            b_has_put_weights.set()
            assert a_has_failed.wait(10)
        return real_b(**kwargs)

    def a_config_fails(**kwargs: object) -> object:
        if str(kwargs["Key"]).endswith(CONFIG):
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "PutObject")
        return real_a(**kwargs)

    monkeypatch.setattr(a.client, "put_object", a_config_fails)
    monkeypatch.setattr(b.client, "put_object", b_config_after_a_failed)
    with ThreadPoolExecutor(1) as pool:
        if meanwhile == "another replica publishes the same bundle":
            b_publishing = pool.submit(b.put_version, key.name, key.version, config, weights)
            assert b_has_put_weights.wait(10)
        with pytest.raises(StoreUnavailable, match="InternalError"):
            a.put_version(key.name, key.version, config, weights)
        a_has_failed.set()
        if meanwhile == "another replica publishes the same bundle":
            assert b_publishing.result(10) is True
    monkeypatch.setattr(a.client, "put_object", real_a)
    if meanwhile == "nothing":
        assert a.versions(key.name) == []  # its weights are there, but it is not a version yet
        assert a.put_version(key.name, key.version, config, weights) is True  # the retry
    assert a.versions(key.name) == [key.version] and a.missing_files(key) == []
    assert (b.bundle_dir(key) / WEIGHTS).read_bytes() == weights


def test_an_s3_task_delete_whose_objects_were_refused_is_an_error_not_a_success(
        moto, bucket: str, tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteObjects answers 200 listing the keys it refused (a bucket policy, an object lock): the
    delete must fail saying so, not report the task deleted while its objects stay."""
    import boto3
    from service.errors import StoreUnavailable
    from service.store_s3 import S3Store

    store = S3Store.from_settings(s3_settings(moto, bucket, tmp_path))
    config, weights = make_bundle(info, seed=1)
    version = content_version(config, weights)
    store.put_version("sentiment", version, config, weights)
    store.write_pointer("sentiment", ACTIVE_FILE, version + "\n")
    locked = f"team-a/sentiment/{version}/{WEIGHTS}"
    real = store.client.delete_objects

    def refuse_locked(**kwargs: dict) -> dict:
        objects = kwargs["Delete"]["Objects"]
        kept = [o for o in objects if o["Key"] != locked]
        answer = real(**{**kwargs, "Delete": {**kwargs["Delete"], "Objects": kept}})
        refused = [{"Key": locked, "Code": "AccessDenied", "Message": "Access Denied"}] if len(kept) < len(objects) else []
        return {**answer, "Errors": answer.get("Errors", []) + refused}

    monkeypatch.setattr(store.client, "delete_objects", refuse_locked)
    with pytest.raises(StoreUnavailable, match=r"refused to delete 1 object\(s\) of task 'sentiment' \(AccessDenied\)"):
        store.delete_task("sentiment")
    s3 = boto3.client("s3", endpoint_url=moto.url)
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == {locked}
    monkeypatch.setattr(store.client, "delete_objects", real)
    store.delete_task("sentiment")  # the retry finishes it
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_a_cached_s3_copy_that_rotted_on_local_disk_is_fetched_again(moto, bucket: str, tmp_path: Path, info) -> None:
    from service.store_s3 import S3Store

    store = S3Store.from_settings(s3_settings(moto, bucket, tmp_path))
    config, weights = make_bundle(info, seed=1)
    version = content_version(config, weights)
    store.put_version("sentiment", version, config, weights)
    cached = store.bundle_dir(TaskKey("sentiment", version))
    (cached / WEIGHTS).write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # local disk trouble
    again = store.bundle_dir(TaskKey("sentiment", version))
    assert (again / WEIGHTS).read_bytes() == weights and (again / CONFIG).read_bytes() == config


@pytest.mark.parametrize("deleted", ["version", "task"])
def test_an_s3_fetch_in_flight_when_a_delete_is_heard_puts_no_copy_back_on_disk(
        moto, bucket: str, tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch, deleted: str) -> None:
    """Replica B has downloaded a version, not yet placed it in its disk cache, when it hears that
    replica A deleted the version (or its task) and empties its cache of it. The download must not
    land there afterwards (it stayed until the cache's byte budget pushed it out): the fetch fails
    saying why, and the same bundle uploaded again is fetched anew."""
    from service.store_s3 import S3Store

    a, b = (S3Store.from_settings(s3_settings(moto, bucket, tmp_path / name)) for name in ("a", "b"))
    config, weights = make_bundle(info, seed=1)
    key = TaskKey("sentiment", content_version(config, weights))
    a.put_version(key.name, key.version, config, weights)
    downloaded, heard = threading.Event(), threading.Event()
    real = b._get_bytes

    def held(object_key: str) -> bytes | None:
        data = real(object_key)
        if object_key.endswith(WEIGHTS):  # both objects read: B is about to place its copy
            downloaded.set()
            assert heard.wait(10)
        return data

    monkeypatch.setattr(b, "_get_bytes", held)
    with ThreadPoolExecutor(1) as pool:
        fetching = pool.submit(b.fetch, key)
        assert downloaded.wait(10)
        if deleted == "version":  # what A does, then what B's feed handler does (HotSwap.on_versions_deleted)
            a.delete_version(key)
            b.drop_local_copy(key)
        else:  # HotSwap.on_change with no new version
            a.delete_task(key.name)
            b.drop_local_task(key.name)
        heard.set()
        with pytest.raises(TaskUnavailable, match=f"task {key} was deleted while this replica fetched it"):
            fetching.result(10)
    # The drop's own removal runs in the background: a copy put back would stay.
    eventually(lambda: [p.relative_to(b.cache_dir) for p in b.cache_dir.rglob("*") if p.is_file()] == [])

    monkeypatch.setattr(b, "_get_bytes", real)
    a.put_version(key.name, key.version, config, weights)  # uploaded again: same content, same id
    assert (b.bundle_dir(key) / WEIGHTS).read_bytes() == weights


def test_a_dropped_copy_leaves_the_cache_at_once_and_its_files_go_in_another_thread(
        moto, bucket: str, tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch) -> None:
    """A drop heard from the feed runs on the event loop (TaskAdmin.on_change), where removing a
    task's cached copies held up every request (0.25 s for 640 MB of bundles). The copies now leave
    their place in one rename, at once, and their files are removed in another thread; the same
    version fetched again right after (uploaded again) is untouched. A dropped copy a killed
    process left goes when a store starts on the cache."""
    import shutil

    from service.store_s3 import S3Store

    store = S3Store.from_settings(s3_settings(moto, bucket, tmp_path))
    keys = []
    for seed in (0, 1):
        config, weights = make_bundle(info, seed=seed)
        keys.append(TaskKey("sentiment", content_version(config, weights)))
        store.put_version("sentiment", keys[-1].version, config, weights)
        store.fetch(keys[-1])
    removed: list[tuple[str, threading.Thread]] = []  # (what, by which thread)
    rmtree = shutil.rmtree

    def watched(path, *args, **kwargs):  # noqa: ANN001, ANN202 - shutil.rmtree's own signature
        removed.append((Path(path).name, threading.current_thread()))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", watched)
    store.drop_local_task("sentiment")
    assert not (store.cache_dir / "sentiment").exists()
    again = store.bundle_dir(keys[0])
    eventually(lambda: list(store.cache_dir.glob(".drop-*")) == [])
    here = [name for name, thread in removed if thread is threading.current_thread()]
    assert all(name.startswith(".fetch-") for name in here), here  # the fetch's own temp dir only
    assert [name for name, _ in removed if name.startswith(".drop-")]
    assert (again / WEIGHTS).is_file()
    monkeypatch.setattr(shutil, "rmtree", rmtree)

    left = store.cache_dir / ".drop-0123456789ab"  # a process killed before it removed a dropped copy
    (left / keys[1].version).mkdir(parents=True)
    (left / keys[1].version / CONFIG).write_bytes(b"{}")
    S3Store.from_settings(s3_settings(moto, bucket, tmp_path))
    assert not left.exists() and (again / WEIGHTS).is_file()


@pytest.mark.parametrize("ttl_s", [0.0, 0.05], ids=["pointer-read-every-request", "pointer-cached"])
@async_test
async def test_a_task_deleted_from_the_bucket_by_another_replica_is_heard_by_the_first_request(
        moto, bucket: str, tmp_path: Path, info, ttl_s: float) -> None:
    """The local registry over S3 (no Redis): the first request for a task another replica deleted
    tells the listeners (its cached copies and metric series go), with the pointer read on every
    request or cached (then the background re-read after the TTL finds it gone)."""
    from service.registry.local import LocalRegistry
    from service.store_s3 import S3Store

    mine, other = (S3Store.from_settings(s3_settings(moto, bucket, tmp_path / name)) for name in ("mine", "other"))
    config, weights = make_bundle(info, seed=0)
    key = TaskKey("sentiment", content_version(config, weights))
    other.put_version(key.name, key.version, config, weights)
    registry = LocalRegistry(mine, pointer_ttl_s=ttl_s)
    heard: list[tuple] = []
    registry.subscribe(lambda *change: heard.append(change))
    assert await registry.resolve("sentiment") == key
    await asyncio.to_thread(other.delete_task, "sentiment")
    await asyncio.sleep(ttl_s)
    with contextlib.suppress(TaskNotFound):
        await registry.resolve("sentiment")  # a cached pointer answers once more, and is read again
    await wait_until(lambda: heard == [("sentiment", key.version, None)])
    with pytest.raises(TaskNotFound):
        await registry.resolve("sentiment")
    assert heard == [("sentiment", key.version, None)]


def test_a_version_another_replica_placed_first_is_already_stored(tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas upload the same bundle at once: both find no copy, both write, the second
    rename meets the first one's directory. Same content, same id: that copy is as good as ours."""
    import os
    import shutil

    from service.engine import bundle

    (tmp_path / "store").mkdir()
    store = LocalStore(tmp_path / "store")
    config, weights = make_bundle(info, seed=1)
    version = content_version(config, weights)

    def the_other_replica_first(new: Path, target: Path):
        shutil.copytree(new, target)  # its identical copy lands between our check and our rename
        os.rename(new, target)  # ENOTEMPTY

    monkeypatch.setattr(bundle, "_into_place", the_other_replica_first)
    assert store.put_version("sentiment", version, config, weights) is False
    assert store.bundle_dir(TaskKey("sentiment", version)).is_dir()
    assert [p.name for p in (tmp_path / "store" / "sentiment").iterdir() if p.name.startswith(".tmp-")] == []


def test_a_local_store_whose_directory_went_away_is_unavailable_not_empty(tmp_path: Path, info) -> None:
    """An unmounted or renamed store directory is a 503 for every store call, never "no such
    task" (a 404, an empty listing, a delete that skips the files) nor a re-created task directory."""
    from service.errors import StoreUnavailable

    (tmp_path / "store").mkdir()
    store = LocalStore(tmp_path / "store")
    config, weights = make_bundle(info, seed=1)
    version = content_version(config, weights)
    store.put_version("sentiment", version, config, weights)
    (tmp_path / "store").rename(tmp_path / "elsewhere")
    calls = {"has_task": lambda: store.has_task("sentiment"), "versions": lambda: store.versions("sentiment"),
             "task_names": store.task_names, "fetch": lambda: store.fetch(TaskKey("sentiment", version)),
             "put_version": lambda: store.put_version("other", version, config, weights)}
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable, match="cannot be read"):
            call()
    assert not (tmp_path / "store").exists()  # put_version made nothing
    (tmp_path / "elsewhere").rename(tmp_path / "store")
    assert store.has_task("sentiment") and not store.has_task("nope")
    with pytest.raises(TaskNotFound):
        store.versions("nope")


def test_a_local_store_directory_this_user_may_not_search_is_unavailable_not_a_500(
        tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES on the store's directory (a volume mounted with another owner, its mode changed): every
    lookup is the store's 503, as for a directory gone, never the bare PermissionError that
    `Path.is_dir` raises for it (a 500, and a raise from `Registry.known`). Refused here by hand:
    the tests may run as root, whom a chmod does not stop."""
    import errno
    import os

    from service.errors import StoreUnavailable

    (tmp_path / "store").mkdir()
    store = LocalStore(tmp_path / "store")
    config, weights = make_bundle(info, seed=1)
    version = content_version(config, weights)
    store.put_version("sentiment", version, config, weights)
    real_stat, root = os.stat, str(store.root)

    def refused(path, *args, **kwargs):
        if str(path).startswith(root):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refused)
    calls = {"has_task": lambda: store.has_task("sentiment"), "resolve": lambda: store.resolve("sentiment"),
             "versions": lambda: store.versions("sentiment"), "fetch": lambda: store.fetch(TaskKey("sentiment", version))}
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable, match="cannot be read.*Permission denied"):
            call()
    monkeypatch.undo()
    assert store.resolve("sentiment") == TaskKey("sentiment", version)


def test_a_full_disk_is_the_store_unavailable_naming_the_bundle(tmp_path: Path, info, monkeypatch: pytest.MonkeyPatch) -> None:
    """503 store_unavailable for an upload the disk cannot take, not a 500."""
    import errno

    from service.engine import bundle
    from service.errors import StoreUnavailable

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "store").mkdir()
    store = LocalStore(tmp_path / "store")
    config, weights = make_bundle(info, seed=1)
    monkeypatch.setattr(bundle.os, "fsync", full)
    with pytest.raises(StoreUnavailable, match=r"cannot store task 'sentiment' .*No space left on device"):
        store.put_version("sentiment", content_version(config, weights), config, weights)


def test_an_s3_outage_is_a_503_with_retry_after_and_the_replica_recovers_without_a_restart(
        tmp_path: Path, aws_env: None, engine, info) -> None:
    """moto_server killed: a task this replica serves keeps serving; reads and admin calls that need
    the bucket get 503 `store_unavailable` with Retry-After (as every other 503 a client should retry),
    and once S3 is back (a fresh, empty server on the same port) the same replica writes again."""
    import boto3

    moto = MotoServer().start()
    name = f"tasks-{uuid.uuid4().hex[:10]}"
    try:
        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=name)
        settings = s3_settings(moto, name, tmp_path, max_wait_ms=1.0)
        with TestClient(create_app(settings, engine=engine)) as client:
            wait_ready(client)
            assert client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=1))).status_code == 201
            assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fun"]}).status_code == 200
            moto.stop()
            assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fun"]}).status_code == 200
            for answer in (client.get("/v1/tasks"),
                           client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=2))),
                           client.post("/v1/tasks/other/classify", json={"inputs": ["x"]})):
                assert answer.status_code == 503, answer.text
                assert answer.json()["error_type"] == "store_unavailable"
                assert answer.headers.get("Retry-After") == "1"
            port = moto.port
            moto = MotoServer()
            moto.port, moto.url = port, f"http://127.0.0.1:{port}"
            moto.start()
            boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=name)
            again = client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=2)))
            assert again.status_code == 201, again.text
            assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fun"]}).json()["version"] == again.json()["version"]
    finally:
        moto.stop()


def test_a_hung_s3_endpoint_does_not_stall_the_tasks_a_replica_serves(tmp_path: Path, aws_env: None, engine, info) -> None:
    """S3 stops answering (SIGSTOP: connections open, no replies). A task this replica serves keeps
    answering at once with the version it last read (the pointer is refreshed in the background),
    and a task it has never read gets 504 within the request's deadline, not after botocore's
    retries (two minutes before)."""
    import os
    import signal

    import boto3

    moto = MotoServer().start()
    try:
        name = f"tasks-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=name)
        settings = s3_settings(moto, name, tmp_path, max_wait_ms=1.0).model_copy(update={"store_pointer_ttl_s": 0.2})
        with TestClient(create_app(settings, engine=engine)) as client:
            wait_ready(client)
            upload = client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=1)))
            assert upload.status_code == 201, upload.text
            assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fun"]}).status_code == 200
            os.kill(moto.process.pid, signal.SIGSTOP)
            try:
                time.sleep(0.3)  # the pointer is stale now
                for _ in range(3):
                    started = time.monotonic()
                    served = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fun"]})
                    assert served.status_code == 200 and served.json()["version"] == upload.json()["version"]
                    assert time.monotonic() - started < 3.0
                started = time.monotonic()
                unseen = client.post("/v1/tasks/other/classify", json={"inputs": ["x"], "timeout_ms": 1000})
                assert unseen.status_code == 504 and "could not be read from the store" in unseen.json()["error"]
                assert time.monotonic() - started < 5.0
            finally:
                os.kill(moto.process.pid, signal.SIGCONT)
    finally:
        moto.stop()
