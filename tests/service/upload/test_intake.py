"""Archives made on macOS: the metadata macOS adds (`__MACOSX/`, AppleDouble `._<name>`,
`.DS_Store`) is ignored, never read as a bundle file nor stored, while the archive's own checks
(names, types, member count, sizes) still count it as any member."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.backbone import load_backbone
from service.engine.engine import Engine
from service.errors import UploadRejected
from service.settings import Settings
from service.upload import Part, UploadLimits, assemble
from tests.factories import save_tiny_backbone
from tests.hotswap.bundles import CONFIG, WEIGHTS, make_bundle, raw_safetensors, tar_gz_bytes, tree_hash, zip_bytes
from tests.service.api.harness import wait_ready

KiB = 1024
LIMITS = dict(upload_max_weights_bytes=64 * KiB, upload_max_config_bytes=8 * KiB, upload_max_bytes=200 * KiB,
              upload_max_uncompressed_bytes=100 * KiB, upload_max_archive_members=12, upload_max_compression_ratio=200.0)
CFG = b'{"labels": ["neg", "pos"], "backbone": {"fingerprint": "sha256:x"}}'
WTS = raw_safetensors({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
# What AppleDouble files start with (magic 0x00051607, version 2): the bytes are never read.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\0" * 64
# Past the 100 KiB uncompressed limit, but compressing only ~2x (under the ratio cap, and the archive
# under the part limit): only the total can refuse it.
BIG = random.Random(0).randbytes(51 * KiB).hex().encode()


def _limits() -> UploadLimits:
    return UploadLimits.from_settings(Settings(store=tempfile.gettempdir(), **LIMITS))


def _zip(members: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    """As Finder's Compress writes it: directory entries first, then the files."""
    return zip_bytes({name: b"" for name in dirs} | members)


FINDER_ZIP = _zip({f"bundle/{CONFIG}": CFG, f"bundle/{WEIGHTS}": WTS, "bundle/.DS_Store": b"\0\0\0\1Bud1",
                   f"__MACOSX/bundle/._{CONFIG}": APPLEDOUBLE, f"__MACOSX/bundle/._{WEIGHTS}": APPLEDOUBLE},
                  dirs=("bundle/", "__MACOSX/", "__MACOSX/bundle/"))


@pytest.mark.parametrize("blob", [
    pytest.param(FINDER_ZIP, id="Finder zip of a folder"),
    pytest.param(_zip({CONFIG: CFG, WEIGHTS: WTS, f"__MACOSX/._{CONFIG}": APPLEDOUBLE, f"__MACOSX/._{WEIGHTS}": APPLEDOUBLE,
                       ".DS_Store": b"x"}), id="Finder zip of the two files"),
    pytest.param(tar_gz_bytes({f"bundle/._{CONFIG}": APPLEDOUBLE, f"bundle/{CONFIG}": CFG, f"bundle/._{WEIGHTS}": APPLEDOUBLE,
                               f"bundle/{WEIGHTS}": WTS, "._bundle": APPLEDOUBLE}), id="bsdtar tar.gz of a folder"),
    pytest.param(_zip({f"bundle/{CONFIG}": CFG, f"bundle/{WEIGHTS}": WTS, "__MACOSX/bundle/adapter_model.bin": b"\x80\x04junk",
                       f"__MACOSX/{WEIGHTS}": b"not these weights"}), id="bundle-like names under __MACOSX"),
])
def test_macos_metadata_in_an_archive_is_ignored(blob: bytes) -> None:
    files = assemble([Part("bundle", "bundle.zip", blob)], _limits())
    assert (files.config, files.weights) == (CFG, WTS)


# What a size cap's message adds when macOS metadata is part of what crossed it.
MACOS_SHARE = ("macOS metadata (__MACOSX/, ._*, .DS_Store), which counts too: make the archive without it "
               "(zip -r rather than Finder's Compress; COPYFILE_DISABLE=1 for tar)")
MACOS_BYTES = len(BIG) + len(APPLEDOUBLE)


@pytest.mark.parametrize("blob, message, too_large", [
    # The junk is an archive member like any other for the archive's own checks; a cap it helped
    # cross says how much of the archive it was.
    (_zip({CONFIG: CFG, WEIGHTS: WTS, "__MACOSX/._big": BIG, f"__MACOSX/._{CONFIG}": APPLEDOUBLE}),
     f"declares {MACOS_BYTES + len(CFG) + len(WTS)} bytes uncompressed, more than the limit of 102400; "
     f"{MACOS_BYTES} of those bytes are {MACOS_SHARE}", True),
    (_zip({CONFIG: CFG, WEIGHTS: WTS} | {f"__MACOSX/._{k}": b"x" for k in range(11)}),
     f"has 13 members, more than the limit of 12; 11 of them are {MACOS_SHARE}", True),
    (tar_gz_bytes({CONFIG: CFG, WEIGHTS: WTS} | {f"._{k}": b"x" for k in range(11)}),
     f"has more than 12 members; 11 of the first 13 members are {MACOS_SHARE}", True),
    (tar_gz_bytes({CONFIG: CFG, WEIGHTS: WTS, f"._{CONFIG}": APPLEDOUBLE, ".DS_Store": BIG}),
     f"holds more than 102400 bytes uncompressed; {MACOS_BYTES} of the first {MACOS_BYTES + len(CFG) + len(WTS)} "
     f"bytes are {MACOS_SHARE}", True),
    (_zip({CONFIG: CFG, WEIGHTS: WTS, "__MACOSX/../x": b"x"}), "contains '..'", False),
    (zip_bytes({CONFIG: CFG, WEIGHTS: WTS}, symlinks={f"__MACOSX/._{CONFIG}": "/etc/passwd"}), "symbolic link", False),
    (tar_gz_bytes({CONFIG: CFG, WEIGHTS: WTS, f"._{CONFIG}": BIG}), "more than 102400 bytes", True),
])
def test_macos_metadata_still_counts_for_the_archive_checks(blob: bytes, message: str, too_large: bool) -> None:
    with pytest.raises(UploadRejected) as refused:
        assemble([Part("bundle", "bundle.zip", blob)], _limits())
    assert any(message in problem for problem in refused.value.problems), refused.value.problems
    assert refused.value.status_code == (413 if too_large else 422)


@pytest.mark.parametrize("blob", [_zip({CONFIG: CFG, WEIGHTS: WTS, "big": BIG}), tar_gz_bytes({CONFIG: CFG, WEIGHTS: WTS, "big": BIG}),
                                  _zip({CONFIG: CFG, WEIGHTS: WTS} | {f"x{k}": b"x" for k in range(11)})],
                         ids=["zip bytes", "tar.gz bytes", "zip members"])
def test_a_size_cap_without_macos_metadata_does_not_mention_it(blob: bytes) -> None:
    with pytest.raises(UploadRejected) as refused:
        assemble([Part("bundle", "bundle.zip", blob)], _limits())
    assert refused.value.status_code == 413 and not any("macOS" in problem for problem in refused.value.problems)


def test_metadata_alone_is_no_bundle_and_the_refusal_says_what_it_saw() -> None:
    blob = _zip({f"__MACOSX/{CONFIG}": CFG, f"._{WEIGHTS}": APPLEDOUBLE, "__MACOSX/._other": APPLEDOUBLE})
    with pytest.raises(UploadRejected) as refused:
        assemble([Part("bundle", "bundle.zip", blob)], _limits())
    ignored = "which is macOS metadata (under __MACOSX/ or named ._*) and ignored; put the file itself in the archive"
    assert refused.value.problems == [f"{CONFIG} is missing: the archive has '__MACOSX/{CONFIG}', {ignored}",
                                      f"{WEIGHTS} is missing: the archive has '._{WEIGHTS}', {ignored}"]
    with pytest.raises(UploadRejected) as refused:  # nothing of that name: the plain message
        assemble([Part("bundle", "bundle.zip", _zip({CONFIG: CFG, "__MACOSX/._other": APPLEDOUBLE}))], _limits())
    assert refused.value.problems == [f"{WEIGHTS} is missing"]


@pytest.mark.parametrize("pack", [_zip, tar_gz_bytes], ids=["zip", "tar.gz"])
@pytest.mark.parametrize("first, second", [(CONFIG, f"./{CONFIG}"), (f"b/{CONFIG}", f"b//{CONFIG}"),
                                           (f"b/{CONFIG}", f"b/./{CONFIG}")])
def test_one_file_under_two_spellings_is_refused(pack, first: str, second: str) -> None:
    """Names are compared as the path they extract to: otherwise an archive could hold two
    different configs, and which one a tool extracts (or the server keeps) would be up to it."""
    folder = first.rpartition("/")[0]
    weights = f"{folder}/{WEIGHTS}" if folder else WEIGHTS
    blob = pack({first: CFG, weights: WTS, second: CFG.replace(b"neg", b"bad")})
    with pytest.raises(UploadRejected) as refused:
        assemble([Part("bundle", "bundle.zip", blob)], _limits())
    assert any(f"member {second!r} appears twice (also as {first!r})" in p for p in refused.value.problems), \
        refused.value.problems


def test_a_finder_zip_is_stored_without_its_metadata(tmp_path: Path) -> None:
    backbone_dir = save_tiny_backbone("bert", tmp_path / "backbone")
    engine = Engine(load_backbone(backbone_dir, device="cpu", dtype="float32"))
    config, weights = make_bundle(engine.backbone.info, seed=1)
    blob = _zip({f"bundle/{CONFIG}": config, f"bundle/{WEIGHTS}": weights, "bundle/.DS_Store": b"\0\0\0\1Bud1",
                 f"__MACOSX/bundle/._{CONFIG}": APPLEDOUBLE, f"__MACOSX/bundle/._{WEIGHTS}": APPLEDOUBLE},
                dirs=("bundle/", "__MACOSX/", "__MACOSX/bundle/"))
    store = tmp_path / "store"
    store.mkdir()
    with TestClient(create_app(Settings(store=store, max_wait_ms=1.0, **LIMITS), engine=engine)) as client:
        wait_ready(client)
        response = client.post("/v1/tasks/sentiment/versions", files={"bundle": ("bundle.zip", blob)})
        assert response.status_code == 201, response.text
        version = response.json()["version"]
        assert sorted(p.name for p in (store / "sentiment" / version).iterdir()) == [CONFIG, WEIGHTS]
        before = tree_hash(store)
        too_big = _zip({CONFIG: config, WEIGHTS: weights, "__MACOSX/._big": BIG})
        assert client.post("/v1/tasks/sentiment/versions", files={"bundle": ("b.zip", too_big)}).status_code == 413
        assert tree_hash(store) == before
