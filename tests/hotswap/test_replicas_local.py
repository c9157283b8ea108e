"""Two real replicas (`python -m service serve`) sharing one local store without Redis: the setup
docs/hotswap.md allows (one replica writes, the others read the store). A change made through one
reaches the other's caches and metric series as the Redis change feed would bring it: an
activation demotes the old version, a deleted version or task leaves, whether or not a request
for the task comes."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from service.engine.bundle import write_bundle
from tests.factories import publish, random_head, random_lora
from tests.hotswap.bundles import files, make_bundle
from tests.hotswap.conftest import ADMIN, AUTH_ADMIN, AUTH_READER, READER
from tests.hotswap.servers import Replica, eventually
from tests.hotswap.test_replicas_redis import cache_figure, replicas, served_version

RESYNC_S = 0.2  # ADAPTSERVE_REGISTRY_RESYNC_S of the reading replica: how soon it notices, unasked
NEVER_S = 3600.0  # a listing that never comes within a test: only requests notice


@pytest.fixture
def local_cluster(request: pytest.FixtureRequest, tmp_path: Path, backbone_dir: Path,
                  info) -> Iterator[tuple[Replica, Replica]]:
    import torch

    store = tmp_path / "store"
    g = torch.Generator().manual_seed(0)
    publish(store, "sentiment", {"lora": random_lora(info, g), "head": random_head(info, g)}, ["neg", "pos"],
            fingerprint=info.fingerprint)
    env = {"ADAPTSERVE_STORE": str(store), "ADAPTSERVE_BACKBONE": str(backbone_dir), "ADAPTSERVE_DEVICE": "cpu",
           "ADAPTSERVE_DTYPE": "float32", "ADAPTSERVE_MAX_WAIT_MS": "1", "ADAPTSERVE_ADMIN_TOKENS": ADMIN,
           "ADAPTSERVE_INFERENCE_TOKENS": READER,
           "ADAPTSERVE_REGISTRY_RESYNC_S": str(getattr(request, "param", RESYNC_S))}
    with replicas(tmp_path, env, env) as (a, b):
        yield a, b


def series(replica: Replica, task: str) -> list[str]:
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    return [line for line in text.splitlines() if f'task="{task}"' in line]


def tiers(replica: Replica) -> tuple[float, float]:
    """(tasks on the device tier, tasks in the host tier)."""
    return cache_figure(replica, "adaptserve_cache_entries"), cache_figure(replica, "adaptserve_cache_host_entries")


def upload(replica: Replica, info, seed: int) -> str:
    response = httpx.post(f"{replica.url}/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=seed)),
                          headers=AUTH_ADMIN, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["version"]


def test_a_task_deleted_through_another_replica_leaves_this_ones_cache_and_series_unasked(local_cluster) -> None:
    """B served the task (a copy in its cache, a series of its requests); A deletes it. With no
    request for it on B, B drops both within its resync period (before: they stayed until B
    restarted, the copy until evicted)."""
    a, b = local_cluster
    served_version(b)
    assert cache_figure(b, "adaptserve_cache_entries") == 1 and series(b, "sentiment")
    assert httpx.delete(f"{a.url}/v1/tasks/sentiment", headers=AUTH_ADMIN, timeout=10).status_code == 200
    eventually(lambda: cache_figure(b, "adaptserve_cache_entries") == 0, timeout_s=5)
    assert series(b, "sentiment") == []
    assert "task sentiment: active version" in b.logs()


@pytest.mark.parametrize("local_cluster", [NEVER_S], indirect=True)
def test_an_activation_through_another_replica_moves_the_old_version_off_this_ones_device(local_cluster, info) -> None:
    """B serves v0; A activates v1, then rolls back to v0. B's first request after each change
    serves the new version and moves the old one to the host tier, as a change heard on the Redis
    feed does (before: both stayed on the device, the old one until evicted)."""
    a, b = local_cluster
    v0 = served_version(b)
    v1 = upload(a, info, seed=11)
    assert served_version(b) == v1
    assert tiers(b) == (1, 1)  # v1 on the device, v0 in the host tier for a rollback
    assert f"task sentiment: active version {v0} -> {v1}" in b.logs()
    assert httpx.post(f"{a.url}/v1/tasks/sentiment/rollback", headers=AUTH_ADMIN, timeout=10).status_code == 200
    assert served_version(b) == v0
    assert tiers(b) == (1, 1)  # promoted back without a store read; v1 demoted
    assert cache_figure(b, "adaptserve_cache_promotions_total") == 1


def test_an_activation_and_a_version_delete_through_another_replica_reach_this_ones_tiers_unasked(
        local_cluster, info) -> None:
    """B serves v0; A activates v1: with no request on B, B's listing of the store moves v0 to the
    host tier and loads v1. A deletes v0: B drops its copy (before: v0 stayed on B's device, and
    once deleted stayed cached until evicted)."""
    a, b = local_cluster
    v0 = served_version(b)
    v1 = upload(a, info, seed=11)
    eventually(lambda: tiers(b) == (1, 1), timeout_s=5)
    assert f"task sentiment: active version {v0} -> {v1}" in b.logs()
    assert httpx.delete(f"{a.url}/v1/tasks/sentiment/versions/{v0}", headers=AUTH_ADMIN, timeout=10).status_code == 200
    eventually(lambda: tiers(b) == (1, 0), timeout_s=5)
    assert f"version {v0} was deleted; its cached copy is dropped" in b.logs()
    assert served_version(b) == v1


def test_a_task_that_only_answered_503_leaves_the_series_of_both_replicas_when_deleted(local_cluster, info) -> None:
    """A task with two versions and no ACTIVE answers 503 on both replicas (a series each, no
    cache entry). Deleted through A, it leaves A's series at once and B's within B's resync period,
    unasked (before: both stayed until a restart)."""
    import torch

    a, b = local_cluster
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        write_bundle(Path(a.env["ADAPTSERVE_STORE"]), "pending", {"labels": ["neg", "pos"], "max_length": 32},
                     {"lora": random_lora(info, g), "head": random_head(info, g)}, activate=False)
    for replica in (a, b):
        response = httpx.post(f"{replica.url}/v1/tasks/pending/classify", json={"inputs": ["x"]}, headers=AUTH_READER,
                              timeout=5)
        assert response.status_code == 503, response.text
        assert series(replica, "pending")
    assert httpx.delete(f"{a.url}/v1/tasks/pending", headers=AUTH_ADMIN, timeout=10).status_code == 200
    assert series(a, "pending") == []
    eventually(lambda: series(b, "pending") == [], timeout_s=5)
