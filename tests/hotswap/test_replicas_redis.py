"""Two real replicas (`python -m service serve`) sharing one store and a real redis-server:
a change on one is served by the other within a second; both keep serving while Redis is gone
(admin writes get 503); when it returns they resync, including changes they could not have
been told about. A delete on one empties the other's caches, in memory and (over an S3 bucket
on moto_server) on disk."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from service.engine.bundle import content_version
from tests.factories import publish, random_head, random_lora
from tests.hotswap.bundles import files, make_bundle
from tests.hotswap.conftest import ADMIN, AUTH_ADMIN, AUTH_READER, READER
from tests.hotswap.servers import MotoServer, RedisServer, Replica, eventually

FEED_DEADLINE_S = 1.0  # a change must reach the other replica within this
TEMPORARY_PASSWORD = "keeps-replicas-out-while-the-test-edits-redis"


def served_version(replica: Replica) -> str:
    response = httpx.post(f"{replica.url}/v1/tasks/sentiment/classify", json={"inputs": ["great fun"]},
                          headers=AUTH_READER, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def follows(replica: Replica, version: str, timeout_s: float = FEED_DEADLINE_S) -> float:
    """Seconds until `replica` serves `version` (fails past `timeout_s`)."""
    return eventually(lambda: served_version(replica) == version, timeout_s=timeout_s, interval_s=0.01)


@pytest.fixture
def cluster(tmp_path: Path, backbone_dir: Path, info) -> Iterator[tuple[RedisServer, Replica, Replica, str]]:
    import torch

    store = tmp_path / "store"
    g = torch.Generator().manual_seed(0)
    v0 = publish(store, "sentiment", {"lora": random_lora(info, g), "head": random_head(info, g)}, ["neg", "pos"],
                 fingerprint=info.fingerprint)
    redis = RedisServer(tmp_path / "redis").start()
    env = {"ADAPTSERVE_STORE": str(store), **replica_env(backbone_dir, redis)}
    try:
        with replicas(tmp_path, env, env) as (a, b):
            yield redis, a, b, v0
    finally:
        redis.kill()


def replica_env(backbone_dir: Path, redis: RedisServer) -> dict[str, str]:
    return {
        "ADAPTSERVE_BACKBONE": str(backbone_dir), "ADAPTSERVE_DEVICE": "cpu",
        "ADAPTSERVE_DTYPE": "float32", "ADAPTSERVE_REDIS_URL": redis.url, "ADAPTSERVE_REDIS_TIMEOUT_S": "0.5",
        "ADAPTSERVE_REDIS_RECONNECT_MAX_S": "0.3", "ADAPTSERVE_MAX_WAIT_MS": "1",
        "ADAPTSERVE_ADMIN_TOKENS": ADMIN, "ADAPTSERVE_INFERENCE_TOKENS": READER, "ADAPTSERVE_LOG_LEVEL": "debug",
    }


@contextlib.contextmanager
def replicas(tmp_path: Path, env_a: dict[str, str], env_b: dict[str, str]) -> Iterator[tuple[Replica, Replica]]:
    """Replicas A and B, ready and connected to Redis; stopped after, their logs checked for tokens."""
    a, b = Replica("a", tmp_path, env_a).start(), Replica("b", tmp_path, env_b).start()
    try:
        for replica in (a, b):
            replica.wait_ready()
            eventually(lambda r=replica: r.registry()["connected"], timeout_s=10)
        yield a, b
    finally:
        for replica in (a, b):
            replica.stop()
        logs = a.logs() + b.logs()
        assert ADMIN not in logs and READER not in logs, "a token reached a replica's log"


def test_two_replicas_follow_each_other_through_redis(cluster, info) -> None:
    redis, a, b, v0 = cluster
    assert served_version(a) == served_version(b) == v0

    # Upload on A -> B serves it within a second.
    bundle = make_bundle(info, seed=11)
    upload = httpx.post(f"{a.url}/v1/tasks/sentiment/versions", files=files(*bundle), headers=AUTH_ADMIN, timeout=10)
    assert upload.status_code == 201, upload.text
    v1 = upload.json()["version"]
    assert v1 == content_version(*bundle)
    follows(b, v1)
    assert served_version(a) == v1

    # Roll back on B -> A follows.
    back = httpx.post(f"{b.url}/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN, timeout=10)
    assert back.status_code == 200 and back.json()["active"] == v0
    follows(a, v0)

    # Redis goes away: both keep serving what they know; admin writes are refused.
    redis.kill()
    for replica in (a, b):
        eventually(lambda r=replica: not r.registry()["connected"], timeout_s=5)
    for _ in range(5):
        assert served_version(a) == served_version(b) == v0
    refused = httpx.post(f"{a.url}/v1/tasks/sentiment/versions/{v1}/activate", headers=AUTH_ADMIN, timeout=10)
    assert refused.status_code == 503 and refused.json()["error_type"] == "registry_unavailable"
    refused_upload = httpx.post(f"{b.url}/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=12)),
                                headers=AUTH_ADMIN, timeout=10)
    assert refused_upload.status_code == 503

    # Redis returns (same port, same data) but still locked, so the replicas stay disconnected
    # while the test changes the registry directly: no feed entry, only a resync can reveal it.
    redis.start(password=TEMPORARY_PASSWORD)
    raw = redis.client(password=TEMPORARY_PASSWORD)
    key = "adaptserve:task:sentiment"
    record = json.loads(raw.get(key))
    assert record["active"] == v0  # the append-only file kept the registry through the kill
    record.update(active=v1, stack=[*record["stack"], v1])
    raw.set(key, json.dumps(record))
    time.sleep(0.5)  # several reconnect attempts, all refused
    assert not b.registry()["connected"] and served_version(b) == v0
    raw.config_set("requirepass", "")  # unlock: the replicas reconnect and resync
    follows(a, v1, timeout_s=5)
    follows(b, v1, timeout_s=5)
    assert a.registry()["connected"] and b.registry()["connected"]

    # Right after, a change through A reaches B through the feed again.
    eventually(lambda: httpx.post(f"{a.url}/v1/tasks/sentiment/versions/{v0}/activate", headers=AUTH_ADMIN,
                                  timeout=5).status_code == 200, timeout_s=5)
    follows(b, v0)
    listed = httpx.get(f"{b.url}/v1/tasks/sentiment/versions", headers=AUTH_READER, timeout=5).json()
    assert listed["active"] == v0 and {v0, v1} <= {row["version"] for row in listed["versions"]}
    assert "registry: Redis is back" in b.logs()


def test_a_bundle_copied_back_right_after_a_task_delete_waits_for_an_upload(cluster, tmp_path: Path, info) -> None:
    """A deletes the task; its files are copied back into the store by hand at once. B does not
    register them by an activation within the tombstone's minute (it cannot tell them from a copy
    the delete is still removing), says so, and keeps no loaded copy of them; an upload does."""
    import shutil

    redis, a, b, v0 = cluster
    task_dir = tmp_path / "store" / "sentiment"
    kept = tmp_path / "kept"
    shutil.copytree(task_dir / v0, kept)
    assert httpx.delete(f"{a.url}/v1/tasks/sentiment", headers=AUTH_ADMIN, timeout=10).status_code == 200
    eventually(lambda: httpx.get(f"{b.url}/v1/tasks/sentiment", headers=AUTH_READER, timeout=5).status_code == 404)
    shutil.copytree(kept, task_dir / v0)

    refused = httpx.post(f"{b.url}/v1/tasks/sentiment/versions/{v0}/activate", headers=AUTH_ADMIN, timeout=10)
    assert refused.status_code == 404 and "deleted less than 60 s ago" in refused.json()["error"], refused.text
    assert "upload the bundle" in refused.json()["error"]
    listed = httpx.get(f"{b.url}/v1/tasks/sentiment/versions", headers=AUTH_READER, timeout=5).json()
    assert [(row["version"], row["location"]) for row in listed["versions"]] == [(v0, "store")]  # not left loaded

    bundle = (kept / "adapter_config.json").read_bytes(), (kept / "adapter_model.safetensors").read_bytes()
    upload = httpx.post(f"{a.url}/v1/tasks/sentiment/versions", files=files(*bundle), headers=AUTH_ADMIN, timeout=10)
    assert upload.status_code == 200 and upload.json()["version"] == v0 and upload.json()["active"], upload.text  # files were there
    follows(b, v0)


def cache_figure(replica: Replica, name: str) -> float:
    """One unlabelled series of the replica's /metrics, e.g. `adaptserve_cache_host_entries`."""
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(f"{name} "))


def test_a_version_deleted_on_one_replica_leaves_the_others_caches(cluster, info) -> None:
    """B served v0, then followed A to v1: v0 waits in B's host tier for a rollback. A deletes v0;
    B drops its copy once it hears the delete (before, it kept it until evicted), and keeps
    serving v1 throughout."""
    redis, a, b, v0 = cluster
    assert served_version(b) == v0  # loaded on B
    upload = httpx.post(f"{a.url}/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=11)),
                        headers=AUTH_ADMIN, timeout=10)
    assert upload.status_code == 201, upload.text
    v1 = upload.json()["version"]
    follows(b, v1)
    assert cache_figure(b, "adaptserve_cache_host_entries") == 1  # v0, demoted by the swap

    assert httpx.delete(f"{a.url}/v1/tasks/sentiment/versions/{v0}", headers=AUTH_ADMIN, timeout=10).status_code == 200
    eventually(lambda: cache_figure(b, "adaptserve_cache_host_entries") == 0, timeout_s=FEED_DEADLINE_S)
    assert cache_figure(b, "adaptserve_cache_host_bytes") == 0
    assert f"version {v0} was deleted; its cached copy is dropped" in b.logs()
    assert served_version(b) == v1


@pytest.fixture
def s3_cluster(tmp_path: Path, backbone_dir: Path) -> Iterator[tuple[Replica, Replica, Path]]:
    """Replicas A and B over one bucket on moto_server and one redis-server, each with its own disk
    cache of S3 bundles (as pods each have theirs): (A, B, B's disk cache)."""
    boto3 = pytest.importorskip("boto3")
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    moto = MotoServer().start()
    redis = RedisServer(tmp_path / "redis").start()
    try:
        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="tasks")
        env = {"ADAPTSERVE_STORE_BACKEND": "s3", "ADAPTSERVE_S3_BUCKET": "tasks", "ADAPTSERVE_S3_ENDPOINT_URL": moto.url,
               **aws, **replica_env(backbone_dir, redis)}
        with replicas(tmp_path, env | {"ADAPTSERVE_S3_CACHE_DIR": str(tmp_path / "s3-cache-a")},
                      env | {"ADAPTSERVE_S3_CACHE_DIR": str(tmp_path / "s3-cache-b")}) as (a, b):
            yield a, b, tmp_path / "s3-cache-b"
    finally:
        redis.kill()
        moto.stop()


def test_a_version_or_task_deleted_on_one_replica_leaves_the_others_s3_disk_cache(s3_cluster, info) -> None:
    """B fetched v0 and v1 from S3 into its own disk cache. A deletes v0: B removes its copy of v0
    once it hears the delete (before, it stayed until the cache's byte budget pushed it out) and
    keeps v1 and serves it. A deletes the task: B removes every copy of it."""
    a, b, b_cache = s3_cluster

    def on_b_disk(*parts: str) -> bool:  # under the cache's per-bucket directory
        return any(b_cache.glob("/".join(("*", *parts))))

    def upload(seed: int) -> str:
        response = httpx.post(f"{a.url}/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=seed)),
                              headers=AUTH_ADMIN, timeout=10)
        assert response.status_code == 201, response.text
        return response.json()["version"]

    v0 = upload(10)
    eventually(lambda: httpx.get(f"{b.url}/v1/tasks/sentiment", headers=AUTH_READER, timeout=5).status_code == 200,
               timeout_s=FEED_DEADLINE_S)
    assert served_version(b) == v0 and on_b_disk("sentiment", v0)
    v1 = upload(11)
    follows(b, v1)
    assert on_b_disk("sentiment", v0) and on_b_disk("sentiment", v1)

    assert httpx.delete(f"{a.url}/v1/tasks/sentiment/versions/{v0}", headers=AUTH_ADMIN, timeout=10).status_code == 200
    eventually(lambda: not on_b_disk("sentiment", v0), timeout_s=FEED_DEADLINE_S)
    assert on_b_disk("sentiment", v1) and served_version(b) == v1

    assert httpx.delete(f"{a.url}/v1/tasks/sentiment", headers=AUTH_ADMIN, timeout=10).status_code == 200
    eventually(lambda: not on_b_disk("sentiment"), timeout_s=FEED_DEADLINE_S)
