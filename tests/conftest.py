"""Shared fixtures. Tests never reach a model hub: everything loads from local folders."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_backbone():
    """The real bundled all-MiniLM-L6-v2, fp32 on CPU (loaded once per test session)."""
    from service.engine.backbone import load_backbone

    return load_backbone(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def minilm_engine(minilm_backbone):
    from service.engine.engine import Engine

    return Engine(minilm_backbone)
