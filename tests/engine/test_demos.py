"""Demonstrations (service/methods/demos.py): the nearest example of each class by cosine, never
the input itself; the sentence encoder is sentence-transformers' mean pooling; bundles are checked."""
from __future__ import annotations

import json

import pytest
import torch

from service.engine.backbone import default_backbone_path, load_backbone
from service.engine.bundle import write_bundle
from service.engine.engine import Engine
from service.engine.types import TaskKey
from service.errors import BundleError
from service.methods.demos import DemosWeights, bundled_sentence_encoder
from tests.factories import save_tiny_lm, verbalizer_task


def _pool(vectors, labels, texts=None):
    emb = torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)
    texts = texts or [f"t{i}" for i in range(len(vectors))]
    return DemosWeights(texts=tuple(texts), text_pairs=None, labels=tuple(labels), embeddings=emb, encoder="sha256:x")


def test_nearest_example_of_each_class():
    #            class 0: along x, and 45 deg     class 1: along y, and 135 deg
    pool = _pool([[1, 0], [1, 1], [0, 1], [-1, 1]], [0, 0, 1, 1])
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [-1.0, 0.9]]), dim=-1)
    picks = pool.pick(q, ["a", "b"], [None, None], label_words=[101, 202])
    # row 0: class 0 -> t0 (cos ~0.98), class 1 -> t2 (0.20 > -0.55);  row 1: class 0 -> t1, class 1 -> t3
    assert [[(d.text, d.word_id) for d in row] for row in picks] == [[("t0", 101), ("t2", 202)], [("t1", 101), ("t3", 202)]]


def test_never_the_input_itself_and_missing_classes_are_skipped():
    pool = _pool([[1, 0], [0.9, 0.1], [0, 1]], [0, 0, 1], texts=["same", "other", "y"])
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    (row,) = pool.pick(q, ["same"], [None], label_words=[1, 2])
    assert [d.text for d in row] == ["other", "y"]
    lonely = _pool([[1, 0], [0, 1]], [0, 1], texts=["same", "y"])
    (row,) = lonely.pick(q, ["same"], [None], label_words=[1, 2])
    assert [d.text for d in row] == ["y"]  # class 0's only example is the input: no demonstration for it


def test_sentence_encoder_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    texts = ["a fine, moving film", "the stock market fell sharply today", "ok"]
    ours = bundled_sentence_encoder("cpu").embed(texts)
    ref = SentenceTransformer(str(default_backbone_path()), device="cpu").encode(texts, normalize_embeddings=True,
                                                                                   convert_to_tensor=True)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    path = save_tiny_lm("mlm", tmp_path_factory.mktemp("mlm") / "lm")
    return Engine(load_backbone(path, device="cpu", dtype="float32"))


def _publish(engine, store, demos_cfg, tensors=None, methods=None):
    cfg = {"labels": ["negative", "positive"], "max_length": 32, "template": "{text} it was {mask} .", "format": "adaptserve/1",
           "methods": methods or {"verbalizer": verbalizer_task(engine.backbone.tokenizer, {"n": ["bad"], "p": ["good"]}).config(),
                                  "demos": demos_cfg}}
    d = store / "t" / "v1"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file(tensors if tensors is not None else {"demos.embeddings": torch.zeros(2, 384)}, str(d / "adapter_model.safetensors"))
    return engine.load_task(d, TaskKey("t", "v1"))


def test_bundle_problems_are_reported(mlm, tmp_path):
    enc = {"fingerprint": bundled_sentence_encoder("cpu").fingerprint}
    ok = {"texts": ["good fun", "bad plot"], "labels": [1, 0], "encoder": enc}
    assert _publish(mlm, tmp_path / "a", ok).weights["demos"].labels == (1, 0)
    cases = [
        ({**ok, "labels": [1]}, None, "'texts' and 'labels' must be parallel"),
        (ok, {"demos.embeddings": torch.zeros(3, 384)}, "has shape [3, 384], expected [2, 384]"),
        ({**ok, "labels": [0, 2]}, None, "label index is out of range"),
        ({**ok, "encoder": {"fingerprint": "sha256:other"}}, None, "embedded by sentence encoder sha256:other"),
    ]
    for i, (cfg, tensors, message) in enumerate(cases):
        with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _publish(mlm, tmp_path / f"b{i}", cfg, tensors)
    with pytest.raises(BundleError, match="need a 'verbalizer'"):
        _publish(mlm, tmp_path / "c", ok, methods={"demos": ok, "head": {"pooling": "cls"}},
                 tensors={"demos.embeddings": torch.zeros(2, 384), "head.out.weight": torch.zeros(2, 32),
                          "head.out.bias": torch.zeros(2)})


def test_written_bundle_round_trips(mlm, tmp_path):
    enc = bundled_sentence_encoder("cpu")
    texts = ("good fun", "bad plot")
    demos = DemosWeights(texts=texts, text_pairs=None, labels=(1, 0), embeddings=enc.embed(list(texts)), encoder=enc.fingerprint)
    vw = verbalizer_task(mlm.backbone.tokenizer, {"n": ["bad"], "p": ["good"]})
    v = write_bundle(tmp_path, "rt", {"labels": ["n", "p"], "max_length": 32, "template": "{text} it was {mask} ."},
                     {"verbalizer": vw, "demos": demos})
    task = mlm.load_task(tmp_path / "rt" / v, TaskKey("rt", v))
    assert task.weights["demos"].texts == texts and task.trainable_params == 0
    torch.testing.assert_close(task.weights["demos"].embeddings, demos.embeddings)
