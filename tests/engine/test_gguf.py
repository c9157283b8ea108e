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


# --- the conversion cache (QA: a cut-short cache failed every start with a SafetensorError naming
# no cache folder; two processes converting at once: the second failed with ENOTEMPTY) ---------

import threading  # noqa: E402

import transformers as T  # noqa: E402

from service.engine import gguf  # noqa: E402
from tests.factories import save_tiny_lm  # noqa: E402


@pytest.fixture()
def fake_gguf(tmp_path: Path, monkeypatch):
    """A .gguf path whose "conversion" is the tiny causal LM (transformers' GGUF reader replaced),
    counting the conversions."""
    lm = save_tiny_lm("causal", tmp_path / "lm")
    model, tok = T.AutoModelForCausalLM.from_pretrained(str(lm)), T.AutoTokenizer.from_pretrained(str(lm))
    calls: list[int] = []
    hold = threading.Event()
    hold.set()

    def model_from(*a, **k):
        calls.append(1)
        hold.wait(10)
        return model

    monkeypatch.setattr(T.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(T.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF not really")
    return path, calls, hold


def test_a_whole_cache_is_used_without_converting_again(fake_gguf, tmp_path: Path) -> None:
    path, calls, _ = fake_gguf
    out = convert_gguf(path, tmp_path / "cache")
    assert gguf.cache_problem(out) is None and len(calls) == 1
    assert convert_gguf(path, tmp_path / "cache") == out and len(calls) == 1
    # readable by another user of a shared cache volume (mkdtemp alone would leave it 0700)
    assert out.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("damage", ["cut weights", "no weights", "no tokenizer", "bad config"])
def test_a_damaged_cache_is_named_and_converted_again(fake_gguf, tmp_path: Path, damage: str, caplog,
                                                     monkeypatch) -> None:
    path, calls, _ = fake_gguf
    out = convert_gguf(path, tmp_path / "cache")
    weights = out / "model.safetensors"
    if damage == "cut weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "no weights":
        weights.unlink()
    elif damage == "no tokenizer":
        for f in out.glob("tokenizer*"):
            f.unlink()
    else:
        (out / "config.json").write_text("{")
    with caplog.at_level("WARNING", logger="service.engine.gguf"):
        assert convert_gguf(path, tmp_path / "cache") == out
    assert len(calls) == 2  # converted again
    assert str(out) in caplog.text and "damaged" in caplog.text
    monkeypatch.undo()  # the real loader reads the folder
    from service.engine.backbone import load_backbone

    assert load_backbone(out, device="cpu", dtype="float32").info.kind == "decoder"
    assert not list(out.parent.glob(".tmp-*"))


def test_two_conversions_at_once_both_succeed(fake_gguf, tmp_path: Path) -> None:
    path, calls, hold = fake_gguf
    hold.clear()  # both threads read the GGUF, neither has written the cache yet
    results: list[object] = []

    def run() -> None:
        try:
            results.append(convert_gguf(path, tmp_path / "cache"))
        except Exception as err:  # noqa: BLE001
            results.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    while len(calls) < 2:
        threading.Event().wait(0.01)
    hold.set()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and all(isinstance(r, Path) for r in results), results
    assert results[0] == results[1] and gguf.cache_problem(results[0]) is None
    assert not list(results[0].parent.glob(".tmp-*"))


def test_a_killed_conversions_leftover_is_swept_a_fresh_one_kept(fake_gguf, tmp_path: Path) -> None:
    import os
    import time

    path, _, _ = fake_gguf
    parent = tmp_path / "cache" / "gguf"
    old, fresh = parent / ".tmp-killed", parent / ".tmp-running"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 100)
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    convert_gguf(path, tmp_path / "cache")
    assert not old.exists() and fresh.exists()
