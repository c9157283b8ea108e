"""Reading an uploaded `.zip` or `.tar.gz` into memory, refusing anything an archive can hide.

Nothing is extracted to disk. Every member is checked (name, type) before any is read; sizes are
counted while decompressing and never taken from the archive's own headers, which can lie:
* names: no absolute paths, no `..`, no backslashes or NUL, no duplicates;
* types: regular files and directories only (no symlinks, hard links, devices, FIFOs);
* counts: at most `max_members` entries;
* sizes: at most `max_uncompressed_bytes` in total (zip-bomb guard) and at most
  `max_ratio` times the compressed size (per zip member, and for the whole tar.gz stream).
"""
from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

# What macOS adds to an archive it makes (Finder's Compress, `ditto -c -k`, bsdtar): the AppleDouble
# metadata of each file, `._<name>`, under a top-level `__MACOSX/` folder (zip) or beside the file
# (tar), and Finder's `.DS_Store`. Counted here as any member (names, types, count, sizes), and named
# when a cap is crossed; `intake` then drops it, never reading it as a bundle file.
MACOS_FOLDER = "__MACOSX"
MACOS_FILES = ".DS_Store"
APPLEDOUBLE_PREFIX = "._"

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_uncompressed_bytes: int
    max_ratio: float


@dataclass
class Unpacked:
    """Regular files by archive path, and every problem found (files is empty when there are any)."""

    files: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    too_large: bool = False  # a size limit was crossed (the answer is 413)


def archive_kind(data: bytes) -> str | None:
    """`zip`, `tar.gz` or None, judged by magic bytes (never by the client's file name)."""
    if data.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC)):
        return "zip"
    if data.startswith(GZIP_MAGIC):
        return "tar.gz"
    return None


def unpack(data: bytes, limits: ArchiveLimits, label: str) -> Unpacked:
    kind = archive_kind(data)
    if kind == "zip":
        return _unzip(data, limits, label)
    if kind == "tar.gz":
        return _untar(data, limits, label)
    return Unpacked(problems=[f"{label} is neither a zip nor a gzip-compressed tar archive"])


def is_macos_metadata(name: str) -> bool:
    """Whether an archive member is metadata macOS adds (`__MACOSX/...`, `._*`, `.DS_Store`)."""
    parts = PurePosixPath(name).parts
    return bool(parts) and (parts[0] == MACOS_FOLDER or parts[-1] == MACOS_FILES
                            or parts[-1].startswith(APPLEDOUBLE_PREFIX))


def _macos_share(amount: int, unit: str) -> str:
    """What a size-cap message adds when macOS metadata pushed the archive past it: `amount` of
    the counted members or bytes were that metadata (nothing when none were)."""
    if not amount:
        return ""
    return (f"; {amount} {unit} macOS metadata ({MACOS_FOLDER}/, {APPLEDOUBLE_PREFIX}*, {MACOS_FILES}), which counts "
            "too: make the archive without it (zip -r rather than Finder's Compress; COPYFILE_DISABLE=1 for tar)")


def check_member_name(name: str) -> str | None:
    """Why an archive member name is unsafe, or None."""
    if not name:
        return "has an empty name"
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..'"
    return None


def _seen_twice(name: str, seen: dict[str, str]) -> str | None:
    """Why `name` duplicates an earlier member, or None; records it in `seen`. Names are compared
    as the path they extract to: `./x`, `a//x` and `a/./x` are `x`, `a/x` and `a/x`, so an archive
    cannot hold two different copies of one bundle file (which one counts would be up to the tool)."""
    path = str(PurePosixPath(name))
    first = seen.get(path)
    if first is None:
        seen[path] = name
        return None
    return "appears twice" if first.rstrip("/") == name.rstrip("/") else f"appears twice (also as {first[:100]!r})"


def _unzip(data: bytes, limits: ArchiveLimits, label: str) -> Unpacked:
    out = Unpacked()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        return Unpacked(problems=[f"{label} is not a readable zip archive ({err})"])
    if len(infos) > limits.max_members:
        macos = sum(is_macos_metadata(info.filename) for info in infos)
        out.problems.append(f"{label} has {len(infos)} members, more than the limit of {limits.max_members}"
                            + _macos_share(macos, "of them are"))
        out.too_large = True
        return out
    declared = macos_declared = 0
    seen: dict[str, str] = {}
    for info in infos:
        where = f"{label}: member {info.filename[:100]!r}"
        reason = check_member_name(info.filename) or _seen_twice(info.filename, seen)
        if reason:
            out.problems.append(f"{where} {reason}")
        mode = info.external_attr >> 16
        # Only the file-type bits count: writers that store permissions alone (Python's
        # ZipFile.writestr: 0o600) or no mode at all (DOS-style zips) mean a regular file.
        if stat.S_ISLNK(mode):
            out.problems.append(f"{where} is a symbolic link")
        elif stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            out.problems.append(f"{where} is a device, FIFO or socket, not a regular file")
        if info.flag_bits & 0x1:
            out.problems.append(f"{where} is encrypted")
        if not info.filename or info.is_dir():  # is_dir() itself fails on an empty name
            continue
        declared += info.file_size
        macos_declared += info.file_size if is_macos_metadata(info.filename) else 0
        if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
            out.problems.append(
                f"{where} expands {info.file_size / info.compress_size:.0f}x, more than the limit of "
                f"{limits.max_ratio:g}x (zip bomb?)"
            )
            out.too_large = True
    if declared > limits.max_uncompressed_bytes:
        out.problems.append(f"{label} declares {declared} bytes uncompressed, more than the limit of {limits.max_uncompressed_bytes}"
                            + _macos_share(macos_declared, "of those bytes are"))
        out.too_large = True
    if out.problems:
        return out
    total = macos_total = 0
    for info in infos:
        if info.is_dir():
            continue
        # Read with a running count: the sizes in the headers are only claims.
        chunks = []
        macos = is_macos_metadata(info.filename)
        try:
            with archive.open(info) as member:
                while chunk := member.read(_CHUNK):
                    total += len(chunk)
                    macos_total += len(chunk) if macos else 0
                    if total > limits.max_uncompressed_bytes:
                        out.problems.append(
                            f"{label} expands past {limits.max_uncompressed_bytes} bytes while reading "
                            f"{info.filename[:100]!r} (its headers under-declare: zip bomb?)"
                            + _macos_share(macos_total, "of the bytes read are")
                        )
                        out.too_large = True
                        out.files.clear()
                        return out
                    chunks.append(chunk)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, NotImplementedError) as err:
            out.problems.append(f"{label}: member {info.filename[:100]!r} cannot be decompressed ({err})")
            out.files.clear()
            return out
        out.files[info.filename] = b"".join(chunks)
    return out


class _TooBig(Exception):
    pass


class _CountingReader(io.RawIOBase):
    """A read-only stream over a gzip stream that stops once `limit` decompressed bytes were read."""

    def __init__(self, inner: gzip.GzipFile, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.inner.read(min(len(buffer), _CHUNK))
        self.count += len(data)
        if self.count > self.limit:
            raise _TooBig()
        buffer[: len(data)] = data
        return len(data)


def _untar(data: bytes, limits: ArchiveLimits, label: str) -> Unpacked:
    out = Unpacked()
    # The tar stream (headers and padding included) may not expand past the size limit plus
    # the headers of max_members entries, nor past max_ratio times the compressed upload.
    cap = min(limits.max_uncompressed_bytes + 1024 * (limits.max_members + 2), int(len(data) * limits.max_ratio))
    reader = _CountingReader(gzip.GzipFile(fileobj=io.BytesIO(data)), cap)
    members = macos_members = 0
    payload = macos_payload = 0
    seen: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|") as archive:
            for member in archive:  # stream mode: one header at a time, never the whole index first
                members += 1
                macos = is_macos_metadata(member.name)
                macos_members += macos
                if members > limits.max_members:
                    out.problems.append(f"{label} has more than {limits.max_members} members"
                                        + _macos_share(macos_members, f"of the first {members} members are"))
                    out.too_large = True
                    break
                where = f"{label}: member {member.name[:100]!r}"
                reason = check_member_name(member.name) or _seen_twice(member.name, seen)
                if reason:
                    out.problems.append(f"{where} {reason}")
                if member.issym() or member.islnk():
                    out.problems.append(f"{where} is a {'symbolic' if member.issym() else 'hard'} link")
                    continue
                if member.ischr() or member.isblk() or member.isfifo():
                    out.problems.append(f"{where} is a device or FIFO, not a regular file")
                    continue
                if member.isdir():
                    continue
                if not member.isreg():
                    out.problems.append(f"{where} is not a regular file")
                    continue
                payload += member.size
                macos_payload += member.size if macos else 0
                if payload > limits.max_uncompressed_bytes:
                    out.problems.append(f"{label} holds more than {limits.max_uncompressed_bytes} bytes uncompressed"
                                        + _macos_share(macos_payload, f"of the first {payload} bytes are"))
                    out.too_large = True
                    break
                if reason:
                    continue
                extracted = archive.extractfile(member)
                files[member.name] = extracted.read() if extracted is not None else b""
    except _TooBig:
        out.problems.append(
            f"{label} decompresses past {cap} bytes: more than the size limit "
            f"({limits.max_uncompressed_bytes}) or {limits.max_ratio:g}x its compressed size (zip bomb?)"
            + _macos_share(macos_payload, "bytes of its files are")
        )
        out.too_large = True
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as err:
        out.problems.append(f"{label} is not a readable tar.gz archive ({type(err).__name__}: {err})")
    if not out.problems:
        ratio = reader.count / max(1, len(data))
        if ratio > limits.max_ratio:
            out.problems.append(f"{label} expands {ratio:.0f}x, more than the limit of {limits.max_ratio:g}x (zip bomb?)")
            out.too_large = True
    if not out.problems:
        out.files = files
    return out
