"""Fuzzing the upload validator with mutated bundles: safetensors headers (byte flips, length
corruptions, JSON mutations, truncations), configs, multipart parts and archives (member names,
sizes, types, bytes).

10,000 seeded mutations go straight to the validator (`assemble`, then the engine's parse of what
it accepts, `load_upload`): each must end in a bundle or in `UploadRejected`, never in any other
exception, and nothing may be written to the store or left in the temporary directory. Then 200 go
through the HTTP endpoint: each is answered 4xx (or 201/200 when a mutation is harmless), never 5xx,
and a refused one leaves the store byte for byte as it was.
"""
from __future__ import annotations

import io
import json
import os
import random
import struct
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.backbone import load_backbone
from service.engine.bundle import content_version
from service.engine.engine import Engine
from service.engine.spec import BackboneInfo
from service.engine.types import TaskKey
from service.errors import UploadRejected
from service.hotswap import load_upload
from service.settings import Settings
from service.upload import Part, UploadLimits, assemble
from tests.factories import save_tiny_backbone
from tests.hotswap.bundles import CONFIG, WEIGHTS, make_bundle, tree_hash
from tests.service.api.harness import wait_ready

SEED = 20260611
DIRECT_CASES = 10_000
HTTP_CASES = 200
KiB = 1024
# Small caps (as in tests/hotswap/test_hostile_uploads.py) so that mutations can cross every one.
LIMITS = dict(
    upload_max_weights_bytes=64 * KiB, upload_max_config_bytes=8 * KiB, upload_max_bytes=200 * KiB,
    upload_max_uncompressed_bytes=100 * KiB, upload_max_archive_members=8, upload_max_header_bytes=16 * KiB,
    upload_max_tensors=64, upload_max_compression_ratio=200.0,
)
HOSTILE_NAMES = [
    "../adapter_config.json", "/etc/passwd", "C:evil", "a\\b", "nul\x00byte", "x/../../y", "./adapter_model.safetensors",
    "dir/dir/adapter_config.json", "adapter_model.bin", "model.pt", "README.md", "", "/", "a" * 300, "ünï/cödé.json",
    CONFIG, WEIGHTS, f"bundle/{CONFIG}", f"bundle/{WEIGHTS}", f"other/{WEIGHTS}",
]
ODD_JSON: list[Any] = [None, True, 0, -1, 1.5, 10**30, "", "x" * 50, [], [1, "a"], {}, {"a": {"b": []}}, float("nan")]


# -- the mutator ----------------------------------------------------------------------------------
class Mutator:
    """Seeded mutations of one valid bundle; `next()` returns (kind, parts)."""

    def __init__(self, config: bytes, weights: bytes, seed: int) -> None:
        self.config, self.weights = config, weights
        self.rng = random.Random(seed)
        (self.header_len,) = struct.unpack("<Q", weights[:8])
        self.header = json.loads(weights[8 : 8 + self.header_len])
        self.data = weights[8 + self.header_len :]
        self.kinds: list[tuple[str, Callable[[], list[Part]], int]] = [
            ("byte flips", self.byte_flips, 14), ("header length", self.header_length, 8),
            ("header JSON", self.header_json, 22), ("truncation", self.truncation, 6),
            ("config", self.config_mutation, 10), ("parts", self.parts_mutation, 6),
            ("zip", self.zip_mutation, 17), ("tar.gz", self.tar_mutation, 17),
        ]

    def next(self) -> tuple[str, list[Part]]:
        kind, build, _ = self.rng.choices(self.kinds, weights=[w for _, _, w in self.kinds])[0]
        return kind, build()

    def two(self, config: bytes | None = None, weights: bytes | None = None) -> list[Part]:
        return [Part(CONFIG, CONFIG, self.config if config is None else config),
                Part(WEIGHTS, WEIGHTS, self.weights if weights is None else weights)]

    # safetensors ---------------------------------------------------------------------------------
    def flip(self, blob: bytes, count: int, within: int | None = None) -> bytes:
        out = bytearray(blob)
        for _ in range(count):
            if not out:
                break
            at = self.rng.randrange(min(len(out), within) if within else len(out))
            out[at] ^= self.rng.randrange(1, 256)
        return bytes(out)

    def byte_flips(self) -> list[Part]:
        in_header = self.rng.random() < 0.6
        weights = self.flip(self.weights, self.rng.randint(1, 8), within=8 + self.header_len if in_header else None)
        return self.two(weights=weights)

    def header_length(self) -> list[Part]:
        n = self.header_len
        value = self.rng.choice([0, 1, 2, n - 1, n + 1, n + self.rng.randint(2, 4096), n * 2, len(self.weights),
                                 len(self.weights) - 8, 16 * KiB, 16 * KiB + 1, 2**32, 2**63, 2**64 - 1,
                                 self.rng.randrange(2**64)])
        return self.two(weights=struct.pack("<Q", max(0, value)) + self.weights[8:])

    def header_json(self) -> list[Part]:
        header = json.loads(json.dumps(self.header))
        names = [k for k in header if k != "__metadata__"]
        name = self.rng.choice(names)
        op = self.rng.randrange(12)
        if op == 0:
            del header[name]
        elif op == 1:
            header[name]["dtype"] = self.rng.choice(["F64", "I8", "U8", "BOOL", "F8_E4M3", "", "f32", None, 4, ["F32"]])
        elif op == 2:
            header[name]["shape"] = self.rng.choice([[-1], [10**9, 10**9], ["a"], [], [0], [[2]], 2.5, True, None,
                                                     [2**62, 4], [1.0, 2]])
        elif op == 3:
            b, e = header[name]["data_offsets"]
            header[name]["data_offsets"] = self.rng.choice([[e, b], [b], [b, e, e], [-1, e], [b, 2**64], [b + 0.5, e],
                                                            ["0", e], [b, b], None, {"b": b}, [b + 4, e + 4]])
        elif op == 4:
            header[name] = self.rng.choice(ODD_JSON[:-1])
        elif op == 5:
            header["__metadata__"] = self.rng.choice([{"k": 1}, {"k": ["v"]}, "meta", [], {"k": "v" * 10_000}, None])
        elif op == 6:
            header[self.rng.choice(["", "x" * 600, "lora.0.query.A\x00", "😀", "../../etc", name + " "])] = header.pop(name)
        elif op == 7:
            header[name]["extra"] = 1
        elif op == 8:
            header = self.rng.choice([[], 1, "str", None, [header]])
        elif op == 9:  # JSON that json.dumps cannot make: NaN, duplicate keys, deep nesting, bad UTF-8
            raw = self.rng.choice([
                b'{"a": NaN}', b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {}}',
                b"[" * 5000 + b"]" * 5000, b'{"a": ' * 3000 + b"1" + b"}" * 3000, b'{"\xff\xfe": 1}', b"{", b"",
                b'{"a": Infinity}', b"\x00" * 16,
            ])
            return self.two(weights=struct.pack("<Q", len(raw)) + raw + self.data)
        elif op == 10:
            for _ in range(self.rng.choice([65, 200, 5000])):  # more tensors than the cap
                header[f"t{self.rng.randrange(10**9)}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        else:
            header[name]["data_offsets"] = [0, len(self.data) + self.rng.randint(1, 100)]
        blob = json.dumps(header).encode()
        length = len(blob) if self.rng.random() < 0.85 else len(blob) + self.rng.choice([-3, -1, 1, 7])
        return self.two(weights=struct.pack("<Q", max(0, length)) + blob + self.data)

    def truncation(self) -> list[Part]:
        if self.rng.random() < 0.7:
            return self.two(weights=self.weights[: self.rng.randrange(len(self.weights))])
        return self.two(config=self.config[: self.rng.randrange(len(self.config))])

    # config and parts ------------------------------------------------------------------------------
    def config_mutation(self) -> list[Part]:
        op = self.rng.randrange(5)
        if op == 0:
            return self.two(config=self.flip(self.config, self.rng.randint(1, 6)))
        if op == 1:
            return self.two(config=self.rng.choice([b"[" * 100_000, b"{" * 50_000, b'{"a":' * 40_000, b"\xff\xfe\x00",
                                                    b"null", b"[]", b'"str"', b"1e999", b" " * 9 * KiB]))
        cfg = json.loads(self.config)
        key = self.rng.choice(["labels", "input_kind", "max_length", "methods", "format", "overflow", "backbone", "template"])
        cfg[key] = self.rng.choice(ODD_JSON[:-1] + [["a"], ["a", "a"], {"lora": None}, {"lora": {"r": -1}}, 10**9])
        if op == 4:
            cfg.pop(self.rng.choice(list(cfg)), None)
        return self.two(config=json.dumps(cfg).encode())

    def parts_mutation(self) -> list[Part]:
        parts = self.two()
        op = self.rng.randrange(6)
        if op == 0:
            parts = [Part(p.field, self.rng.choice(HOSTILE_NAMES), p.data) for p in parts]
        elif op == 1:
            parts.append(self.rng.choice(parts))
        elif op == 2:
            parts = parts[: self.rng.randrange(2)]
        elif op == 3:
            parts.append(Part("x", self.rng.choice(HOSTILE_NAMES), self.rng.randbytes(self.rng.randrange(64))))
        elif op == 4:
            parts = [Part(p.field, p.filename, b"") for p in parts]
        else:
            parts.append(Part("bundle", "b.zip", self.zip_bytes({CONFIG: self.config, WEIGHTS: self.weights})))
        return parts

    # archives --------------------------------------------------------------------------------------
    def members(self) -> dict[str, bytes]:
        folder = self.rng.choice(["", "", "bundle/"])
        members = {folder + CONFIG: self.config, folder + WEIGHTS: self.weights}
        if self.rng.random() < 0.5:
            name = self.rng.choice(HOSTILE_NAMES)
            members[name] = self.rng.choice([b"", b"x", self.config, self.rng.randbytes(100)])
        if self.rng.random() < 0.1:
            for k in range(self.rng.choice([9, 20])):
                members[f"f{k}"] = b"x"
        return members

    def zip_bytes(self, members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                info = zipfile.ZipInfo(name)
                info.compress_type = self.rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
                info.external_attr = self.rng.choice([0o100644, 0o100644, 0o100644, 0o120777, 0o020644, 0o010644,
                                                      0o040755, 0]) << 16
                if self.rng.random() < 0.05:
                    info.flag_bits |= 0x1  # "encrypted"
                archive.writestr(info, data)
        return buffer.getvalue()

    def zip_mutation(self) -> list[Part]:
        blob = bytearray(self.zip_bytes(self.members()))
        op = self.rng.randrange(5)
        if op == 1:  # lie about sizes in the local and central headers
            for signature, size_at in ((b"PK\x03\x04", 18), (b"PK\x01\x02", 20)):
                start = 0
                while (at := blob.find(signature, start)) != -1:
                    if self.rng.random() < 0.5 and at + size_at + 8 <= len(blob):
                        field = self.rng.choice([0, 4])  # compressed or uncompressed size
                        blob[at + size_at + field: at + size_at + field + 4] = struct.pack(
                            "<I", self.rng.choice([0, 1, 2**31, 2**32 - 1, self.rng.randrange(2**32)]))
                    start = at + 4
        elif op == 2:
            blob = bytearray(self.flip(bytes(blob), self.rng.randint(1, 10)))
        elif op == 3:
            blob = blob[: self.rng.randrange(4, len(blob))]
        elif op == 4:
            blob = blob + self.rng.randbytes(self.rng.randrange(1, 200))
        return [Part("bundle", self.rng.choice(["b.zip", "b.tar.gz", "b", "../b.zip"]), bytes(blob))]

    def tar_mutation(self) -> list[Part]:
        members = self.members()
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=self.rng.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])) as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                kind = self.rng.choice([tarfile.REGTYPE] * 6 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                                                tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE,
                                                                tarfile.CONTTYPE, b"S", b"x"])
                info.type = kind
                if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = self.rng.choice(["/etc/passwd", CONFIG, "../x"])
                    info.size = 0
                archive.addfile(info, io.BytesIO(data) if info.isreg() or kind in (b"S", b"x") else None)
        tar = bytearray(raw.getvalue())
        op = self.rng.randrange(5)
        if op == 1:  # a member's size field lies (octal, 12 bytes at offset 124 of its header)
            block = 512 * self.rng.randrange(max(1, len(tar) // 512))
            tar[block + 124: block + 136] = self.rng.choice([b"77777777777\x00", b"00000000000\x00", b"zzzzzzzzzzz\x00",
                                                             b"\x80" + b"\xff" * 11, b"00000000001\x00"])
        elif op == 2:
            tar = bytearray(self.flip(bytes(tar), self.rng.randint(1, 10)))
        elif op == 3:
            tar = tar[: self.rng.randrange(len(tar))]
        import gzip

        blob = gzip.compress(bytes(tar), mtime=0)
        if op == 4:
            blob = self.flip(blob, self.rng.randint(1, 6)) if self.rng.random() < 0.5 else blob[: self.rng.randrange(2, len(blob))]
        return [Part("bundle", "b.tar.gz", blob)]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Engine, BackboneInfo]:
    backbone_dir = save_tiny_backbone("bert", tmp_path_factory.mktemp("fuzz") / "backbone")
    engine = Engine(load_backbone(backbone_dir, device="cpu", dtype="float32"))
    return backbone_dir, engine, engine.backbone.info


def _limits() -> UploadLimits:
    return UploadLimits.from_settings(Settings(store=tempfile.gettempdir(), **LIMITS))


def _leftovers() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("adaptserve-upload-")}


# -- tests ----------------------------------------------------------------------------------------
def test_ten_thousand_mutated_uploads_end_in_a_bundle_or_upload_rejected(tiny, tmp_path: Path) -> None:
    _, engine, info = tiny
    config, weights = make_bundle(info, seed=1)
    store = tmp_path / "store"
    (store / "sentiment" / content_version(config, weights)).mkdir(parents=True)
    before, temp_before = tree_hash(store), _leftovers()
    limits = _limits()
    mutator = Mutator(config, weights, SEED)
    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    for case in range(DIRECT_CASES):
        kind, parts = mutator.next()
        try:
            files = assemble(parts, limits)
            load_upload(engine, TaskKey("sentiment", content_version(files.config, files.weights)), files)
            outcomes[f"{kind}: accepted"] += 1
        except UploadRejected as err:
            assert err.problems and all(isinstance(p, str) and p for p in err.problems)
            assert err.status_code in (413, 422)
            outcomes[f"{kind}: rejected"] += 1
        except Exception as err:  # noqa: BLE001 - what this test exists to find
            crashes.append(f"case {case} ({kind}): {type(err).__name__}: {str(err)[:200]}")
    kinds = Counter(crash.split(": ", 2)[1].split(":")[0] for crash in crashes)
    assert not crashes, f"{len(crashes)} crashes {dict(kinds)}, e.g.\n" + "\n".join(crashes[:10])
    assert sum(outcomes.values()) == DIRECT_CASES
    # The mutator reaches every kind, and most mutations are refused (it is not feeding valid bundles).
    assert {kind.split(":")[0] for kind in outcomes} == {kind for kind, _, _ in mutator.kinds}
    assert sum(n for k, n in outcomes.items() if k.endswith("rejected")) > DIRECT_CASES * 0.7, outcomes
    assert tree_hash(store) == before
    assert _leftovers() <= temp_before, "a temporary upload directory was left behind"


def test_mutated_uploads_over_http_are_4xx_and_leave_the_store_alone(tiny, tmp_path: Path) -> None:
    backbone_dir, engine, info = tiny
    store = tmp_path / "store"
    store.mkdir()
    settings = Settings(store=store, max_wait_ms=1.0, **LIMITS)
    config, weights = make_bundle(info, seed=2)
    mutator = Mutator(config, weights, SEED + 1)
    statuses: Counter[int] = Counter()
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.post("/v1/tasks/sentiment/versions", files={CONFIG: (CONFIG, config), WEIGHTS: (WEIGHTS, weights)}
                           ).status_code == 201
        for case in range(HTTP_CASES):
            kind, parts = mutator.next()
            before = tree_hash(store)
            files = [(part.field, (part.filename, part.data)) for part in parts]
            response = client.post("/v1/tasks/sentiment/versions", files=files)
            statuses[response.status_code] += 1
            assert response.status_code in (200, 201, 400, 413, 415, 422), (case, kind, response.status_code, response.text)
            if response.status_code >= 400:
                body = response.json()
                assert set(body) >= {"error", "error_type"} and body["error"], body
                assert tree_hash(store) == before, (case, kind)
        assert client.post("/v1/tasks/sentiment/classify", json={"inputs": ["still fine"]}).status_code == 200
    assert sum(n for status, n in statuses.items() if status >= 400) > HTTP_CASES * 0.7, statuses
