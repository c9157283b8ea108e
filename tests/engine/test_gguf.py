"""A GGUF backbone that cannot be read (a download cut short) is one clear error, and nothing is
left in the conversion cache."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.engine.gguf import convert_gguf


@pytest.mark.parametrize("content", [b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8, b"GGUF"], ids=["header cut", "magic only"])
def test_a_truncated_gguf_file_is_named_not_a_traceback(tmp_path: Path, content: bytes) -> None:
    pytest.importorskip("gguf")  # transformers reads GGUF through it (installed with the LM extras)
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot be read .*is it a complete \.gguf file\? It is \d+ bytes here"):
        convert_gguf(path, tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_a_missing_gguf_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "cache")
