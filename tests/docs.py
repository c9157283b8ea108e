"""The documents a user reads, for the tests that hold them to the code (tests/service/test_*_doc.py)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "adapters_store" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
