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
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else the `ADAPTSERVE_CACHE_DIR` setting (`Settings.cache_dir`; the training CLI,
    which has no Settings, reads the same variable here), else `~/.cache/adaptserve`."""
    return Path(cache_dir or os.environ.get("ADAPTSERVE_CACHE_DIR") or Path.home() / ".cache" / "adaptserve")


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(path: Path, cache_dir: str | Path | None = None) -> Path:
    """Return a cached HF folder (config, safetensors, tokenizer) for a .gguf file."""
    if not path.is_file():
        raise ValueError(f"GGUF backbone {str(path)!r} does not exist")
    out = cache_root(cache_dir) / "gguf" / f"{path.stem}-{_key(path)}"
    if (out / "config.json").is_file():
        return out
    from safetensors.torch import save_file
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
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to the input embeddings
        save_file(state, str(tmp / "model.safetensors"))
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
