"""Fresh weights from each method's `init`: trainable leaves that start where the papers start."""
from __future__ import annotations

import math

import pytest
import torch

from service.engine.engine import Engine
from service.engine.types import ClassifyItem
from service.methods.head import HeadWeights
from service.methods.lora import LoraWeights
from service.methods.prefix import PrefixWeights
from service.methods.prompt import PromptWeights, sample_token_ids
from training.trainer import _task
from training.weights import init_weights
from tests.training.conftest import TEXT_WORDS, tiny_config

TEXTS = [" ".join(TEXT_WORDS[i : i + 5]) for i in range(0, 30, 3)]


def _logits(engine: Engine, weights: dict, cfg) -> torch.Tensor:
    task = _task("init", weights, ("a", "b"), "single", cfg, engine.backbone)
    return torch.stack(engine.logits(engine.tokenize([ClassifyItem(task, t) for t in TEXTS])))


@pytest.mark.parametrize("method", ("lora", "adapter", "prefix", "prompt", "head"))
def test_init_gives_trainable_leaves_in_serving_format(method, tiny):
    cfg = tiny_config(method)
    weights = init_weights(cfg, tiny, 3, torch.Generator().manual_seed(0))
    assert list(weights) == ([method] if method != "head" else []) + ["head"]
    for w in weights.values():
        for name, t in w.tensors().items():
            assert t.is_leaf and t.requires_grad, name
            assert t.dtype == torch.float32 and t.device == tiny.device and torch.isfinite(t).all(), name
    assert weights["head"].num_labels == 3
    again = init_weights(cfg, tiny, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for w, v in zip(weights.values(), again.values())
               for a, b in zip(w.tensors().values(), v.tensors().values()))


@pytest.mark.parametrize("method", ("lora", "adapter"))
def test_lora_and_adapters_start_as_the_identity(method, tiny):
    """B = 0 (LoRA) and up = 0 (adapter): at step 0 the task is exactly its head on the backbone."""
    engine = Engine(tiny)
    cfg = tiny_config(method)
    weights = init_weights(cfg, tiny, 2, torch.Generator().manual_seed(1))
    with_method = _logits(engine, weights, cfg)
    head_only = _logits(engine, {"head": weights["head"]}, cfg)
    torch.testing.assert_close(with_method, head_only, atol=0, rtol=0)


def test_lora_a_is_kaiming_uniform_like_peft(tiny):
    w = LoraWeights.init(tiny.info, r=4, alpha=8, targets=("query", "ffn_out"), generator=torch.Generator().manual_seed(0))
    for (layer, site), (a, b) in w.pairs.items():
        fan_in = tiny.info.site_shape(site)[0]
        assert a.shape == (4, fan_in) and a.abs().max() <= 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5))
        assert a.std() > 0.25 / math.sqrt(fan_in)
        assert not b.any()
    assert w.scale == 2.0
    with pytest.raises(ValueError, match="LoRA targets"):
        LoraWeights.init(tiny.info, r=4, alpha=8, targets=("qkv",))


def test_head_init(tiny):
    h = HeadWeights.init(tiny.info, num_labels=4, pooling="mean", dense=True, generator=torch.Generator().manual_seed(0))
    assert h.out_w.shape == (4, tiny.info.hidden_size) and abs(h.out_w.std().item() - 0.02) < 0.01
    assert not h.out_b.any() and not h.dense_b.any() and h.dense_w.shape == (tiny.info.hidden_size,) * 2
    with pytest.raises(ValueError, match="at least 2 labels"):
        HeadWeights.init(tiny.info, num_labels=1)


def test_prompt_starts_from_real_token_embeddings(tiny):
    ids = sample_token_ids(tiny.tokenizer, 5, torch.Generator().manual_seed(3))
    w = PromptWeights.init(tiny, num_virtual_tokens=5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(w.embeddings, tiny.family.embeddings.word.weight[ids], atol=0, rtol=0)
    words = tiny.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert all(t.isalpha() and t not in tiny.tokenizer.all_special_tokens for t in words)


def test_prefix_starts_from_the_backbones_own_keys_and_values(tiny):
    """Cross-checked against Hugging Face's model: the keys/values each layer computes for the
    sampled tokens (hidden_states[i] is the input of layer i)."""
    ids = sample_token_ids(tiny.tokenizer, 4, torch.Generator().manual_seed(5))
    w = PrefixWeights.init(tiny, num_virtual_tokens=4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hs = tiny.model(input_ids=ids[None], token_type_ids=torch.zeros_like(ids[None]), output_hidden_states=True).hidden_states
        for i, layer in enumerate(tiny.model.encoder.layer):
            torch.testing.assert_close(w.keys[i], layer.attention.self.key(hs[i])[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(w.values[i], layer.attention.self.value(hs[i])[0], atol=1e-5, rtol=0)
    assert w.keys.shape == (tiny.info.num_layers, 4, tiny.info.hidden_size)
