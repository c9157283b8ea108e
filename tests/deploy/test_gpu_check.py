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
