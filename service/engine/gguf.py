"""GGUF backbones: dequantised once by transformers (slow, ~20-40 s), then cached as a plain
safetensors folder so every later start loads in about a second."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else the `ADAPTSERVE_CACHE_DIR` setting (`Settings.cache_dir`; the training CLI,
    which has no Settings, reads the same variable here), else `~/.cache/adaptserve`."""
    return Path(cache_dir or os.environ.get("ADAPTSERVE_CACHE_DIR") or Path.home() / ".cache" / "adaptserve")


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


_WEIGHTS = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_STALE_TMP_S = 3600  # a conversion's temporary folder older than this was left by a killed process


def cache_problem(out: Path) -> str | None:
    """Why the cached conversion `out` cannot be loaded, or None when it is whole: its config
    parses, the safetensors file is exactly as long as its own header says (a copy or a disk cut
    short is caught here, before the loader fails deep inside with no word of the cache), and
    it has a tokenizer. Reads the header only, not the ~0.5 GB of weights."""
    try:
        json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"config.json cannot be read ({type(err).__name__}: {str(err)[:120]})"
    weights = out / _WEIGHTS
    try:
        size = weights.stat().st_size
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"{_WEIGHTS} is {size:,} bytes, shorter than its own {n:,}-byte header"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        return f"{_WEIGHTS} cannot be read ({type(err).__name__}: {str(err)[:120]})"
    if size != 8 + n + end:
        return f"{_WEIGHTS} is {size:,} bytes, but its header describes {8 + n + end:,}"
    if not any((out / name).is_file() for name in _TOKENIZER_FILES):
        return f"it has no tokenizer ({', '.join(_TOKENIZER_FILES)})"
    return None


def _discard(out: Path) -> None:
    """Move a damaged cached conversion out of the way (one rename, so no other process sees it
    half-deleted), then delete it. Another process may have moved or replaced it already."""
    try:
        aside = Path(tempfile.mkdtemp(prefix=".tmp-damaged-", dir=out.parent))
        os.rename(out, aside / "old")
    except OSError:
        shutil.rmtree(out, ignore_errors=True)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _sweep_stale(parent: Path) -> None:
    """Delete temporary folders (up to a whole model each) that killed conversions left behind."""
    now = time.time()
    for tmp in parent.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def convert_gguf(path: Path, cache_dir: str | Path | None = None) -> Path:
    """Return a cached HF folder (config, safetensors, tokenizer) for a .gguf file.

    A cached folder that is damaged (`cache_problem`: cut short, a file missing) is named in a
    warning and converted again. Two processes converting the same file at once both succeed:
    the one that finishes second uses the first one's folder."""
    if not path.is_file():
        raise ValueError(f"GGUF backbone {str(path)!r} does not exist")
    out = cache_root(cache_dir) / "gguf" / f"{path.stem}-{_key(path)}"
    if out.exists():
        problem = cache_problem(out)
        if problem is None:
            return out
        log.warning("the cached conversion %s is damaged (%s): converting %s again", out, problem, path.name)
        _discard(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", path.name, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as err:  # transformers reads GGUF through the `gguf` package, not a dependency
        raise ValueError(f"GGUF backbone {str(path)!r} needs the `gguf` package to be read: pip install gguf "
                         f"({str(err)[:160]})") from None
    except (struct.error, ValueError, KeyError, IndexError, EOFError) as err:
        # A cut-short file (a partial download) fails deep in the reader: a struct that does not
        # unpack, an array that does not reshape, a metadata key that is missing.
        raise ValueError(f"GGUF backbone {str(path)!r} cannot be read ({str(err)[:160]}): is it a complete .gguf "
                         f"file? It is {path.stat().st_size:,} bytes here; a download cut short fails this way") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        _write(model, tok, tmp)
        # mkdtemp's 0700 would make the finished folder this user's alone: a cache volume shared by
        # the serving image's user and a training job's (another uid) must read it, as a plain mkdir
        # would let it. (Not read from the umask: setting it to read it races other threads' files.)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)
        except OSError:
            # another process converting the same file at once got there first: use its folder
            if not out.exists() or cache_problem(out) is not None:
                raise
            log.info("%s was converted meanwhile by another process; using it", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(model, tok, folder: Path) -> None:
    """The converted model as a plain HF folder: fp32 safetensors, config, tokenizer."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the input embeddings
    save_file(state, str(folder / _WEIGHTS))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(folder))
