"""Fixtures for training tests: one tiny random BERT (folder + loaded) and small labelled CSVs."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from service.engine.engine import Engine
from service.engine.types import ClassifyItem
from tests.factories import WORDS, save_tiny_backbone
from training.config import PrefixConfig, PromptConfig, TrainConfig
from training.evaluate import load_published

# The tiny backbone has 64 positions; 4 virtual tokens + 24 text tokens fit with room to spare.
TINY = dict(max_steps=2, batch_size=8, max_length=24, prefix=PrefixConfig(4), prompt=PromptConfig(4), epochs=1)
TEXT_WORDS = [w for w in WORDS if w.isalpha()]


def tiny_config(method: str, **kw) -> TrainConfig:
    return TrainConfig(method=method, **{**TINY, **kw})


def rows(n: int, seed: int, pairs: bool = False) -> list[tuple[str, ...]]:
    """Random word strings labelled pos/neg by a keyword rule, so a model can learn something."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rnd.choice(TEXT_WORDS) for _ in range(rnd.randint(3, 9)))
        label = "pos" if any(w in text.split() for w in ("good", "great", "fun", "love")) else "neg"
        label = ("pos", "neg")[i % 2] if i < 2 else label  # both classes, whatever the draw
        out.append((text, " ".join(rnd.choice(TEXT_WORDS) for _ in range(3)), label) if pairs else (text, label))
    return out


def write_csv(path: Path, data: list[tuple[str, ...]], pairs: bool = False) -> Path:
    header = "text,text_pair,label" if pairs else "text,label"
    path.write_text("\n".join([header] + [",".join(r) for r in data]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _kept_bundles_stay_in_the_test(tmp_path, monkeypatch) -> None:
    """A failed upload keeps its bundle in a temporary folder (training.publish.upload): the tests'
    own, not the machine's /tmp."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_backbone("bert", tmp_path_factory.mktemp("tiny") / "bert", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from service.engine.backbone import load_backbone

    return load_backbone(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def csvs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "train": write_csv(d / "train.csv", rows(40, 1)),
        "dev": write_csv(d / "dev.csv", rows(16, 2)),
        "test": write_csv(d / "test.csv", rows(16, 3)),
        "pair_train": write_csv(d / "pair_train.csv", rows(40, 4, pairs=True), pairs=True),
        "pair_dev": write_csv(d / "pair_dev.csv", rows(16, 5, pairs=True), pairs=True),
    }


def assert_served_equals_trained(backbone, store: Path, name: str, texts: list[str], trained) -> None:
    """The published task `name`, loaded by a fresh engine as the service would, answers `texts`
    with the logits training computed (`trained(texts)`), to 1e-5."""
    engine = Engine(backbone)
    task = load_published(engine, store, name)
    served = torch.tensor([p.logits for p in engine.classify([ClassifyItem(task, t) for t in texts])])
    torch.testing.assert_close(served, trained(texts), atol=1e-5, rtol=0)
