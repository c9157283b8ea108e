"""Faults on a tiny real engine: a store that cannot be read or a bundle corrupted on disk after it
was published fails that task alone (503 task_unavailable naming the problem) while the others keep
serving; a forward that raises fails the requests of that batch alone."""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from service.app import create_app
from service.engine.backbone import load_backbone
from service.engine.engine import Engine
from service.engine.types import TaskKey
from service.errors import TaskUnavailable
from service.methods.lora import LoraWeights
from service.settings import Settings
from service.store import LocalStore, verify_bundle
from tests.aio import async_test, wait_until
from tests.factories import publish, random_head, random_lora, save_tiny_backbone
from tests.service.api.harness import wait_ready

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(load_backbone(save_tiny_backbone("bert", tmp_path_factory.mktemp("faults") / "backbone"),
                                device="cpu", dtype="float32"))


@pytest.fixture
def store(tmp_path: Path, engine: Engine) -> Path:
    """Two healthy tasks, `victim` and `healthy`, each one LoRA + head version."""
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    for name in ("victim", "healthy"):
        publish(tmp_path, name, {"lora": random_lora(info, g), "head": random_head(info, g)}, ["neg", "pos"],
                fingerprint=info.fingerprint)
    return tmp_path


def _active(store: Path, task: str) -> Path:
    return store / task / (store / task / "ACTIVE").read_text().strip()


def _with_a_second_version(store: Path, engine: Engine, seed: int) -> tuple[str, str]:
    """(the victim's active version, a new version of it published beside; the task's pointer
    then names the new one)."""
    info = engine.backbone.info
    g = torch.Generator().manual_seed(seed)
    old = _active(store, "victim").name
    new = publish(store, "victim", {"lora": random_lora(info, g), "head": random_head(info, g)}, ["neg", "pos"],
                  fingerprint=info.fingerprint)
    return old, new


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # still a valid safetensors file: only the hash can tell
    path.write_bytes(bytes(data))


def _eio_on(monkeypatch: pytest.MonkeyPatch, method: str, victim: Callable[[Path], bool]) -> None:
    original = getattr(Path, method)

    def failing(self: Path, *args, **kwargs):
        if victim(self):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, failing)


def _peft_copied_in(store: Path, **config) -> None:
    """A PEFT-format LoRA bundle copied into the store by hand and made victim's active version
    (a human version id: there is no hash to check, the engine's parse is all there is)."""
    bundle = store / "victim" / "peft1"
    bundle.mkdir()
    module, h = "base_model.model.bert.encoder.layer.0.attention.self.query", 32  # the tiny BERT's hidden size
    save_file({f"{module}.lora_A.weight": torch.zeros(2, h), f"{module}.lora_B.weight": torch.zeros(h, 2),
               "base_model.model.classifier.weight": torch.zeros(2, h), "base_model.model.classifier.bias": torch.zeros(2)},
              str(bundle / WEIGHTS))
    (bundle / CONFIG).write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4,
                                             "target_modules": ["query"], **config}))
    (store / "victim" / "ACTIVE").write_text("peft1\n")


# id -> (damage(store, monkeypatch), fragment of the 503's message)
FAULTS: dict[str, tuple[Callable[[Path, pytest.MonkeyPatch], None], str]] = {
    "a flipped bit in the weights": (lambda s, m: _flip_last_byte(_active(s, "victim") / WEIGHTS), "is corrupt: its files hash to"),
    "truncated weights": (lambda s, m: (_active(s, "victim") / WEIGHTS).write_bytes((_active(s, "victim") / WEIGHTS).read_bytes()[:-100]),
                          "is corrupt"),
    "an edited config": (lambda s, m: (_active(s, "victim") / CONFIG).write_text((_active(s, "victim") / CONFIG).read_text().replace("neg", "NEG")),
                         "is corrupt"),
    "weights deleted": (lambda s, m: (_active(s, "victim") / WEIGHTS).unlink(),
                        "cannot be read (FileNotFoundError: No such file or directory); upload the bundle again"),
    "I/O error reading the weights": (lambda s, m: _eio_on(m, "read_bytes", lambda p: p.name == WEIGHTS and "victim" in p.parts),
                                      "cannot be read (OSError: Input/output error"),
    "I/O error reading ACTIVE": (lambda s, m: _eio_on(m, "read_text", lambda p: p.name == "ACTIVE" and "victim" in p.parts),
                                 "its ACTIVE file in the store cannot be read (OSError: Input/output error"),
    "I/O error listing the versions": (lambda s, m: _eio_on(m, "iterdir", lambda p: p.name == "victim"),
                                       "its directory in the store cannot be listed"),
    "a PEFT bundle whose adaptserve section is a list": (lambda s, m: _peft_copied_in(s, adaptserve=[1, 2]),
                                                         "the 'adaptserve' section must be an object"),
    "a PEFT bundle whose num_virtual_tokens is text": (lambda s, m: _peft_copied_in(s, num_virtual_tokens="abc"),
                                                       "'num_virtual_tokens' must be a non-negative integer"),
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_a_damaged_store_fails_that_task_alone(store: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                               fault: str) -> None:
    damage, fragment = FAULTS[fault]
    if fault == "I/O error listing the versions":  # only reached without an ACTIVE pointer
        (store / "victim" / "ACTIVE").unlink()
    damage(store, monkeypatch)
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0), engine=engine), raise_server_exceptions=False) as client:
        wait_ready(client)
        response = client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]})
        assert response.status_code == 503, response.text
        assert response.json()["error_type"] == "task_unavailable" and fragment in response.json()["error"]
        assert "victim" in response.json()["error"]
        described = client.get("/v1/tasks/victim")
        assert (described.status_code, described.json()["error_type"]) == (503, "task_unavailable"), described.text
        assert fragment in described.json()["error"]
        healthy = client.post("/v1/tasks/healthy/classify", json={"inputs": ["fun"]})
        assert healthy.status_code == 200, healthy.text
        listing = client.get("/v1/tasks").json()["tasks"]  # the listing names the broken task, never 500s
        assert {row["name"] for row in listing} == {"victim", "healthy"}


def _metric(client: TestClient, name: str) -> float:
    line, = (line for line in client.get("/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_a_repaired_bundle_serves_again_without_a_restart(store: Path, engine: Engine) -> None:
    """The failed load is remembered for ADAPTSERVE_FAILED_LOAD_RETRY_S (its requests get the 503
    without a store read), then the store is read again."""
    weights = _active(store, "victim") / WEIGHTS
    original = weights.read_bytes()
    _flip_last_byte(weights)
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0, failed_load_retry_s=0.5), engine=engine)) as client:
        wait_ready(client)
        for _ in range(5):
            refused = client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]})
            assert refused.status_code == 503 and "is corrupt" in refused.json()["error"]
            assert refused.headers["Retry-After"] == "1"
        assert _metric(client, "adaptserve_cache_load_failures_total") == 1  # one read and hash, not five
        assert _metric(client, "adaptserve_cache_failures_repeated_total") == 4
        assert _metric(client, "adaptserve_cache_misses_total") == 1  # the other four loaded nothing: not misses
        weights.write_bytes(original)
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).status_code == 503  # remembered
        time.sleep(0.5)
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).status_code == 200


def test_activating_a_repaired_version_reads_its_files_again(store: Path, engine: Engine) -> None:
    """An admin's activation judges the files as they are now, not a load that failed moments ago."""
    old, new = _with_a_second_version(store, engine, seed=7)
    weights = store / "victim" / new / WEIGHTS
    original = weights.read_bytes()
    _flip_last_byte(weights)
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0, failed_load_retry_s=3600), engine=engine)) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).status_code == 503
        weights.write_bytes(original)
        assert client.post(f"/v1/tasks/victim/versions/{old}/activate").status_code == 200
        assert client.post(f"/v1/tasks/victim/versions/{new}/activate").status_code == 200
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).json()["version"] == new


def test_an_upload_that_repairs_a_version_forgets_its_failed_load(store: Path, engine: Engine) -> None:
    """Re-uploading a damaged version's files (even without activating anything) replaces the
    copy on disk: its requests serve at once, not after the remembered failure runs out."""
    bundle = _active(store, "victim")
    config, original = (bundle / CONFIG).read_bytes(), (bundle / WEIGHTS).read_bytes()
    _flip_last_byte(bundle / WEIGHTS)
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0, failed_load_retry_s=3600), engine=engine)) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).status_code == 503
        upload = client.post("/v1/tasks/victim/versions", files={CONFIG: (CONFIG, config), WEIGHTS: (WEIGHTS, original)},
                             data={"activate": "false"})
        assert upload.status_code == 201 and upload.json()["active"], upload.text
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).status_code == 200


def test_the_versions_of_a_task_whose_pointer_names_a_lost_version_say_so(store: Path, engine: Engine) -> None:
    (store / "lost").mkdir()
    (store / "lost" / "ACTIVE").write_text("deadbeefdeadbeef\n")
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0), engine=engine)) as client:
        wait_ready(client)
        for response in (client.post("/v1/tasks/lost/classify", json={"inputs": ["fun"]}), client.get("/v1/tasks/lost/versions")):
            assert response.status_code == 503 and "ACTIVE names version 'deadbeefdeadbeef'" in response.json()["error"]


def test_a_corrupt_version_is_never_activated(store: Path, engine: Engine) -> None:
    old, new = _with_a_second_version(store, engine, seed=5)
    (store / "victim" / "ACTIVE").write_text(old + "\n")
    _flip_last_byte(store / "victim" / new / WEIGHTS)
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0), engine=engine)) as client:
        wait_ready(client)
        refused = client.post(f"/v1/tasks/victim/versions/{new}/activate")
        assert refused.status_code == 422 and "is corrupt" in refused.json()["error"]
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).json()["version"] == old


def test_a_task_directory_with_no_version_yet_is_not_a_task(store: Path, engine: Engine) -> None:
    """What a first upload looks like while its files are written (or after it stopped): 404, as
    for any unknown task, not a 503 telling clients to retry; and not listed."""
    (store / "pending" / ".tmp-upload").mkdir(parents=True)
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0), engine=engine)) as client:
        wait_ready(client)
        for response in (client.post("/v1/tasks/pending/classify", json={"inputs": ["fun"]}), client.get("/v1/tasks/pending"),
                         client.get("/v1/tasks/pending/versions")):
            assert (response.status_code, response.json()["error_type"]) == (404, "task_not_found"), response.text
            assert "no version in the store yet" in response.json()["error"]
        assert "pending" not in {row["name"] for row in client.get("/v1/tasks").json()["tasks"]}


def test_a_version_damaged_on_disk_is_not_activated_from_its_cached_copy(store: Path, engine: Engine) -> None:
    """A version still cached in memory but damaged on disk would serve until the next restart
    or eviction, and fail on every replica that loads it: activation and rollback check the files."""
    old, new = _with_a_second_version(store, engine, seed=6)
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0), engine=engine)) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).json()["version"] == new
        assert client.post(f"/v1/tasks/victim/versions/{old}/activate").status_code == 200  # `new` stays cached
        _flip_last_byte(store / "victim" / new / WEIGHTS)
        for refused in (client.post(f"/v1/tasks/victim/versions/{new}/activate"), client.post("/v1/tasks/victim/rollback")):
            assert refused.status_code == 422 and "is corrupt" in refused.json()["error"], refused.text
        assert client.post("/v1/tasks/victim/classify", json={"inputs": ["fun"]}).json()["version"] == old


def test_publishing_the_same_task_again_repairs_a_corrupt_copy(tmp_path: Path, engine: Engine) -> None:
    """`write_bundle` (what training publishes with) over a version already stored: an intact copy
    is left as it is, a corrupt one is replaced by the new copy."""
    info = engine.backbone.info
    g = torch.Generator().manual_seed(3)
    weights = {"lora": random_lora(info, g), "head": random_head(info, g)}
    version = publish(tmp_path, "t", weights, ["neg", "pos"], fingerprint=info.fingerprint)
    bundle = tmp_path / "t" / version
    original, inode = (bundle / WEIGHTS).read_bytes(), bundle.stat().st_ino
    assert publish(tmp_path, "t", weights, ["neg", "pos"], fingerprint=info.fingerprint) == version
    assert bundle.stat().st_ino == inode  # intact: not rewritten
    _flip_last_byte(bundle / WEIGHTS)
    assert publish(tmp_path, "t", weights, ["neg", "pos"], fingerprint=info.fingerprint) == version
    assert (bundle / WEIGHTS).read_bytes() == original
    verify_bundle(bundle, TaskKey("t", version), "here")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(["ACTIVE", "HISTORY.json", version])  # nothing left aside


def test_only_content_hash_versions_are_checked(tmp_path: Path) -> None:
    bundle = tmp_path / "v1"
    bundle.mkdir()
    (bundle / CONFIG).write_text("{}")
    (bundle / WEIGHTS).write_bytes(b"")
    verify_bundle(bundle, TaskKey("t", "v1"), "here")  # a human id: nothing to check it against
    with pytest.raises(TaskUnavailable, match="is corrupt"):
        verify_bundle(bundle, TaskKey("t", "0123456789abcdef"), "here")
    assert LocalStore(tmp_path).describe().startswith("local:")


# -- a forward that raises -------------------------------------------------------------------------
class _Exploding(dict):
    """LoRA pairs that raise when the forward reads them (as a device error or a bad kernel would)."""

    def _boom(self, *args, **kwargs):
        raise RuntimeError("simulated fault: this task's weights cannot be read")

    __getitem__ = get = items = keys = values = __iter__ = _boom


@dataclasses.dataclass(frozen=True)
class _SabotagedLora(LoraWeights):
    def tensors(self) -> dict:  # what the cache counts: nothing, so only the forward touches pairs
        return {}


def _sabotaged(task):
    """The same task, whose LoRA weights raise inside the forward, alone or batched with others."""
    lora = task.weights["lora"]
    bad = _SabotagedLora(r=lora.r, alpha=lora.alpha, use_rslora=lora.use_rslora, pairs=_Exploding(lora.pairs))
    return dataclasses.replace(task, weights={**task.weights, "lora": bad})


@pytest.fixture
def serving(store: Path, engine: Engine) -> Iterator[Callable[..., object]]:
    def serve(**settings: object):
        app = create_app(Settings(store=store, **settings), engine=engine)
        return app

    yield serve


async def _sabotage(app) -> None:
    state = app.state.service
    await wait_until(lambda: state.ready)
    key = await state.registry.resolve("victim")
    task = await state.runtime.cache.get(key)
    state.runtime.cache.drop(key)
    state.runtime.cache.insert(key, _sabotaged(task))


@async_test
async def test_a_forward_error_fails_only_the_requests_of_its_batch(serving) -> None:
    app = serving(max_batch_size=1, max_wait_ms=0.0)  # every request its own batch
    async with app.router.lifespan_context(app):
        await _sabotage(app)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            responses = await asyncio.gather(*(
                client.post(f"/v1/tasks/{task}/classify", json={"inputs": [f"text {n}"]})
                for n, task in enumerate(["victim", "healthy"] * 4)
            ))
            for n, response in enumerate(responses):
                if n % 2 == 0:
                    assert response.status_code == 500 and response.json()["error_type"] == "inference_failed"
                else:
                    assert response.status_code == 200, response.text
            after = await client.post("/v1/tasks/healthy/classify", json={"inputs": ["the loop survived"]})
            assert after.status_code == 200


@async_test
async def test_rows_sharing_a_batch_with_a_failing_task_fail_with_it(serving) -> None:
    app = serving(max_batch_size=2, max_wait_ms=2000.0)  # only a full batch of 2 goes
    async with app.router.lifespan_context(app):
        await _sabotage(app)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            bad, good = await asyncio.gather(client.post("/v1/tasks/victim/classify", json={"inputs": ["a"]}),
                                             client.post("/v1/tasks/healthy/classify", json={"inputs": ["b"]}))
            assert (bad.status_code, good.status_code) == (500, 500)
            assert good.json()["error_type"] == "inference_failed"
            next_two = await asyncio.gather(*(client.post("/v1/tasks/healthy/classify", json={"inputs": [t]}) for t in "cd"))
            assert [r.status_code for r in next_two] == [200, 200]


@async_test
async def test_a_stored_task_whose_weights_overflow_fails_alone_in_a_shared_batch(store: Path, engine: Engine,
                                                                                   serving) -> None:
    """A stored bundle (never uploaded, so never probed) whose finite weights overflow in arithmetic
    (a head of +-3e38): its request gets 503 task_unavailable naming it, never `"score": null`,
    and the request that shared its batch is answered."""
    head = random_head(engine.backbone.info, torch.Generator().manual_seed(3))
    huge = dataclasses.replace(head, out_w=torch.where(head.out_w > 0, 3e38, -3e38))
    publish(store, "victim", {"head": huge}, ["neg", "pos"], fingerprint=engine.backbone.info.fingerprint)
    app = serving(max_batch_size=2, max_wait_ms=2000.0)  # only a full batch of 2 goes
    async with app.router.lifespan_context(app):
        await wait_until(lambda: app.state.service.ready)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            bad, good = await asyncio.gather(client.post("/v1/tasks/victim/classify", json={"inputs": ["a"]}),
                                             client.post("/v1/tasks/healthy/classify", json={"inputs": ["b"]}))
            assert bad.status_code == 503, bad.text
            assert bad.json()["error_type"] == "task_unavailable"
            assert "'victim'" in bad.json()["error"] and "non-finite scores" in bad.json()["error"]
            assert good.status_code == 200, good.text
            assert all(isinstance(p, float) for p in good.json()["predictions"][0]["scores"].values())
