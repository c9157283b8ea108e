"""Building task bundles as bytes for upload tests: valid ones on a tiny random backbone, and the
raw pieces (safetensors headers, archives) that hostile uploads are made of."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import torch

from service.engine.bundle import bundle_bytes
from service.engine.spec import BackboneInfo
from tests.factories import random_head, random_lora

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def make_bundle(info: BackboneInfo, seed: int, labels: tuple[str, ...] = ("neg", "pos"), **config: object) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a LoRA + head task; `seed` varies the weights."""
    g = torch.Generator().manual_seed(seed)
    weights = {"lora": random_lora(info, g), "head": random_head(info, g, labels=len(labels))}
    cfg = {"labels": list(labels), "input_kind": "single", "max_length": 32,
           "backbone": {"fingerprint": info.fingerprint}} | config
    return bundle_bytes(cfg, weights)


def files(config: bytes, weights: bytes) -> dict[str, tuple[str, bytes, str]]:
    """httpx `files=` for the two-part upload."""
    return {CONFIG: (CONFIG, config, "application/json"), WEIGHTS: (WEIGHTS, weights, "application/octet-stream")}


def raw_safetensors(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file with exactly this header and data (nothing checked)."""
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data


def zip_bytes(members: dict[str, bytes], *, symlinks: dict[str, str] | None = None,
              compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            info.external_attr = 0o100644 << 16
            archive.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # S_IFLNK
            archive.writestr(info, target)
    return buffer.getvalue()


def tar_gz_bytes(members: dict[str, bytes], *, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra or []:
            archive.addfile(info)
    return buffer.getvalue()


def tree_hash(root: Path) -> str:
    """One hash over every path (hidden ones too), its type and its bytes under `root`."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            h.update(str(path.relative_to(root)).encode() + b"\0")
            if path.is_symlink():
                h.update(b"L" + os.readlink(path).encode())
            elif path.is_file():
                h.update(b"F" + path.read_bytes())
            else:
                h.update(b"D")
    return h.hexdigest()
