"""bench/gpu_check.sh, the one prepared GPU check, runs every `gpu` test there is."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_file_with_gpu_tests():
    marked = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", p.read_text())}
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    (line,) = [ln for ln in script.splitlines() if "pytest" in ln and "-m gpu" in ln and not ln.startswith("#")]
    listed = set(re.findall(r"tests/\S+\.py", line))
    assert "tests/engine/test_gpu.py" in marked  # the scan finds what it should
    assert listed == marked, f"bench/gpu_check.sh runs {sorted(listed)}; files with gpu tests: {sorted(marked)}"


def test_what_the_gpu_check_runs_needs_no_web_stack(tmp_path):
    """The lent GPU machines have torch and transformers, not pydantic or fastapi: the engine, the
    cache and publishing a bundle (as the benchmarks do, activation and history included) must not
    import them. A real publish and load on the tiny backbone, in a fresh interpreter."""
    import os
    import subprocess
    import sys

    code = f"""
import sys
from pathlib import Path
import torch
from service.cache import TaskCache
from service.engine.backbone import load_backbone
from service.engine.engine import Engine
from service.engine.types import TaskKey
from tests.factories import publish, random_head, random_lora, save_tiny_backbone
root = Path({str(tmp_path)!r})
engine = Engine(load_backbone(save_tiny_backbone("bert", root / "bb"), device="cpu", dtype="float32"))
g = torch.Generator().manual_seed(0)
info = engine.backbone.info
v = publish(root / "store", "t", {{"lora": random_lora(info, g), "head": random_head(info, g)}}, ["a", "b"],
            max_length=16, fingerprint=info.fingerprint)
engine.load_task(root / "store" / "t" / v, TaskKey("t", v))
assert (root / "store" / "t" / "HISTORY.json").exists()
web = sorted(m for m in ("pydantic", "pydantic_settings", "fastapi", "starlette", "uvicorn") if m in sys.modules)
assert not web, web
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
