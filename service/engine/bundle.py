"""Task bundles on disk: `adapter_config.json` + `adapter_model.safetensors` (see adapters_store/README.md).

`read_bundle` parses a bundle once into a `TaskSpec` and validated per-method `TaskWeights`;
`write_bundle` is its inverse and names the version by content hash. HF PEFT bundles are
translated on the way in by `service.engine.peft_import`.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

import service.methods  # noqa: F401  (registers every method)
from service.engine.spec import OVERFLOWS, BackboneInfo, TaskSpec
from service.engine.template import Template, TemplateError
from service.engine.types import TaskKey, unprintable
from service.errors import BundleError, NoMatchingModuleError
from service.methods.base import REGISTRY, TaskWeights
from service.methods.verbalizer import VerbalizerWeights, mismatched_words
from service.store import bundle_intact

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FORMAT = "adaptserve/1"
INPUT_KINDS = ("single", "pair")
MIN_MAX_LENGTH = 2  # the least max_length a task may declare


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


def parse(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo, name: str,
          tokenizer: Any = None) -> tuple[TaskSpec, dict[str, TaskWeights]]:
    """Validate a native config + tensors against the backbone; report every problem at once.

    A task trained on another backbone is reported alone and briefly: every tensor of it would
    misfit this one, and that list says nothing the fingerprint does not. `tokenizer` (the
    backbone's) lets a prompt task's template be checked against its max_length."""
    fp = _check_fingerprint(cfg, backbone, name)
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
    if bad := [x for x in labels if unprintable(x)]:
        problems.append(f"'labels' must be printable text (no control characters such as NUL or newlines): {bad}")
    kind = cfg.get("input_kind", "single")
    if kind not in INPUT_KINDS:
        problems.append(f"'input_kind' must be one of {INPUT_KINDS}, got {kind!r}")
    max_length = cfg.get("max_length", 128)
    if not isinstance(max_length, int) or not MIN_MAX_LENGTH <= max_length <= backbone.max_positions:
        problems.append(f"'max_length' must be an integer in [{MIN_MAX_LENGTH}, {backbone.max_positions}], got {max_length!r}")
    overflow = cfg.get("overflow", "truncate")
    if overflow not in OVERFLOWS:
        problems.append(f"'overflow' must be one of {OVERFLOWS}, got {overflow!r}")
    if not isinstance(cfg.get("backbone") or {}, Mapping):
        problems.append(f"'backbone' must be an object such as {{\"fingerprint\": \"sha256:...\"}}, "
                        f"got {type(cfg['backbone']).__name__}")
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
        # exit classifiers answer in the labels' order: their shape is known only here
        labelled = {"num_labels": len(labels)} if m == "exits" and labels else {}
        try:
            weights[m] = REGISTRY[m].parse(methods_cfg[m], own, backbone, **labelled)
        except BundleError as e:
            problems.extend(e.problems)
    if "head" in weights and labels and weights["head"].num_labels != len(labels):  # type: ignore[attr-defined]
        problems.append(f"head has {weights['head'].num_labels} outputs but {len(labels)} labels are named")  # type: ignore[attr-defined]
    if "exits" in weights and "head" not in weights:
        problems.append("early exit needs the task's head: the last layer is answered by it")
    if problems:
        listed = problems[:MAX_PROBLEMS] + ([f"... and {len(problems) - MAX_PROBLEMS} more"] if len(problems) > MAX_PROBLEMS else [])
        raise BundleError(f"task {name!r}: " + "; ".join(listed), problems=[f"task {name!r}: {p}" for p in listed])
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
    if "verbalizer" in weights and template is not None and tokenizer is not None:
        _check_label_words(weights["verbalizer"], labels, template, tokenizer, name)  # type: ignore[arg-type]
    if "demos" in weights and "verbalizer" not in weights:
        raise BundleError(f"task {name!r}: demonstrations are shown with their label words: they need a 'verbalizer' and a 'template'")
    if "demos" in weights and labels and max(weights["demos"].labels) >= len(labels):  # type: ignore[attr-defined]
        raise BundleError(f"task {name!r}: a demonstration's label index is out of range for {len(labels)} labels")
    if "head" not in weights and "verbalizer" not in weights:
        raise BundleError(f"task {name!r}: a task needs an output: a 'head' or a 'verbalizer'")
    _check_lengths(weights, max_length, backbone, name)
    if template is not None and tokenizer is not None:
        _check_template_fits(template, weights, max_length, backbone, tokenizer, name)
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


# At most this many problems per bundle are listed (the rest are counted): a
# bundle for another architecture misfits every tensor, and a 15 KB error names nothing more.
MAX_PROBLEMS = 8


def _check_fingerprint(cfg: Mapping[str, Any], backbone: BackboneInfo, name: str) -> str | None:
    """The fingerprint the task was trained on (None if it names none). A task trained on another
    backbone is refused first, in one short line."""
    trained_on = cfg.get("backbone") if isinstance(cfg.get("backbone"), Mapping) else {}
    fp = trained_on.get("fingerprint")
    if fp is None or fp == backbone.fingerprint:
        return fp
    called = trained_on.get("name") or trained_on.get("model_type")
    raise BundleError(
        f"task {name!r}: trained on backbone {str(fp)[:19]}...{f' ({called})' if called else ''}, but this one is "
        f"{backbone.fingerprint[:19]}... ({backbone.model_type}, {backbone.num_layers} layers): task weights only make "
        "sense on the backbone they were trained on; load that one (--backbone, or ADAPTSERVE_BACKBONE for the service)"
    )


def _check_template_fits(template: Template, weights: Mapping[str, TaskWeights], max_length: int,
                         backbone: BackboneInfo, tokenizer: Any, name: str) -> None:
    """A template whose own tokens fill max_length would fail every request: refuse the bundle."""
    # one demonstration per class of the pool (`DemosWeights.pick`)
    demos = len(set(weights["demos"].labels)) if "demos" in weights else 0  # type: ignore[attr-defined]
    try:
        template.check_fits(tokenizer, max_length, backbone.kind == "decoder", demos)
    except TemplateError as e:
        raise BundleError(f"task {name!r}: {e}; raise its 'max_length' or shorten the template") from None


def _check_label_words(verbalizer: VerbalizerWeights, labels: list[str], template: Template, tokenizer: Any,
                       name: str) -> None:
    """A verbalizer whose words are not its token ids shows one thing and scores another: refuse it."""
    wrong = mismatched_words(verbalizer, labels, tokenizer, template)
    if wrong:
        more = f"; ... and {len(wrong) - MAX_PROBLEMS} more" if len(wrong) > MAX_PROBLEMS else ""
        raise BundleError(
            f"task {name!r}: the verbalizer's 'label_words' and 'token_ids' disagree: " + "; ".join(wrong[:MAX_PROBLEMS])
            + more + ". Each id must be its word's token (read after the template's text before {mask}, or the "
            "exact vocabulary token): give the right ids, or build the task with `adaptserve train` / `zeroshot`, "
            "which resolve them"
        )


def _check_lengths(weights: Mapping[str, TaskWeights], max_length: int, backbone: BackboneInfo, name: str) -> None:
    """Virtual tokens (soft prompt, prefix) share the position table with the text."""
    extra = sum(getattr(w, "positions_used", 0) for w in weights.values())
    if max_length + extra > backbone.max_positions:
        raise BundleError(
            f"task {name!r}: max_length {max_length} + {extra} virtual tokens exceeds the backbone's "
            f"{backbone.max_positions} positions"
        )


def read_bundle(bundle_dir: Path, backbone: BackboneInfo, name: str,
                tokenizer: Any = None) -> tuple[TaskSpec, dict[str, TaskWeights]]:
    cfg = read_config(bundle_dir)
    tensors = read_tensors(bundle_dir)
    if "peft_type" in cfg:
        from service.engine.peft_import import from_peft

        cfg, tensors = from_peft(cfg, tensors, backbone, name)
    return parse(cfg, tensors, backbone, name, tokenizer)


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
    """Write a bundle directory atomically: temp dir, fsync every file, into place in one step.

    Whatever is at `target` already is replaced: callers publish only where no intact copy is
    (`service.store.bundle_intact`), so it is a damaged copy. It is removed only once the new copy
    is in place, and a reader finds the old directory or the new one, never a half-written one."""
    made_parent = not target.parent.exists()
    replaced: Path | None = None
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: other users (a container's app user) must read it
        for fname, data in ((CONFIG, config_bytes), (WEIGHTS, weights_bytes)):
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        replaced = _into_place(tmp, target)
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as err:  # e.g. a full disk, whose message names no path: name the one being written
        raise OSError(err.errno, f"cannot write the bundle {target}: {err.strerror or err}") from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # there only if something failed, or holding the swapped-out copy
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        if made_parent and not os.path.lexists(target):  # a task directory made for a version that failed
            try:
                target.parent.rmdir()
            except OSError:
                pass


def _into_place(new: Path, target: Path) -> Path | None:
    """Move the finished directory `new` to `target`. Returns where a copy already at `target` went
    (to be removed, now that the new one is in place), or None when nothing was there."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if _exchange(new, target):  # one step: `new` now holds the old copy
        return new
    # Two renames: for the moment between them the version is absent, never half-written.
    aside = target.with_name(f".replaced-{target.name}-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(aside, target)  # put the old copy back: a damaged version reports itself, a missing one is lost
        raise
    return aside


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 with RENAME_EXCHANGE). False where the C
    library, the kernel or the filesystem (NFS, some overlays) cannot: the caller renames twice."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28, musl >= 1.2.5
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def write_bundle(store: Path, name: str, spec_cfg: Mapping[str, Any], weights: Mapping[str, TaskWeights], activate: bool = True) -> str:
    """Publish a task version into a local store and (optionally) make it the active one. A version
    already there intact is left as it is; a damaged copy of it (e.g. bit rot) is replaced."""
    cfg_b, w_b = bundle_bytes(spec_cfg, weights)
    version = content_version(cfg_b, w_b)
    target = store / name / version
    # The directories this call makes, deepest first: the task's, and the store's own (with any
    # parent it lacks) when the store did not exist. A write or activation that fails removes them.
    made_dirs = [d for d in (target.parent, *target.parent.parents) if not os.path.lexists(d)]
    made = written = False
    try:
        if not bundle_intact(target, TaskKey(name, version)):  # new, or repairs a damaged copy
            made = not os.path.lexists(target)  # a repaired copy stays: it is that version, only whole again
            write_bundle_files(target, cfg_b, w_b)
            written = True
        if activate:
            from service.registry.local import recording_activation  # the service's history, for its rollback

            meta = {"uploaded_at": round(time.time(), 3), "bytes": len(cfg_b) + len(w_b), "source": "store", "kind": "native"}
            try:
                with recording_activation(store, name, version, meta, created=written):
                    set_active(store, name, version)
            except OSError as err:
                # Not made active: a version left behind would make a task without ACTIVE one with two
                # versions and no choice between them (it serves nothing), and the run reports a failure.
                if made:
                    shutil.rmtree(target, ignore_errors=True)
                raise OSError(err.errno, f"cannot make {name}@{version} active ({store / name / 'ACTIVE'}: "
                              f"{err.strerror or err}); the store was left as it was") from err
    except OSError:
        for d in made_dirs:  # rmdir: a directory something else wrote into meanwhile stays
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return version


def set_active(store: Path, name: str, version: str) -> None:
    """Point `<store>/<task>/ACTIVE` at a version, atomically (write temp, fsync, rename). A write
    or rename that fails removes its temporary file: ACTIVE stays as it was."""
    d = store / name
    tmp = d / f".ACTIVE.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / "ACTIVE")
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


__all__ = [
    "CONFIG", "WEIGHTS", "FORMAT", "read_bundle", "parse", "write_bundle", "bundle_bytes", "content_version",
    "set_active", "NoMatchingModuleError",
]
