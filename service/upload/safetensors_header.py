"""Checking an uploaded safetensors file from its header alone, before any tensor is read.

Layout: an 8-byte little-endian header length N, N bytes of JSON, then the data section:
    {"<tensor>": {"dtype": "F32", "shape": [r, c], "data_offsets": [begin, end]}, ...,
     "__metadata__": {"<str>": "<str>"}}
Offsets are relative to the data section. We require what the format promises and a hostile
file may break: a bounded header, known dtypes, `end - begin == prod(shape) * itemsize`, every
range inside the data section, no two ranges overlapping, and the ranges covering the data
section exactly (no hidden bytes). Only then does the safetensors library touch the tensors.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

# Task weights are floating point; no integer, bool or 8-bit float tensors belong in a bundle.
ALLOWED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
MAX_NAME_CHARS = 512
_PICKLE_HINTS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # pickle protocol 2-5 opcodes
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip of pickles)
_MAX_OFFSET = 2**64 - 1  # data_offsets are u64 in the format


@dataclass(frozen=True)
class HeaderLimits:
    max_header_bytes: int
    max_tensors: int


def check_safetensors(data: bytes, limits: HeaderLimits, name: str = "adapter_model.safetensors") -> list[str]:
    """Every problem with the file's framing and header; [] when it is sound."""
    if data[:4] == _ZIP_MAGIC or data[:2] in _PICKLE_HINTS:
        return [f"{name} looks like a pickle / torch.save file; only safetensors is accepted (pickles run code when loaded)"]
    if len(data) < 8:
        return [f"{name} is {len(data)} bytes: too short for a safetensors header"]
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):  # checked first: random bytes read as a length are rarely small
        return [f"{name} is not a safetensors file: its first 8 bytes give a header of {header_len} bytes, "
                f"but only {len(data) - 8} bytes follow"]
    if header_len > limits.max_header_bytes:
        return [f"{name}: header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}"]
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except DuplicateKey as dup:
        return [f"{name}: header names tensor {dup.args[0]!r} twice"]
    except (UnicodeDecodeError, ValueError) as err:
        return [f"{name}: header is not UTF-8 JSON ({err})"]
    except RecursionError:  # "[[[[..." nested past the parser's stack: no real header nests
        return [f"{name}: header JSON is nested too deeply"]
    if not isinstance(header, dict):
        return [f"{name}: header must be a JSON object"]
    return _check_entries(header, len(data) - 8 - header_len, limits, name)


def _check_entries(header: dict[str, Any], data_len: int, limits: HeaderLimits, name: str) -> list[str]:
    problems: list[str] = []
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        problems.append(f"{name}: __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        return problems + [f"{name}: {len(header)} tensors exceed the limit of {limits.max_tensors}"]
    # Every in-bounds range a tensor claims, its entry refused or not: a tensor refused for its
    # dtype or shape still owns its bytes, and reporting them as belonging to no tensor would
    # name a second problem that is not there.
    ranges: list[tuple[int, int, str]] = []
    unplaced = False  # an entry whose range cannot be read: gaps then prove no hidden bytes
    for tensor, entry in header.items():
        where = f"{name}: tensor {tensor[:80]!r}"
        if len(tensor) > MAX_NAME_CHARS:
            problems.append(f"{where}...: name longer than {MAX_NAME_CHARS} characters")
            unplaced = True
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            problems.append(f"{where}: entry must have exactly dtype, shape and data_offsets")
            unplaced = True
            continue
        offsets = entry["data_offsets"]
        if _is_pair_of_counts(offsets) and offsets[0] <= offsets[1] <= data_len:
            ranges.append((offsets[0], offsets[1], tensor))
        else:
            unplaced = True
        problem = _entry_problem(entry["dtype"], entry["shape"], offsets, data_len)
        if problem:
            problems.append(f"{where}: {problem}")
    covered = 0
    for begin, end, tensor in sorted(ranges):
        if begin < covered:
            problems.append(f"{name}: tensor {tensor[:80]!r} overlaps another tensor's data (offset {begin} < {covered})")
        elif begin > covered and not unplaced:
            problems.append(f"{name}: {begin - covered} bytes at offset {covered} belong to no tensor")
        covered = max(covered, end)
    if not problems and covered != data_len:
        problems.append(f"{name}: {data_len - covered} trailing bytes after the last tensor")
    return problems


def _entry_problem(dtype: Any, shape: Any, offsets: Any, data_len: int) -> str | None:
    """What is wrong with one tensor's dtype, shape and data_offsets, or None."""
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        return f"dtype {dtype!r} is not allowed (only {', '.join(ALLOWED_DTYPES)})"
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        return "shape must be a list of non-negative integers"
    if not _is_pair_of_counts(offsets):
        return "data_offsets must be two non-negative integers"
    begin, end = offsets
    if not begin <= end <= data_len:
        return f"data_offsets [{begin}, {end}] fall outside the {data_len}-byte data section"
    expected = _byte_count(shape, ALLOWED_DTYPES[dtype])
    if expected is None:
        return f"shape {_shown(shape)} in {dtype} is larger than a safetensors file can hold (2**64 bytes)"
    if end - begin != expected:
        return f"{end - begin} bytes of data for shape {_shown(shape)} in {dtype} ({expected} expected)"
    return None


def _byte_count(shape: list[int], itemsize: int) -> int | None:
    """The bytes a tensor of `shape` takes, or None past what safetensors' 64-bit offsets reach.
    JSON dimensions have no bound: the product of a few hundred 4000-digit ones took seconds, and
    printing one of over 4300 digits raised."""
    if 0 in shape:
        return 0
    count = itemsize
    for dim in shape:
        count *= dim
        if count > _MAX_OFFSET:
            return None
    return count


def _shown(shape: list[int]) -> str:
    text = str(shape)  # each dimension has at most 4300 digits (JSON's own limit), so this never raises
    return text if len(text) <= 200 else f"[{len(shape)} dimensions, the largest {len(str(max(shape)))} digits long]"


def _is_pair_of_counts(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_count(v) for v in value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class DuplicateKey(ValueError):
    """A JSON object names one key twice (args[0]: the key). Parsers disagree on which value
    counts (Python's json keeps the last), so an uploaded file that does so is refused."""


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for json.loads: DuplicateKey instead of silently keeping the last."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen
