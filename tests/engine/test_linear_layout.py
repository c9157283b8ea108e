"""CPU backbones keep their layer linears input-major; the values and every result stay the same."""
from __future__ import annotations

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from service.engine.backbone import fingerprint, load_backbone
from service.engine.engine import Engine
from service.engine.families import set_linear_layout
from service.engine.types import ClassifyItem, TaskKey
from tests.factories import publish, random_head, random_lora, save_tiny_backbone
from training.full import trainable_copy


def _site_weights(backbone):
    return [layer.site(name).weight for layer in backbone.family.layers for name in layer.site_shapes()]


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_cpu_backbone_stores_layer_linears_input_major_with_the_files_values(tmp_path, family):
    folder = save_tiny_backbone(family, tmp_path / "bb")
    backbone = load_backbone(folder, device="cpu", dtype="float32")
    weights = _site_weights(backbone)
    assert all(not w.is_contiguous() and w.t().is_contiguous() for w in weights)
    # same values under the same names: the state dict (and so the fingerprint) does not see the layout
    on_disk = load_file(str(folder / "model.safetensors"))
    state = backbone.model.state_dict()
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
    reference = T.AutoModel.from_pretrained(str(folder)).eval()
    assert fingerprint(backbone.model) == fingerprint(reference) == backbone.info.fingerprint
    ids = backbone.tokenizer(["good movie", "a bad plot and boring acting"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(**ids).last_hidden_state, reference(**ids).last_hidden_state)


def test_layout_switches_both_ways_once_per_module(tmp_path):
    backbone = load_backbone(save_tiny_backbone("albert", tmp_path / "bb"), device="cpu", dtype="float32")
    distinct = len({id(layer.site(n)) for layer in backbone.family.layers for n in layer.site_shapes()})
    assert distinct == 6  # ALBERT: every position shares one layer's modules
    before = [w.detach().clone() for w in _site_weights(backbone)]
    assert set_linear_layout(backbone.family, input_major=True) == 0  # already input-major
    assert set_linear_layout(backbone.family, input_major=False) == distinct
    assert all(w.is_contiguous() for w in _site_weights(backbone))
    assert set_linear_layout(backbone.family, input_major=False) == 0
    assert set_linear_layout(backbone.family, input_major=True) == distinct
    for old, new in zip(before, _site_weights(backbone)):
        assert torch.equal(old, new) and not new.is_contiguous()


def test_served_logits_agree_across_layouts(tmp_path):
    folder = save_tiny_backbone("bert", tmp_path / "bb")
    fast = load_backbone(folder, device="cpu", dtype="float32")
    plain = load_backbone(folder, device="cpu", dtype="float32")
    set_linear_layout(plain.family, input_major=False)
    g = torch.Generator().manual_seed(0)
    weights = {"lora": random_lora(fast.info, g, r=4, sites=("query", "value", "ffn_in")),
               "head": random_head(fast.info, g, labels=3, pooling="mean")}
    version = publish(tmp_path / "store", "t", weights, ["a", "b", "c"], fingerprint=fast.info.fingerprint)
    texts = ["good movie", "a bad plot and boring acting", "it was fun", "not very good but not bad"]
    out = []
    for backbone in (fast, plain):
        engine = Engine(backbone)
        task = engine.load_task(tmp_path / "store" / "t" / version, TaskKey("t", version))
        with torch.inference_mode():
            out.append(torch.stack(engine.logits(engine.tokenize([ClassifyItem(task, t) for t in texts]))))
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_copy_is_contiguous_and_saves(tmp_path):
    backbone = load_backbone(save_tiny_backbone("bert", tmp_path / "bb"), device="cpu", dtype="float32")
    tuned = trainable_copy(backbone)
    assert all(w.is_contiguous() and w.requires_grad for w in _site_weights(tuned))
    assert all(not w.is_contiguous() for w in _site_weights(backbone))  # the served backbone is untouched
    tuned.model.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(saved["encoder.layer.0.attention.self.query.weight"], backbone.family.layers[0].query.weight)
