"""End to end on the real bundled all-MiniLM-L6-v2: train two steps, publish, serve, compare."""
from __future__ import annotations

import pytest

from training.config import PrefixConfig, TrainConfig
from training.data import load_splits
from training.publish import save_to_store
from training.trainer import train
from tests.training.conftest import assert_served_equals_trained, rows, write_csv


@pytest.mark.slow
@pytest.mark.parametrize("method", ("lora", "prefix"))
def test_minilm_served_equals_trained(method, minilm_backbone, tmp_path):
    splits = load_splits(write_csv(tmp_path / "train.csv", rows(16, 1)), write_csv(tmp_path / "dev.csv", rows(8, 2)))
    cfg = TrainConfig(method=method, max_steps=2, batch_size=8, max_length=32, prefix=PrefixConfig(8))
    result = train(splits, cfg, name=f"minilm-{method}", backbone=minilm_backbone, progress=False)
    save_to_store(result, tmp_path / "store")
    assert_served_equals_trained(minilm_backbone, tmp_path / "store", result.name, list(splits.dev.texts), result.logits)
