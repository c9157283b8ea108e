"""Linears, norms and the FFN run on real positions only (padding packed away): same logits and gradients."""
from __future__ import annotations

import pytest
import torch

from service.engine.encoder import Packing
from service.engine.engine import Engine
from service.methods import slots
from service.engine.types import ClassifyItem
from service.engine.families import SITES
from tests.engine.test_mixed_batch import _texts
from tests.engine.test_slot_pool import _publish
from tests.factories import FAMILIES, random_adapter, random_head, random_lora, random_prefix, random_prompt, tiny_backbone


def _batch(engine: Engine, tmp_path):
    info, g, store = engine.backbone.info, torch.Generator().manual_seed(5), tmp_path / "store"
    weights = [
        {"lora": random_lora(info, g, r=4, sites=SITES)},  # every linear, the FFN's included
        {"lora": random_lora(info, g, r=2, sites=("ffn_out",))},
        {"adapter": random_adapter(info, g, kind="houlsby", bottleneck=6)},
        {"adapter": random_adapter(info, g, kind="pfeiffer", bottleneck=4, activation="gelu")},
        {"prefix": random_prefix(info, g, p=3)},
        {"prompt": random_prompt(info, g, p=5)},
        {},
    ]
    tasks = [_publish(engine, store, f"t{i}", {**w, "head": random_head(info, g, pooling="mean")}) for i, w in enumerate(weights)]
    texts = _texts(3 * len(tasks), seed=7)
    return engine.tokenize([ClassifyItem(tasks[i % len(tasks)], t) for i, t in enumerate(texts)])


@pytest.mark.parametrize("mode", ["gpu", "cpu-bmm", "cpu-spans"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded(family, mode, tmp_path, monkeypatch):
    """Every way a packed batch applies per-row methods (one small matmul per span of rows, or a
    padded bmm: unpacked and packed around it, or fused into a padded q/k/v linear) gives the
    padded batch's logits."""
    engine = Engine(tiny_backbone(family, tmp_path))
    batch = _batch(engine, tmp_path)
    # cpu-bmm: every method's rows count as "many" (spans only for FFN-site LoRA); gpu: no spans
    monkeypatch.setattr(slots, "SPAN_MAX_SHARE", 1.0 if mode == "cpu-spans" else 0.0)
    if mode == "gpu":
        monkeypatch.setattr(slots, "spans", lambda device: False)
    monkeypatch.setattr(Packing, "MIN_PADDING", 0.0)  # pack whenever any position is padding
    states, _ = engine.layer_states(batch)
    assert states[0].packing is not None
    packed = engine.logits(batch)
    with torch.enable_grad():
        packed_train = torch.cat(engine.full_depth_logits(batch))
    monkeypatch.setattr(Packing, "MIN_PADDING", 2.0)  # never pack
    assert engine.layer_states(batch)[0][0].packing is None
    padded = engine.logits(batch)
    with torch.enable_grad():
        padded_train = torch.cat(engine.full_depth_logits(batch))
    worst = max(float((a - b).abs().max()) for a, b in zip(packed, padded))
    assert worst <= 1e-5
    assert float((packed_train - padded_train).abs().max()) <= 1e-5


def test_packed_ffn_passes_gradients_to_task_weights(tmp_path, monkeypatch):
    """Training goes through the packed FFN too: LoRA on ffn_in/ffn_out and adapters get the same
    gradients as through the padded layout."""
    from service.methods.adapter import AdapterWeights
    from service.methods.lora import LoraWeights

    engine = Engine(tiny_backbone("bert", tmp_path))
    info = engine.backbone.info
    g = torch.Generator().manual_seed(9)
    lw = LoraWeights.init(info, r=2, alpha=4, targets=("ffn_in", "ffn_out"), generator=g)
    aw = AdapterWeights.init(info, kind="pfeiffer", bottleneck=4, generator=g)
    with torch.no_grad():  # non-zero B / up so every tensor gets a gradient
        for a, b in lw.pairs.values():
            b.normal_(0, 0.1, generator=g)
        for blk in aw.blocks.values():
            blk[2].normal_(0, 0.1, generator=g)
    from service.engine.task import Task
    from service.engine.types import TaskKey
    from service.methods.head import HeadWeights

    head = HeadWeights.init(info, num_labels=2, pooling="mean", generator=g)
    spec = _batch(engine, tmp_path).tasks[0].spec
    task = Task(key=TaskKey("train", "0"), spec=spec, weights={"lora": lw, "adapter": aw, "head": head}, backbone=info)
    texts = _texts(6, seed=11)
    batch = engine.tokenize([ClassifyItem(task, t) for t in texts])
    grads = []
    for min_padding in (0.0, 2.0):
        monkeypatch.setattr(Packing, "MIN_PADDING", min_padding)
        params = [t for w in (lw, aw) for t in w.tensors().values()]
        for t in params:
            t.grad = None
        torch.stack(engine.full_depth_logits(batch)).sum().backward()
        grads.append(torch.cat([t.grad.flatten() for t in params]))
    assert float(grads[0].abs().max()) > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_a_gpu_batch_is_never_packed():
    """Off the CPU the padded layout is used whatever the padding: packing would add ~100 ops and
    a device sync a MiniLM batch to a forward that waits on kernel launches, not arithmetic. (The
    meta device stands in for a GPU: it has no data, so `nonzero` there would fail.)"""
    keep = torch.zeros(4, 16, dtype=torch.bool)
    keep[:, :3] = True  # 81% padding
    assert Packing.of(keep) is not None
    assert Packing.of(keep.to("meta")) is None
