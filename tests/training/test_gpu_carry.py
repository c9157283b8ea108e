"""bench/gpu_carry.py: files cut into parts that each fit one device call come back whole, part by
part, in any order, and a damaged part is caught before anything uses it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from bench import gpu_carry


def _sources(tmp_path: Path) -> list[tuple[str, Path]]:
    src = tmp_path / "src"
    src.mkdir()
    files = {"model.bin": os.urandom(5000), "config.json": b'{"a": 1}', "big.gguf": os.urandom(12_345), "empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    return [(f"pylib/{gpu_carry.PACKAGE}/model/model.bin", src / "model.bin"),
            (f"pylib/{gpu_carry.PACKAGE}/model/config.json", src / "config.json"),
            ("lm/big.gguf", src / "big.gguf"), ("data/sst2/empty", src / "empty")]


def test_parts_reassemble_byte_for_byte_in_any_order(tmp_path: Path) -> None:
    files = _sources(tmp_path)
    out, stage = tmp_path / "carry", tmp_path / "stage"
    assert gpu_carry.prepare(out, 4096 / 2**20, files) == 0  # 4 KiB parts: big files span several
    parts = sorted(out.glob("part*"), reverse=True)  # the last part first
    assert len(parts) == 5
    assert all(sum(f.stat().st_size for f in p.glob("*.bin")) <= 4096 for p in parts)
    for k, part in enumerate(parts):  # one part per call, as the device tool carries them
        call = tmp_path / f"call{k}"
        call.mkdir()
        part.rename(call / part.name)
        assert gpu_carry.assemble(call, stage) == 0
        assert (stage / "lm").exists() == (k == len(parts) - 1)  # nothing is written until all are there
    for dest, path in files:
        assert (stage / dest).read_bytes() == path.read_bytes()
    stub = stage / "pylib" / gpu_carry.PACKAGE / "__init__.py"
    assert "def get_model_path" in stub.read_text()


def test_a_damaged_part_fails_the_assembly(tmp_path: Path) -> None:
    files = _sources(tmp_path)
    out, stage = tmp_path / "carry", tmp_path / "stage"
    gpu_carry.prepare(out, 1.0, files)  # one part
    piece = max((out / "part1").glob("*.bin"), key=lambda f: f.stat().st_size)
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 1
    piece.write_bytes(bytes(data))
    assert gpu_carry.assemble(out, stage) == 1
    manifest = json.loads((stage / "parts" / "part1" / "manifest.json").read_text())
    assert manifest["parts"] == 1 and not (stage / "pylib" / gpu_carry.PACKAGE / "__init__.py").exists()
