"""On a CPU the layer linears also keep an input-major weight copy for few-token inputs
(`SmallBatchLinear`): same Parameters, same logits, and the copy is used only where it should be."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.backbone import SMALL_BATCH_TOKENS, load_backbone
from service.engine.encoder import Encoder
from service.engine.engine import Engine
from service.engine.families import SmallBatchLinear, family_of, with_small_batch_layout
from service.engine.types import ClassifyItem
from tests.engine.test_mixed_batch import _texts
from tests.engine.test_slot_pool import _publish
from tests.factories import random_adapter, random_head, random_lora, save_tiny_backbone


def test_cpu_backbone_wraps_every_layer_linear_around_the_models_own_parameters(minilm_backbone):
    hf_layers = minilm_backbone.model.encoder.layer
    for layer, hf in zip(minilm_backbone.family.layers, hf_layers):
        for name, module in (("query", hf.attention.self.query), ("ffn_in", hf.intermediate.dense)):
            lin = layer.site(name)
            assert isinstance(lin, SmallBatchLinear) and lin.max_tokens == SMALL_BATCH_TOKENS
            assert lin.weight is module.weight and lin.bias is module.bias  # no second Parameter
            assert lin.weight_in_major.is_contiguous() and torch.equal(lin.weight_in_major, module.weight.t())
        assert type(hf.attention.self.query) is nn.Linear  # the Hugging Face model is left as it was
    # the copy is not state: nothing to save, and the fingerprint is the weights'
    plain = load_backbone(None, device="cpu", dtype="float32", small_batch_tokens=0)
    assert type(plain.family.layers[0].query) is nn.Linear
    assert minilm_backbone.model.state_dict().keys() == plain.model.state_dict().keys()
    assert minilm_backbone.info.fingerprint == plain.info.fingerprint


def test_the_server_default_is_the_engine_default():
    from service.settings import Settings

    assert Settings.model_fields["small_batch_tokens"].default == SMALL_BATCH_TOKENS


def test_small_inputs_read_the_copy_large_ones_and_trainable_weights_do_not():
    torch.manual_seed(0)
    lin = SmallBatchLinear(nn.Linear(8, 5), max_tokens=6)
    lin.requires_grad_(False)
    x_small, x_large = torch.randn(2, 3, 8), torch.randn(7, 8)  # 6 and 7 token rows
    assert torch.allclose(lin(x_small), F.linear(x_small, lin.weight, lin.bias), atol=1e-6)
    assert lin(x_small).shape == (2, 3, 5)
    lin.weight_in_major = torch.zeros_like(lin.weight_in_major)  # poison the copy: who reads it shows
    assert torch.equal(lin(x_small), lin.bias.expand(2, 3, 5))
    assert torch.allclose(lin(x_large), F.linear(x_large, lin.weight, lin.bias))
    lin.weight.requires_grad_(True)  # full fine-tuning: the copy would go stale, so never read it
    assert torch.allclose(lin(x_small), F.linear(x_small, lin.weight, lin.bias))


def test_albert_shared_modules_stay_shared(tmp_path):
    bb = load_backbone(save_tiny_backbone("albert", tmp_path / "albert"), device="cpu", dtype="float32")
    first, second = bb.family.layers[0], bb.family.layers[1]
    assert isinstance(first.query, SmallBatchLinear) and first.query is second.query
    again = with_small_batch_layout(family_of(bb.model), 16)
    assert again.layers[0].ffn_out is again.layers[1].ffn_out


def test_no_copy_off_the_float32_cpu_path(tmp_path):
    bb = load_backbone(save_tiny_backbone("bert", tmp_path / "bert"), device="cpu", dtype="bfloat16")
    assert type(bb.family.layers[0].query) is nn.Linear


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_served_logits_equal_across_layouts(minilm_backbone, minilm_engine, tmp_path, rows):
    """The chaos load's shape (LoRA + head, short texts), mixed with adapters, on both sides of
    the threshold: the small-batch layout changes the summation order only."""
    plain_family = family_of(minilm_backbone.model)
    plain = Engine(dataclasses.replace(minilm_backbone, family=plain_family, encoder=Encoder(plain_family)))
    info, g, store = minilm_backbone.info, torch.Generator().manual_seed(3), tmp_path / "store"
    tasks = [_publish(minilm_engine, store, "lora", {"lora": random_lora(info, g, r=4), "head": random_head(info, g)}),
             _publish(minilm_engine, store, "houlsby", {"adapter": random_adapter(info, g, kind="houlsby", bottleneck=8),
                                                         "head": random_head(info, g, pooling="mean")})]
    batch = minilm_engine.tokenize([ClassifyItem(tasks[i % 2], t) for i, t in enumerate(_texts(rows, seed=rows))])
    tokens = int(batch.attention_mask.sum())
    assert (tokens <= SMALL_BATCH_TOKENS) == (rows < 40), f"{rows} rows are {tokens} tokens"
    small, pytorch = minilm_engine.logits(batch), plain.logits(batch)
    assert max(float((a - b).abs().max()) for a, b in zip(small, pytorch)) <= 1e-4
