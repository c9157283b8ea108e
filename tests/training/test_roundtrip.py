"""Served == trained: a task trained here, written as a bundle and loaded by the engine, gives the
trainer's own logits for the same inputs, for every method (and the full fine-tuning baseline)."""
from __future__ import annotations

import json

import pytest
import torch

from service.engine.backbone import load_backbone
from service.engine.engine import Engine
from service.engine.families import SITES
from service.engine.types import ClassifyItem
from training.config import AdapterConfig, LoraConfig, PrefixConfig
from training.data import data_hash, load_splits
from training.evaluate import load_published
from training.publish import PublishError, save_full_result, save_to_store
from training.trainer import train
from tests.training.conftest import tiny_config

ATOL = 1e-5  # fp32

CASES = {
    "lora": dict(),
    "lora-all-sites": dict(lora=LoraConfig(r=2, alpha=5.0, targets=SITES)),
    "adapter": dict(),
    "adapter-houlsby-gelu": dict(adapter=AdapterConfig(kind="houlsby", bottleneck=3, activation="gelu")),
    "prefix": dict(),
    "prefix-projection": dict(prefix=PrefixConfig(4, projection=16)),
    "prefix-projection-ema": dict(prefix=PrefixConfig(4, projection=16), ema=0.9),
    "prefix-unshifted": dict(prefix=PrefixConfig(4, shift_positions=False)),
    "prompt": dict(),
    "head": dict(),
    "head-pooler-dense": dict(pooling="pooler", head_dense=True),
    "lora-cls": dict(pooling="cls"),
}


def served_logits(engine: Engine, task, texts, pairs=None) -> torch.Tensor:
    pairs = pairs or [None] * len(texts)
    preds = engine.classify([ClassifyItem(task, t, p) for t, p in zip(texts, pairs)])
    return torch.tensor([p.logits for p in preds])


@pytest.mark.parametrize("case", list(CASES))
def test_served_equals_trained(case, tiny, csvs, tmp_path):
    method = case.split("-")[0]
    splits = load_splits(csvs["train"], csvs["dev"])
    result = train(splits, tiny_config(method, **CASES[case]), name=f"rt-{case}", backbone=tiny, progress=False)
    assert result.steps == 2
    version = save_to_store(result, tmp_path)

    engine = Engine(tiny)  # a fresh engine, as the service would have
    task = load_published(engine, tmp_path, result.name)
    assert task.key.version == version and task.spec.methods == tuple(result.weights)
    texts = list(splits.dev.texts)
    served = served_logits(engine, task, texts)
    assert served.shape == (len(texts), 2)
    torch.testing.assert_close(served, result.logits(texts), atol=ATOL, rtol=0)


def test_pair_task_round_trip(tiny, csvs, tmp_path):
    splits = load_splits(csvs["pair_train"], csvs["pair_dev"])
    result = train(splits, tiny_config("lora"), name="rt-pairs", backbone=tiny, progress=False)
    save_to_store(result, tmp_path)
    task = load_published(Engine(tiny), tmp_path, "rt-pairs")
    assert task.input_kind == "pair"
    texts, pairs = list(splits.dev.texts), list(splits.dev.text_pairs)
    torch.testing.assert_close(served_logits(Engine(tiny), task, texts, pairs), result.logits(texts, pairs), atol=ATOL, rtol=0)
    # the second text matters: dropping it changes the answer
    assert not torch.allclose(result.logits(texts, pairs), result.logits(texts, [p + " not" for p in pairs]), atol=1e-4)


def test_full_baseline_round_trip(tiny, csvs, tmp_path):
    splits = load_splits(csvs["train"], csvs["dev"])
    result = train(splits, tiny_config("full"), name="rt-full", backbone=tiny, progress=False)
    with pytest.raises(PublishError, match="--publish-full"):
        save_to_store(result, tmp_path / "store")
    art = save_full_result(result, tmp_path / "full")
    tuned = load_backbone(art.backbone_dir, device="cpu", dtype="float32")
    assert tuned.fingerprint != tiny.fingerprint  # it is a different backbone now
    engine = Engine(tuned)
    task = load_published(engine, art.store, "rt-full")
    texts = list(splits.dev.texts)
    torch.testing.assert_close(served_logits(engine, task, texts), result.logits(texts), atol=ATOL, rtol=0)
    # the head is fingerprinted to the tuned backbone: the shared one refuses it
    from service.errors import BundleError

    with pytest.raises(BundleError, match="trained on backbone"):
        load_published(Engine(tiny), art.store, "rt-full")


def test_bundle_records_how_it_was_trained(tiny, csvs, tmp_path):
    splits = load_splits(csvs["train"], csvs["dev"], csvs["test"])
    result = train(splits, tiny_config("lora", seed=7), name="rec", backbone=tiny, progress=False)
    version = save_to_store(result, tmp_path)
    cfg = json.loads((tmp_path / "rec" / version / "adapter_config.json").read_text())
    assert cfg["labels"] == ["neg", "pos"] and cfg["input_kind"] == "single" and cfg["max_length"] == 24
    assert cfg["backbone"]["fingerprint"] == tiny.fingerprint
    t = cfg["training"]
    assert (t["method"], t["seed"], t["lr"], t["steps"]) == ("lora", 7, 5e-4, 2)
    assert t["hyperparameters"]["lora"] == {
        "r": 8, "alpha": 8.0, "targets": ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]}
    assert t["data_hash"] == data_hash([csvs["train"], csvs["dev"], csvs["test"]])
    assert t["data"]["train"] == {"file": "train.csv", "sha256": data_hash(csvs["train"]), "rows": 40}
    assert "train_seconds" not in t and "created" not in cfg and all("seconds" not in e for e in t["history"])
    assert cfg["metrics"]["dev"]["accuracy"] == result.dev_metrics.accuracy
    assert set(cfg["metrics"]["dev"]["per_class"]) == {"neg", "pos"}
    assert cfg["metrics"]["test"]["n"] == 16
    assert (tmp_path / "rec" / "ACTIVE").read_text().strip() == version


def test_a_repeated_run_publishes_the_same_version_and_older_bundles_with_timing_still_load(tiny, csvs, tmp_path):
    """The version id is the bundle's content hash. The run's wall time and end time were in the
    bundle, so a run repeated with the same seed and data (bit-identical weights) was always a new
    version; they are the run's (`TrainResult.timing`), not the task's."""
    from service.engine.bundle import write_bundle
    from service.engine.types import TaskKey

    splits = load_splits(csvs["train"], csvs["dev"])
    first, second = (train(splits, tiny_config("lora", seed=7, epochs=2, max_steps=10), name="same", backbone=tiny, progress=False)
                     for _ in range(2))
    assert len(first.timing()["epoch_seconds"]) == 2
    assert save_to_store(first, tmp_path) == save_to_store(second, tmp_path)
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == sorted(["ACTIVE", "HISTORY.json", (tmp_path / "same" / "ACTIVE").read_text().strip()])
    # a bundle written before, with its timing inside, still loads and shows it
    cfg = first.bundle_config()
    cfg["training"]["train_seconds"], cfg["created"] = 1.5, "2026-01-01T00:00:00+00:00"
    old = write_bundle(tmp_path / "old", "same", cfg, first.weights)
    task = Engine(tiny).load_task(tmp_path / "old" / "same" / old, TaskKey("same", old))
    assert task.spec.metadata["created"] == "2026-01-01T00:00:00+00:00"
    assert task.spec.metadata["training"]["train_seconds"] == 1.5


def test_trained_logits_batch_by_length_and_answer_in_input_order(tiny, csvs, tmp_path):
    # TrainResult.logits sorts rows by length into batches (PET labels thousands of unlabelled rows
    # with it); every row's logits must still come back at its own index, whatever the batch size.
    splits = load_splits(csvs["train"], csvs["dev"])
    result = train(splits, tiny_config("lora"), name="rt-order", backbone=tiny, progress=False)
    texts = ["a much longer input than the others, " * 4, "short", *splits.dev.texts, "mid length input here", "x"]
    one_by_one = torch.cat([result.logits([t], batch_size=1) for t in texts])
    assert not torch.allclose(one_by_one[0], one_by_one[1], atol=1e-4)  # the rows differ, so order is visible
    for size in (2, 3, len(texts)):
        torch.testing.assert_close(result.logits(texts, batch_size=size), one_by_one, atol=ATOL, rtol=0)
    assert result.logits([], batch_size=4).shape == (0, 2)
