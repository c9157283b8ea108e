"""From the parts of an upload to the two bundle files, with every structural problem named.

An upload is either the two files (`adapter_config.json`, `adapter_model.safetensors`) as
multipart parts, or one `.zip` / `.tar.gz` holding a bundle or a Hugging Face PEFT adapter
directory (the same two names, optionally inside one top-level folder, optionally with a
README.md; the metadata macOS adds is ignored). Pickle weights (`adapter_model.bin`, `*.pt`, ...) are refused by name and by
content: loading a pickle runs code.

`assemble` checks what can be checked without the backbone (sizes, archive members, the
safetensors header, that the config is a JSON object, fingerprint presence); the engine then
parses the bundle for real (`service.hotswap`). Both raise `UploadRejected` listing every problem.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from service.errors import UploadRejected
from service.store import CONFIG_FILE, WEIGHTS_FILE
from service.upload.archive import (
    APPLEDOUBLE_PREFIX, MACOS_FOLDER, ArchiveLimits, archive_kind, is_macos_metadata, unpack,
)
from service.upload.safetensors_header import DuplicateKey, HeaderLimits, check_safetensors, no_duplicate_keys

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")  # only the message uses names; bytes decide
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
# Keys every PEFT adapter_config.json has (one of them) and a native bundle config never has.
PEFT_CONFIG_KEYS = ("base_model_name_or_path", "task_type", "target_modules", "num_virtual_tokens", "lora_alpha",
                    "inference_mode")
# The PEFT types the engine serves (`peft_import.PEFT_METHODS`, which imports torch; a test keeps the two equal),
# spelled as PEFT's PeftType values: the only spelling PEFT reads (PeftConfig.from_pretrained raises KeyError on "lora").
PEFT_TYPES = ("LORA", "PREFIX_TUNING", "PROMPT_TUNING")
IGNORED_MEMBERS = {"readme.md", ".gitattributes"}  # what PEFT's save_pretrained / a hub folder add
# The metadata macOS adds to archives (`archive.is_macos_metadata`) is dropped after the archive's own
# checks (names, types, member count and sizes count it as any member), never read as a bundle file.


@dataclass(frozen=True)
class UploadLimits:
    config_bytes: int
    weights_bytes: int
    archive: ArchiveLimits
    header: HeaderLimits
    require_fingerprint: bool

    @classmethod
    def from_settings(cls, settings: Any) -> "UploadLimits":
        return cls(
            config_bytes=settings.upload_max_config_bytes,
            weights_bytes=settings.upload_max_weights_bytes,
            archive=ArchiveLimits(
                max_members=settings.upload_max_archive_members,
                max_uncompressed_bytes=settings.upload_uncompressed_limit_bytes,
                max_ratio=settings.upload_max_compression_ratio,
            ),
            header=HeaderLimits(max_header_bytes=settings.upload_max_header_bytes, max_tensors=settings.upload_max_tensors),
            require_fingerprint=settings.upload_require_fingerprint,
        )

    @property
    def part_bytes(self) -> int:
        """Most bytes read from one multipart part (the larger file limit)."""
        return max(self.config_bytes, self.weights_bytes, self.archive.max_uncompressed_bytes)


@dataclass(frozen=True)
class Part:
    """One file part of the multipart body. `data` holds at most `UploadLimits.part_bytes + 1` bytes."""

    field: str
    filename: str | None
    data: bytes

    @property
    def name(self) -> str:
        """The name the part goes by: its field name when that names a bundle file (the form the
        OpenAPI document declares, whatever the client's file is called; it wins over the file
        name), else its file name's last component (clients that name the files, not the
        fields), else its field name."""
        if self.field in (CONFIG_FILE, WEIGHTS_FILE):
            return self.field
        return PurePosixPath((self.filename or "").replace("\\", "/")).name or self.field


@dataclass(frozen=True)
class BundleFiles:
    config: bytes
    weights: bytes
    source: str  # "files", "zip" or "tar.gz"
    kind: str  # "native" or "peft"
    base_model: str | None = None  # a PEFT adapter's base_model_name_or_path


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.too_large = False

    def add(self, message: str, *, too_large: bool = False) -> None:
        self.items.append(message)
        self.too_large |= too_large

    def raise_if_any(self) -> None:
        if self.items:
            raise UploadRejected(self.items, too_large=self.too_large)


def assemble(parts: list[Part], limits: UploadLimits) -> BundleFiles:
    """The config and weights of the upload, or UploadRejected naming every problem found."""
    problems = _Problems()
    if not parts:
        problems.add(f"no files uploaded: send {CONFIG_FILE} and {WEIGHTS_FILE} as multipart file parts, "
                     "or one .zip / .tar.gz of a bundle or a PEFT adapter directory")
        problems.raise_if_any()
    named: dict[str, bytes] = {}
    archives: list[Part] = []
    misnamed = False  # a part named like an archive whose bytes are not one: the bundle is out of reach
    for part in parts:
        name = part.name
        if name in (CONFIG_FILE, WEIGHTS_FILE):
            if name in named:
                problems.add(f"{name} was sent twice")
            named[name] = part.data
        elif name.lower().endswith(PICKLE_SUFFIXES):
            problems.add(_pickle_refusal(name))
        elif archive_kind(part.data) is not None:
            archives.append(part)
        elif name.lower().endswith(ARCHIVE_SUFFIXES):  # named like an archive, but its bytes are not one
            plain_tar = len(part.data) > 262 and part.data[257:262] == b"ustar"  # POSIX tar's magic
            why = ("an uncompressed tar, which is not accepted: gzip it (tar czf bundle.tar.gz ...)" if plain_tar
                   else "not a zip or gzip-compressed tar archive (its first bytes are neither)")
            problems.add(f"{name[:100]!r} is {why}; send a .zip or .tar.gz of the bundle, or {CONFIG_FILE} + {WEIGHTS_FILE}")
            misnamed = True
        else:
            problems.add(f"unexpected file part {name[:100]!r}: send {CONFIG_FILE} + {WEIGHTS_FILE}, or one .zip / .tar.gz")
    if archives and named:
        problems.add("send either the two bundle files or one archive, not both")
    if len(archives) > 1:
        problems.add(f"{len(archives)} archives sent; send one")
    source = "files"
    ignored: list[str] = []  # an archive's macOS metadata, named only if a bundle file is then missing
    unreadable = bool(archives and named) or len(archives) > 1 or misnamed  # no way to tell which files are meant
    if len(archives) == 1 and not named:
        archive = archives[0]
        if len(archive.data) > limits.part_bytes:
            problems.add(f"archive {archive.name[:100]!r} is larger than {limits.part_bytes} bytes", too_large=True)
            unreadable = True
        else:
            source = archive_kind(archive.data) or "archive"
            unpacked = unpack(archive.data, limits.archive, f"archive {archive.name[:100]!r}")
            for problem in unpacked.problems:
                problems.add(problem, too_large=unpacked.too_large)
            unreadable = bool(unpacked.problems)
            named, ignored = _bundle_members(unpacked.files, problems)
    if unreadable:
        problems.raise_if_any()  # the files themselves are out of reach: nothing more to check

    # From here on every check runs, so one answer names every problem found.
    config, weights = named.get(CONFIG_FILE), named.get(WEIGHTS_FILE)
    if config is None:
        problems.add(_missing(CONFIG_FILE, ignored))
    elif len(config) > limits.config_bytes:
        problems.add(f"{CONFIG_FILE} is larger than the limit of {limits.config_bytes} bytes", too_large=True)
        config = None
    if weights is None:
        problems.add(_missing(WEIGHTS_FILE, ignored))
    elif len(weights) > limits.weights_bytes:
        problems.add(f"{WEIGHTS_FILE} is larger than the limit of {limits.weights_bytes} bytes", too_large=True)
        weights = None
    kind, cfg = "native", {}
    if config is not None:
        kind, cfg = _check_config(config, limits, problems)
    if weights is not None:
        for problem in check_safetensors(weights, limits.header, WEIGHTS_FILE):
            problems.add(problem, too_large="exceeds the limit" in problem)
    problems.raise_if_any()
    assert config is not None and weights is not None
    base_model = cfg.get("base_model_name_or_path") if kind == "peft" else None
    return BundleFiles(config=config, weights=weights, source=source, kind=kind,
                       base_model=base_model if isinstance(base_model, str) else None)


def _bundle_members(files: dict[str, bytes], problems: _Problems) -> tuple[dict[str, bytes], list[str]]:
    """The bundle files among an archive's members, all at its root or all in one folder, and the
    macOS metadata set aside (it neither counts as a member nor decides where the bundle is)."""
    ignored = [name for name in files if is_macos_metadata(name)]
    paths = {name: PurePosixPath(name).parts for name in files if not is_macos_metadata(name)}
    tops = {parts[0] for parts in paths.values() if len(parts) > 1}
    strip = len(tops) == 1 and all(len(parts) > 1 for parts in paths.values())
    named: dict[str, bytes] = {}
    for name in paths:
        data = files[name]
        parts = paths[name][1:] if strip else paths[name]
        inner = "/".join(parts)
        if len(parts) != 1:
            problems.add(f"archive member {name[:100]!r} is nested: put the bundle files at the archive's root or in one folder")
        elif inner in (CONFIG_FILE, WEIGHTS_FILE):
            named[inner] = data
        elif inner.lower().endswith(PICKLE_SUFFIXES):
            problems.add(_pickle_refusal(name))
        elif inner.lower() not in IGNORED_MEMBERS:
            problems.add(f"unexpected archive member {name[:100]!r}: a bundle holds only {CONFIG_FILE} and {WEIGHTS_FILE}")
    return named, ignored


def _missing(file: str, ignored: list[str]) -> str:
    """`file` is missing, and, where the archive has macOS metadata of that name, that it was
    seen and why it does not count (an archive of only `__MACOSX/` copies looks complete)."""
    seen = [name for name in ignored if PurePosixPath(name).name in (file, APPLEDOUBLE_PREFIX + file)]
    if not seen:
        return f"{file} is missing"
    return (f"{file} is missing: the archive has {seen[0][:100]!r}, which is macOS metadata (under {MACOS_FOLDER}/ "
            f"or named {APPLEDOUBLE_PREFIX}*) and ignored; put the file itself in the archive")


def _check_config(config: bytes, limits: UploadLimits, problems: _Problems) -> tuple[str, dict[str, Any]]:
    """That the config is a JSON object: which kind of bundle it describes, and the object ({} if none)."""
    try:
        data = json.loads(config.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except DuplicateKey as dup:
        problems.add(f"{CONFIG_FILE} names the key {str(dup.args[0])[:100]!r} twice in one object: "
                     "JSON readers disagree on which value counts, so give it once")
        return "native", {}
    except (UnicodeDecodeError, ValueError) as err:
        problems.add(f"{CONFIG_FILE} is not UTF-8 JSON ({err})")
        return "native", {}
    except RecursionError:  # nested past the parser's stack: no real config nests
        problems.add(f"{CONFIG_FILE} is nested too deeply to be a bundle config")
        return "native", {}
    if not isinstance(data, dict):
        problems.add(f"{CONFIG_FILE} must hold a JSON object, not {type(data).__name__}")
        return "native", {}
    if "peft_type" in data:
        _check_peft_type(data["peft_type"], problems)
        return "peft", data  # PEFT configs may lack a fingerprint (their own format has none)
    peft_keys = [k for k in PEFT_CONFIG_KEYS if k in data]
    if peft_keys and not any(k in data for k in ("format", "methods", "labels", "backbone")):
        problems.add(f"{CONFIG_FILE} looks like a Hugging Face PEFT adapter config (it has {', '.join(peft_keys[:3])}) "
                     "but has no 'peft_type': add the one the adapter was made with "
                     f"({', '.join(map(json.dumps, PEFT_TYPES))}), as PEFT's save_pretrained writes it")
        return "peft", data
    fingerprint = (data.get("backbone") or {}).get("fingerprint") if isinstance(data.get("backbone"), dict) else None
    if limits.require_fingerprint and not fingerprint:
        problems.add(f"{CONFIG_FILE} has no backbone.fingerprint: say which backbone the task was trained on")
    return "native", data


def _check_peft_type(peft_type: Any, problems: _Problems) -> None:
    """A spelling of a served type that PEFT itself refuses ("lora"): an adapter PEFT cannot load is
    not stored. (The engine still reads such a bundle already stored: `peft_import.from_peft`.)"""
    if isinstance(peft_type, str) and peft_type != peft_type.upper() and peft_type.upper() in PEFT_TYPES:
        problems.add(f"{CONFIG_FILE} has \"peft_type\": {json.dumps(peft_type)}, a spelling PEFT itself refuses (it reads "
                     f"only its upper-case type names): write \"peft_type\": \"{peft_type.upper()}\", as save_pretrained does")


def _pickle_refusal(name: str) -> str:
    return (f"{name[:100]!r} is a pickle format; only safetensors weights are accepted (pickles run code "
            "when loaded). PEFT: save_pretrained(..., safe_serialization=True)")
