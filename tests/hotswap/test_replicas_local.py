"""Two real replicas (`python -m service serve`) sharing one local store without Redis: the setup
docs/hotswap.md allows (one replica writes, the others read the store). A task deleted through one
leaves the other's caches and metric series, whether or not a request for it comes."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.factories import publish, random_head, random_lora
from tests.hotswap.conftest import ADMIN, AUTH_ADMIN, READER
from tests.hotswap.servers import Replica, eventually
from tests.hotswap.test_replicas_redis import cache_figure, replicas, served_version

RESYNC_S = 0.2  # ADAPTSERVE_REGISTRY_RESYNC_S of the reading replica: how soon it notices, unasked


@pytest.fixture
def local_cluster(tmp_path: Path, backbone_dir: Path, info) -> Iterator[tuple[Replica, Replica]]:
    import torch

    store = tmp_path / "store"
    g = torch.Generator().manual_seed(0)
    publish(store, "sentiment", {"lora": random_lora(info, g), "head": random_head(info, g)}, ["neg", "pos"],
            fingerprint=info.fingerprint)
    env = {"ADAPTSERVE_STORE": str(store), "ADAPTSERVE_BACKBONE": str(backbone_dir), "ADAPTSERVE_DEVICE": "cpu",
           "ADAPTSERVE_DTYPE": "float32", "ADAPTSERVE_MAX_WAIT_MS": "1", "ADAPTSERVE_ADMIN_TOKENS": ADMIN,
           "ADAPTSERVE_INFERENCE_TOKENS": READER, "ADAPTSERVE_REGISTRY_RESYNC_S": str(RESYNC_S)}
    with replicas(tmp_path, env, env) as (a, b):
        yield a, b


def series(replica: Replica, task: str) -> list[str]:
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    return [line for line in text.splitlines() if f'task="{task}"' in line]


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
