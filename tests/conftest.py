"""Shared fixtures. Tests never reach a model hub: everything loads from local folders.
`gpu` tests are skipped where there is no CUDA device."""
from __future__ import annotations

import os

import pytest

# Set before anything imports transformers / huggingface_hub: the suite runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return  # do not import torch just to find out
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_backbone():
    """The real bundled all-MiniLM-L6-v2, fp32 on CPU (loaded once per test session)."""
    from service.engine.backbone import load_backbone

    return load_backbone(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def minilm_engine(minilm_backbone):
    from service.engine.engine import Engine

    return Engine(minilm_backbone)
