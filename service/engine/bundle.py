"""Task bundles on disk: `adapter_config.json` + `adapter_model.safetensors` (see adapters_store/README.md).

`read_bundle` parses a bundle once into a `TaskSpec` and validated per-method `TaskWeights`;
`write_bundle` is its inverse and names the version by content hash. HF PEFT bundles are
translated on the way in by `service.engine.peft_import`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

import service.methods  # noqa: F401  (registers every method)
from service.engine.spec import OVERFLOWS, BackboneInfo, TaskSpec
from service.engine.template import Template, TemplateError
from service.errors import BundleError, NoMatchingModuleError
from service.methods.base import REGISTRY, TaskWeights

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FORMAT = "adaptserve/1"
INPUT_KINDS = ("single", "pair")


def read_config(bundle_dir: Path) -> dict[str, Any]:
    p = bundle_dir / CONFIG
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle_dir.name!r} has no {CONFIG}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{CONFIG} is not valid UTF-8 JSON: {e}") from None
    except RecursionError:
        raise BundleError(f"{CONFIG} is nested too deeply to be a task config") from None
    if not isinstance(cfg, dict):
        raise BundleError(f"{CONFIG} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def read_tensors(bundle_dir: Path) -> dict[str, Tensor]:
    p = bundle_dir / WEIGHTS
    if not p.is_file():
        raise BundleError(f"bundle {bundle_dir.name!r} has no {WEIGHTS}")
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{WEIGHTS} is not a readable safetensors file: {e}") from None


def parse(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo, name: str) -> tuple[TaskSpec, dict[str, TaskWeights]]:
    """Validate a native config + tensors against the backbone; report every problem at once."""
    problems: list[str] = []
    if cfg.get("format") != FORMAT:
        problems.append(f"'format' must be {FORMAT!r}, got {cfg.get('format')!r}")
    methods_cfg = cfg.get("methods")
    if not isinstance(methods_cfg, dict) or not methods_cfg:
        raise BundleError(f"task {name!r}: 'methods' must be a non-empty object naming at least one method")
    unknown = [m for m in methods_cfg if m not in REGISTRY]
    if unknown:
        problems.append(f"unknown method(s) {unknown}; known: {sorted(REGISTRY)}")
    labels = cfg.get("labels")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) and x for x in labels)):
        problems.append("'labels' must list at least 2 non-empty label names")
        labels = []
    elif len(set(labels)) != len(labels):
        problems.append(f"'labels' has duplicates: {labels}")
    kind = cfg.get("input_kind", "single")
    if kind not in INPUT_KINDS:
        problems.append(f"'input_kind' must be one of {INPUT_KINDS}, got {kind!r}")
    max_length = cfg.get("max_length", 128)
    if not isinstance(max_length, int) or not 2 <= max_length <= backbone.max_positions:
        problems.append(f"'max_length' must be an integer in [2, {backbone.max_positions}], got {max_length!r}")
    overflow = cfg.get("overflow", "truncate")
    if overflow not in OVERFLOWS:
        problems.append(f"'overflow' must be one of {OVERFLOWS}, got {overflow!r}")
    fp = (cfg.get("backbone") or {}).get("fingerprint")
    if fp is not None and fp != backbone.fingerprint:
        problems.append(
            f"trained on backbone {str(fp)[:19]}..., but this service runs {backbone.fingerprint[:19]}...: "
            "task weights only make sense on the backbone they were trained on"
        )
    named = tuple(f"{m}." for m in methods_cfg)
    stray = sorted(k for k in tensors if not k.startswith(named))
    if stray:
        problems.append(
            f"tensors belonging to no method named in 'methods': {stray[:5]}{' ...' if len(stray) > 5 else ''}"
        )
    for m in methods_cfg:
        if m in REGISTRY and not isinstance(methods_cfg[m], dict):
            problems.append(f"method section {m!r} must be an object")

    weights: dict[str, TaskWeights] = {}
    parseable = [m for m in methods_cfg if m in REGISTRY and isinstance(methods_cfg[m], dict)]
    for m in sorted(parseable, key=lambda m: REGISTRY[m].order):
        own = {k: v for k, v in tensors.items() if k.startswith(m + ".")}
        try:
            weights[m] = REGISTRY[m].parse(methods_cfg[m], own, backbone)
        except BundleError as e:
            problems.append(str(e))
    if "head" in weights and labels and weights["head"].num_labels != len(labels):  # type: ignore[attr-defined]
        problems.append(f"head has {weights['head'].num_labels} outputs but {len(labels)} labels are named")  # type: ignore[attr-defined]
    if "exits" in weights and labels:
        n = next(iter(weights["exits"].layers.values()))[0].shape[0]  # type: ignore[attr-defined]
        if n != len(labels):
            problems.append(f"exit classifiers have {n} outputs but {len(labels)} labels are named")
    if "exits" in weights and "head" not in weights:
        problems.append("early exit needs the task's head: the last layer is answered by it")
    if problems:
        raise BundleError(f"task {name!r}: " + "; ".join(problems))
    template = None
    if cfg.get("template") is not None:
        try:
            template = Template.parse(cfg["template"], pair=kind == "pair", needs_mask="verbalizer" in weights,
                                      causal=backbone.kind == "decoder")
        except TemplateError as e:
            raise BundleError(f"task {name!r}: {e}") from None
    elif "verbalizer" in weights:
        raise BundleError(f"task {name!r}: a verbalizer needs a 'template' with a {{mask}} slot")
    if "verbalizer" in weights and labels and weights["verbalizer"].num_labels != len(labels):  # type: ignore[attr-defined]
        raise BundleError(f"task {name!r}: the verbalizer maps {weights['verbalizer'].num_labels} labels but {len(labels)} are named")  # type: ignore[attr-defined]
    if "demos" in weights and "verbalizer" not in weights:
        raise BundleError(f"task {name!r}: demonstrations are shown with their label words: they need a 'verbalizer' and a 'template'")
    if "demos" in weights and labels and max(weights["demos"].labels) >= len(labels):  # type: ignore[attr-defined]
        raise BundleError(f"task {name!r}: a demonstration's label index is out of range for {len(labels)} labels")
    if "head" not in weights and "verbalizer" not in weights:
        raise BundleError(f"task {name!r}: a task needs an output: a 'head' or a 'verbalizer'")
    _check_lengths(weights, max_length, backbone, name)
    spec = TaskSpec(
        name=name,
        labels=tuple(labels),
        input_kind=kind,
        max_length=max_length,
        methods=tuple(weights),
        backbone_fingerprint=fp,
        template=template,
        metadata={k: cfg[k] for k in ("training", "metrics", "created") if k in cfg},
        overflow=overflow,
    )
    return spec, weights


def _check_lengths(weights: Mapping[str, TaskWeights], max_length: int, backbone: BackboneInfo, name: str) -> None:
    """Virtual tokens (soft prompt, prefix) share the position table with the text."""
    extra = sum(getattr(w, "positions_used", 0) for w in weights.values())
    if max_length + extra > backbone.max_positions:
        raise BundleError(
            f"task {name!r}: max_length {max_length} + {extra} virtual tokens exceeds the backbone's "
            f"{backbone.max_positions} positions"
        )


def read_bundle(bundle_dir: Path, backbone: BackboneInfo, name: str) -> tuple[TaskSpec, dict[str, TaskWeights]]:
    cfg = read_config(bundle_dir)
    tensors = read_tensors(bundle_dir)
    if "peft_type" in cfg:
        from service.engine.peft_import import from_peft

        cfg, tensors = from_peft(cfg, tensors, backbone, name)
    return parse(cfg, tensors, backbone, name)


def bundle_bytes(spec_cfg: Mapping[str, Any], weights: Mapping[str, TaskWeights]) -> tuple[bytes, bytes]:
    """Serialise (config JSON, safetensors) deterministically."""
    tensors: dict[str, Tensor] = {}
    for w in weights.values():
        tensors.update({k: t.detach().to("cpu").clone() for k, t in w.tensors().items()})  # clone: no shared storage
    cfg = dict(spec_cfg)
    cfg["format"] = FORMAT
    cfg["methods"] = {m: w.config() for m, w in weights.items()}
    return json.dumps(cfg, indent=2, sort_keys=True).encode(), save(tensors)


def content_version(config_bytes: bytes, weights_bytes: bytes) -> str:
    """A version id is the content hash of the bundle (first 16 hex digits of sha256)."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(config_bytes).digest())
    h.update(hashlib.sha256(weights_bytes).digest())
    return h.hexdigest()[:16]


def write_bundle_files(target: Path, config_bytes: bytes, weights_bytes: bytes) -> None:
    """Write a bundle directory atomically: temp dir, fsync every file, rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: other users (a container's app user) must read it
    try:
        for fname, data in ((CONFIG, config_bytes), (WEIGHTS, weights_bytes)):
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if target.exists():  # same content hash: identical bundle already published
            return
        os.rename(tmp, target)
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()


def write_bundle(store: Path, name: str, spec_cfg: Mapping[str, Any], weights: Mapping[str, TaskWeights], activate: bool = True) -> str:
    """Publish a task version into a local store and (optionally) make it the active one."""
    cfg_b, w_b = bundle_bytes(spec_cfg, weights)
    version = content_version(cfg_b, w_b)
    write_bundle_files(store / name / version, cfg_b, w_b)
    if activate:
        set_active(store, name, version)
    return version


def set_active(store: Path, name: str, version: str) -> None:
    """Point `<store>/<task>/ACTIVE` at a version, atomically (write temp, fsync, rename)."""
    d = store / name
    tmp = d / f".ACTIVE.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / "ACTIVE")


__all__ = [
    "CONFIG", "WEIGHTS", "FORMAT", "read_bundle", "parse", "write_bundle", "bundle_bytes", "content_version",
    "set_active", "NoMatchingModuleError",
]
