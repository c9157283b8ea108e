"""A table of hostile uploads: each gets its 4xx naming its problems, and leaves the store byte for
byte as it was and the task serving the version it served."""
from __future__ import annotations

import gzip
import dataclasses
import io
import pickle
import random
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.app import create_app
from service.engine.bundle import bundle_bytes
from service.engine.spec import BackboneInfo
from service.methods.exits import ExitPolicy
from service.settings import Settings
from tests.hotswap.bundles import CONFIG, WEIGHTS, files, make_bundle, raw_safetensors, tar_gz_bytes, tree_hash, zip_bytes
from tests.engine.test_early_exit import random_exits
from tests.factories import random_head, random_lora
from tests.hotswap.conftest import ADMIN, AUTH_ADMIN, AUTH_READER, READER
from tests.service.api.harness import wait_ready

KiB = 1024
# Small limits, so every cap can be crossed with a few KB.
LIMITS = dict(
    upload_max_weights_bytes=64 * KiB, upload_max_config_bytes=8 * KiB, upload_max_bytes=200 * KiB,
    upload_max_uncompressed_bytes=100 * KiB, upload_max_archive_members=8, upload_max_header_bytes=16 * KiB,
    upload_max_tensors=64, upload_max_compression_ratio=200.0,
)


@dataclass
class Upload:
    task: str = "sentiment"
    files: dict[str, Any] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)


def _torch_save(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tensors(info: BackboneInfo) -> dict[str, torch.Tensor]:
    return st_load(make_bundle(info, seed=9)[1])


def _config(info: BackboneInfo, **changes: Any) -> bytes:
    import json

    base = {"format": "adaptserve/1", "labels": ["neg", "pos"], "input_kind": "single", "max_length": 32,
            "backbone": {"fingerprint": info.fingerprint},
            "methods": {"lora": {"r": 4, "alpha": 8.0, "use_rslora": False}, "head": {"pooling": "cls", "dense": False}}}
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return json.dumps(base).encode()


def _with(info: BackboneInfo, **replace: torch.Tensor) -> bytes:
    tensors = _tensors(info)
    tensors.update({k.replace("__", "."): v for k, v in replace.items()})
    return st_save(tensors)


def _peft(info: BackboneInfo, **config: Any) -> Upload:
    """A PEFT LoRA bundle (one query of the tiny BERT, and its classifier), `config` merged into its config."""
    import json

    module, h = "base_model.model.bert.encoder.layer.0.attention.self.query", info.hidden_size
    tensors = {f"{module}.lora_A.weight": torch.full((2, h), 0.01), f"{module}.lora_B.weight": torch.full((h, 2), 0.01),
               "base_model.model.classifier.weight": torch.full((2, h), 0.1), "base_model.model.classifier.bias": torch.zeros(2)}
    base = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4, "target_modules": ["query"]}
    return _two(json.dumps(base | config).encode(), st_save(tensors))


def _two(config: bytes, weights: bytes) -> Upload:
    return Upload(files=files(config, weights))


def _archive(filename: str, blob: bytes) -> Upload:
    return Upload(files={"bundle": (filename, blob)})


def _tar_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _pax_bomb() -> bytes:
    """A tar.gz whose first member is an 8 MiB pax header of zeros: tarfile would read it whole."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("pax")
        info.type = tarfile.XHDTYPE
        info.size = 8 * 1024 * KiB
        archive.addfile(info, io.BytesIO(b"\0" * info.size))
    return buffer.getvalue()


def _good(info: BackboneInfo) -> tuple[bytes, bytes]:
    return make_bundle(info, seed=5)


def _overflowing(info: BackboneInfo, exits: bool = False, **config: Any) -> Upload:
    """A head of +-3e38: every tensor is finite, so only a forward shows that the logits overflow."""
    g = torch.Generator().manual_seed(4)
    head = random_head(info, g)
    weights = {"lora": random_lora(info, g), "head": dataclasses.replace(head, out_w=torch.where(head.out_w > 0, 3e38, -3e38))}
    if exits:  # the task's own policy sends every row out at layer 1: only a full-depth row meets the head
        weights["exits"] = dataclasses.replace(random_exits(info, g, 2), policy=ExitPolicy("confidence", 0.0))
    cfg = {"labels": ["neg", "pos"], "input_kind": "single", "max_length": 32, "backbone": {"fingerprint": info.fingerprint}}
    return _two(*bundle_bytes(cfg | config, weights))


# id -> (build(info) -> Upload, expected status, substrings every one of which a problem must contain)
CASES: dict[str, tuple[Callable[[BackboneInfo], Upload], int, list[str]]] = {
    # --- safetensors only, never pickle
    "pickle weights part": (lambda i: Upload(files={CONFIG: (CONFIG, _good(i)[0]), "w": ("adapter_model.bin", _torch_save({"a": torch.ones(2)}))}),
                            422, ["'adapter_model.bin' is a pickle format", f"{WEIGHTS} is missing"]),
    "torch.save under the safetensors name": (lambda i: _two(_good(i)[0], _torch_save(_tensors(i))), 422, ["looks like a pickle"]),
    "raw pickle under the safetensors name": (lambda i: _two(_good(i)[0], pickle.dumps({"x": 1}, protocol=4)), 422, ["looks like a pickle"]),
    # --- the safetensors header, parsed by hand
    "header over the size cap": (lambda i: _two(_good(i)[0], struct.pack("<Q", 20_000) + b"{" + b" " * 19_998 + b"}"), 413,
                                 ["header of 20000 bytes exceeds the limit of 16384"]),
    "header longer than the file": (lambda i: _two(_good(i)[0], raw_safetensors({}, b"", header_len=5000)), 422,
                                    ["is not a safetensors file: its first 8 bytes give a header of 5000 bytes, but only"]),
    "random bytes as the weights": (lambda i: _two(_good(i)[0], bytes(random.Random(7).randrange(256) for _ in range(5000))), 422,
                                    ["is not a safetensors file"]),
    "header not JSON": (lambda i: _two(_good(i)[0], struct.pack("<Q", 8) + b"not json"), 422, ["header is not UTF-8 JSON"]),
    "integer dtype": (lambda i: _two(_good(i)[0], st_save({"head.out.weight": torch.ones(2, 32, dtype=torch.int64)})), 422, ["dtype 'I64' is not allowed"]),
    "offsets past the data": (lambda i: _two(_good(i)[0], raw_safetensors({"head.out.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234")), 422, ["fall outside the 4-byte data section"]),
    "overlapping tensors": (lambda i: _two(_good(i)[0], raw_safetensors({
        "head.out.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "head.out.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [4, 12]}}, b"x" * 12)), 422, ["overlaps another tensor"]),
    "bytes hidden between tensors": (lambda i: _two(_good(i)[0], raw_safetensors({
        "head.out.bias": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"x" * 16)), 422, ["8 bytes at offset 0 belong to no tensor"]),
    "shape and byte count disagree": (lambda i: _two(_good(i)[0], raw_safetensors({
        "head.out.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"x" * 8)), 422, ["8 bytes of data for shape [4]"]),
    # a size of over 4300 digits: computing it took seconds, and printing it raised (a 500)
    "shape of 4000-digit dimensions": (lambda i: _two(_good(i)[0], raw_safetensors({
        "head.out.bias": {"dtype": "F32", "shape": [10**4000, 10**4000], "data_offsets": [0, 8]}}, b"x" * 8)), 422,
        ["shape [2 dimensions, the largest 4001 digits long] in F32 is larger than a safetensors file can hold"]),
    # --- the engine's own parse against the backbone
    "tensor shape wrong for the backbone": (lambda i: _two(_good(i)[0], _with(i, lora__0__query__A=torch.zeros(4, 31))), 422, ["'lora.0.query.A' has shape [4, 31], expected [4, 32]"]),
    "more layers than the backbone": (lambda i: _two(_good(i)[0], _with(i, lora__7__query__A=torch.zeros(4, 32), lora__7__query__B=torch.zeros(32, 4))), 422, ["LoRA on layer 7, but the backbone has 2 layers"]),
    "NaN weights and a label count the head lacks": (lambda i: _two(_config(i, labels=["a", "b", "c"]), _with(i, lora__1__value__B=torch.full((32, 4), float("nan")))),
                                                     422, ["'lora.1.value.B' contains NaN or Inf", "head has 2 outputs but 3 labels"]),
    "finite weights that overflow": (lambda i: _overflowing(i), 422, ["task outputs non-finite scores on a probe input: weights overflow"]),
    "finite weights that overflow, pair task": (lambda i: _overflowing(i, input_kind="pair"), 422, ["non-finite scores on a probe input"]),
    "finite weights that overflow behind early exits": (lambda i: _overflowing(i, exits=True), 422, ["non-finite scores on a probe input"]),
    "another backbone's fingerprint": (lambda i: _two(_config(i, backbone={"fingerprint": "sha256:" + "0" * 64}), _good(i)[1]), 422, ["trained on backbone sha256:0000"]),
    "no fingerprint": (lambda i: _two(_config(i, backbone=None), _good(i)[1]), 422, ["no backbone.fingerprint"]),
    "config not JSON": (lambda i: _two(b"{nope", _good(i)[1]), 422, [f"{CONFIG} is not UTF-8 JSON"]),
    "config naming a key twice": (lambda i: _two(b'{"labels": ["a", "b"], ' + _good(i)[0][1:], _good(i)[1]), 422,
                                  [f"{CONFIG} names the key 'labels' twice in one object"]),
    "PEFT config whose adaptserve section is a list": (lambda i: _peft(i, adaptserve=[1, 2]), 422, ["the 'adaptserve' section must be an object"]),
    "PEFT config whose num_virtual_tokens is text": (lambda i: _peft(i, num_virtual_tokens="abc"), 422,
                                                     ["'num_virtual_tokens' must be a non-negative integer, got 'abc'"]),
    "config not an object, weights not safetensors": (lambda i: _two(b"[1, 2]", b"\x01\x02"), 422, ["must hold a JSON object", "too short for a safetensors header"]),
    # --- size caps
    "config over its cap": (lambda i: _two(_good(i)[0] + b" " * 9 * KiB, _good(i)[1]), 413, [f"{CONFIG} is larger than the limit of 8192 bytes"]),
    "weights over their cap": (lambda i: _two(_good(i)[0], st_save({"head.out.weight": torch.zeros(20_000)})), 413, [f"{WEIGHTS} is larger than the limit of 65536 bytes"]),
    "missing weights": (lambda i: Upload(files={CONFIG: (CONFIG, _good(i)[0])}), 422, [f"{WEIGHTS} is missing"]),
    "no files at all": (lambda i: Upload(files={"activate": (None, "true")}), 422, ["no files uploaded"]),
    # --- archives
    "absolute path in a zip": (lambda i: _archive("b.zip", zip_bytes({f"/tmp/{CONFIG}": _good(i)[0], WEIGHTS: _good(i)[1]})), 422, ["is an absolute path"]),
    "dot-dot in a tar": (lambda i: _archive("b.tgz", tar_gz_bytes({f"../{CONFIG}": _good(i)[0], WEIGHTS: _good(i)[1]})), 422, ["contains '..'"]),
    "symlink in a zip": (lambda i: _archive("b.zip", zip_bytes({CONFIG: _good(i)[0]}, symlinks={WEIGHTS: "/etc/passwd"})), 422, ["is a symbolic link"]),
    "symlink, hard link and device in a tar": (lambda i: _archive("b.tar.gz", tar_gz_bytes({CONFIG: _good(i)[0]}, extra=[
        _tar_member(WEIGHTS, tarfile.SYMTYPE, "/etc/passwd"), _tar_member("hard", tarfile.LNKTYPE, CONFIG),
        _tar_member("dev", tarfile.CHRTYPE)])), 422, ["is a symbolic link", "is a hard link", "is a device or FIFO"]),
    "too many members": (lambda i: _archive("b.zip", zip_bytes({f"f{n}.txt": b"x" for n in range(20)})), 413, ["20 members, more than the limit of 8"]),
    "zip bomb": (lambda i: _archive("b.zip", zip_bytes({CONFIG: _good(i)[0], WEIGHTS: b"\0" * (4 * 1024 * KiB)})), 413, ["expands", "declares"]),
    "compression ratio over the cap": (lambda i: _archive("b.zip", zip_bytes({CONFIG: _good(i)[0], WEIGHTS: b"\0" * (60 * KiB)})), 413, ["expands"]),
    "tar.gz bomb": (lambda i: _archive("b.tar.gz", tar_gz_bytes({CONFIG: _good(i)[0], WEIGHTS: b"\0" * (8 * 1024 * KiB)})), 413, ["more than 102400 bytes uncompressed"]),
    "tar.gz bomb in a header": (lambda i: _archive("b.tar.gz", _pax_bomb()), 413, ["decompresses past"]),
    "unexpected member in an archive": (lambda i: _archive("b.zip", zip_bytes({CONFIG: _good(i)[0], WEIGHTS: _good(i)[1], "train.py": b"import os"})), 422, ["unexpected archive member 'train.py'"]),
    "pickle inside an archive": (lambda i: _archive("b.zip", zip_bytes({CONFIG: _good(i)[0], "adapter_model.bin": b"\x80\x04"})), 422, ["is a pickle format", f"{WEIGHTS} is missing"]),
    "corrupt zip": (lambda i: _archive("b.zip", b"PK\x03\x04" + b"\x00" * 64), 422, ["not a readable zip archive"]),
    "single part named .zip that is no archive": (lambda i: _archive("b.zip", b"just some bytes"), 422,
                                                  ["'b.zip' is not a zip or gzip-compressed tar archive"]),
    "single part that is no archive": (lambda i: _archive("b.dat", b"just some bytes"), 422, ["unexpected file part 'b.dat'"]),
    "uncompressed tar": (lambda i: _archive("b.tar", gzip.decompress(tar_gz_bytes({CONFIG: _good(i)[0], WEIGHTS: _good(i)[1]}))),
                         422, ["'b.tar' is an uncompressed tar, which is not accepted: gzip it"]),
}


@dataclass
class Served:
    client: TestClient
    store: Path
    version: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, engine, info) -> Iterator[Served]:
    """One app for the whole table: a refusal must change nothing, so each case starts from the
    same store (and a case that wrongly changed it fails its own before/after comparison)."""
    store = tmp_path_factory.mktemp("hostile") / "store"
    store.mkdir()
    settings = Settings(store=store, admin_tokens=ADMIN, inference_tokens=READER, max_wait_ms=1.0, **LIMITS)
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as client:
        wait_ready(client)
        response = client.post("/v1/tasks/sentiment/versions", files=files(*make_bundle(info, seed=1)), headers=AUTH_ADMIN)
        assert response.status_code == 201, response.text
        yield Served(client, store, response.json()["version"])


def _snapshot(client: TestClient, store: Path) -> tuple[str, Any, str]:
    versions = client.get("/v1/tasks/sentiment/versions", headers=AUTH_READER).json()
    served = client.post("/v1/tasks/sentiment/classify", json={"inputs": ["fun"]}, headers=AUTH_READER).json()["version"]
    return tree_hash(store), versions, served


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_upload_is_refused_and_changes_nothing(served: Served, info, case: str) -> None:
    client, store, v1 = served.client, served.store, served.version
    build, status, expected = CASES[case]
    before = _snapshot(client, store)
    upload = build(info)
    response = client.post(f"/v1/tasks/{upload.task}/versions", files=upload.files or None, data=upload.data or None,
                           headers=AUTH_ADMIN)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == "upload_rejected" and body["problems"]
    for needle in expected:
        assert any(needle in problem for problem in body["problems"]), (needle, body["problems"])
    after = _snapshot(client, store)
    assert after == before and after[2] == v1


@pytest.mark.parametrize("name, data", [("b.zip", b"just some bytes"), ("b.tar", None)])
def test_a_part_named_like_an_archive_that_is_none_is_one_problem(served: Served, info, name: str, data) -> None:
    # Not followed by "adapter_config.json is missing" and "... .safetensors is missing": the
    # bundle is in the part the server could not open (qa-peft: a plain .tar got three problems).
    if data is None:
        data = gzip.decompress(tar_gz_bytes(dict(zip((CONFIG, WEIGHTS), _good(info)))))
    response = served.client.post("/v1/tasks/sentiment/versions", files=_archive(name, data).files, headers=AUTH_ADMIN)
    assert response.status_code == 422 and len(response.json()["problems"]) == 1, response.json()


def test_each_problem_the_engine_finds_is_its_own_entry(served: Served, info) -> None:
    """Problems from the engine's parse (a method's tensors, the labels against the head) are
    listed one per entry, as the upload checks' own are, not joined into one string."""
    upload = CASES["NaN weights and a label count the head lacks"][0](info)
    body = served.client.post(f"/v1/tasks/{upload.task}/versions", files=upload.files, headers=AUTH_ADMIN).json()
    nan = [p for p in body["problems"] if "contains NaN or Inf" in p]
    labels = [p for p in body["problems"] if "head has 2 outputs but 3 labels" in p]
    assert len(nan) == 1 and len(labels) == 1 and nan != labels, body["problems"]
    assert all("; " not in p for p in body["problems"]), body["problems"]


@pytest.mark.parametrize(
    "task, kwargs, status, error_type",
    [
        ("Bad..Name", {}, 422, "invalid_task_name"),
        ("sentiment", {"content": b"x" * (201 * KiB), "headers": {"content-type": "multipart/form-data; boundary=x"}}, 413, "payload_too_large"),
        ("sentiment", {"content": b'{"a": 1}', "headers": {"content-type": "application/json"}}, 415, "unsupported_media_type"),
        ("sentiment", {"content": b"--x\r\nnot multipart", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "bad_request"),
    ],
    ids=["invalid task name", "body over the upload cap", "not multipart", "malformed multipart"],
)
def test_refused_before_the_bundle_is_read(served: Served, info, task: str, kwargs: dict, status: int, error_type: str) -> None:
    client, store = served.client, served.store
    before = _snapshot(client, store)
    if not kwargs:
        kwargs = {"files": files(*make_bundle(info, seed=3))}
    headers = {**AUTH_ADMIN, **kwargs.pop("headers", {})}
    response = client.post(f"/v1/tasks/{task}/versions", headers=headers, **kwargs)
    assert (response.status_code, response.json()["error_type"]) == (status, error_type), response.text
    assert _snapshot(client, store) == before


def test_a_streamed_body_over_the_cap_is_stopped_while_reading(served: Served) -> None:
    client, store = served.client, served.store
    before = _snapshot(client, store)

    def chunks():  # no Content-Length: only the count while reading can stop it
        for _ in range(300):
            yield b"x" * KiB

    response = client.post("/v1/tasks/sentiment/versions", content=chunks(),
                           headers={**AUTH_ADMIN, "content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and response.json()["error_type"] == "payload_too_large"
    assert _snapshot(client, store) == before


def test_an_upload_is_unpacked_and_hashed_off_the_event_loop(make_client, info, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacking an archive and hashing it take about a CPU-second per 500 MB: on the event loop
    every request this replica serves would wait that long (a 150 MB zip stalled /healthz 0.3 s)."""
    import asyncio

    import service.engine.bundle
    import service.hotswap

    on_loop: list[str] = []

    def off_loop(fn):
        def spy(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(fn.__name__)
            except RuntimeError:  # no loop running in this thread: a worker thread
                pass
            return fn(*args, **kwargs)
        return spy

    monkeypatch.setattr(service.hotswap, "assemble", off_loop(service.hotswap.assemble))
    monkeypatch.setattr(service.engine.bundle, "content_version", off_loop(service.engine.bundle.content_version))
    client = make_client()
    config, weights = make_bundle(info, seed=3)
    response = client.post("/v1/tasks/offloop/versions", files={"bundle.zip": ("bundle.zip", zip_bytes(
        {CONFIG: config, WEIGHTS: weights}), "application/zip")}, headers=AUTH_ADMIN)
    assert response.status_code == 201, response.text
    assert on_loop == []
