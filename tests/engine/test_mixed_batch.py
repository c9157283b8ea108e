"""Mixed batch == each task alone: the property everything else rests on."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from service.engine.engine import Engine
from service.engine.types import ClassifyItem, TaskKey
from service.errors import TaskUnavailable
from tests.factories import FAMILIES, WORDS, publish, random_head, random_method, random_prefix, tiny_backbone

METHODS = ("lora", "adapter", "prefix", "prompt")
ATOL = 1e-5  # fp32


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 12, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def _tasks(engine: Engine, store, per_method: int = 2, seed: int = 0, head_scale: float = 0.5):
    """per_method tasks of every method (different ranks / lengths / label counts) + combos."""
    info = engine.backbone.info
    g = torch.Generator().manual_seed(seed)
    specs = []
    for m in METHODS:
        for v in range(per_method):
            specs.append((f"{m}-{v}", {m: random_method(m, info, g, v)}))
    specs.append(("lora-prefix", {"lora": random_method("lora", info, g, 1), "prefix": random_method("prefix", info, g, 1)}))
    specs.append(("head-only", {}))
    tasks = []
    for i, (name, w) in enumerate(specs):
        n_labels = 2 + i % 3
        pooling = ("cls", "mean", "pooler")[i % 3] if info.has_pooler else ("cls", "mean")[i % 2]
        w = {**w, "head": random_head(info, g, labels=n_labels, pooling=pooling, dense=i % 4 == 1, scale=head_scale)}
        v = publish(store, name, w, [f"l{k}" for k in range(n_labels)], fingerprint=info.fingerprint)
        tasks.append(engine.load_task(store / name / v, TaskKey(name, v)))
    return tasks


def _check_mixed_equals_alone(engine: Engine, tasks) -> float:
    texts = _texts(2 * len(tasks), seed=1)
    items = [ClassifyItem(tasks[i % len(tasks)], texts[i]) for i in range(len(texts))]
    # shuffle so rows of one task are not adjacent
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(2)).tolist()
    items = [items[i] for i in order]
    mixed = engine.logits(engine.tokenize(items))
    worst = 0.0
    for it, z in zip(items, mixed):
        alone = engine.logits(engine.tokenize([it]))[0]
        assert alone.shape == z.shape == (len(it.task.labels),)
        worst = max(worst, float((alone - z).abs().max()))
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_methods_equal_alone_tiny(family, tmp_path):
    engine = Engine(tiny_backbone(family, tmp_path))
    tasks = _tasks(engine, tmp_path / "store")
    assert _check_mixed_equals_alone(engine, tasks) <= ATOL


def test_tasks_change_the_output(tmp_path):
    """Guard against a silent no-op: every method moves the logits away from head-only."""
    engine = Engine(tiny_backbone("bert", tmp_path))
    tasks = _tasks(engine, tmp_path / "store")
    text = "the movie was very good"
    by_name = {t.key.name: t for t in tasks}
    for m in METHODS:
        t = by_name[f"{m}-0"]
        with_m = engine.logits(engine.tokenize([ClassifyItem(t, text)]))[0]
        # same head, method weights removed
        from service.engine.task import Task

        bare = Task(key=TaskKey("bare", "0"), spec=t.spec, weights={"head": t.weights["head"]}, backbone=t.backbone)
        without = engine.logits(engine.tokenize([ClassifyItem(bare, text)]))[0]
        assert float((with_m - without).abs().max()) > 1e-4, m  # float noise is ~1e-6


def test_mixed_methods_equal_alone_minilm(minilm_engine, tmp_path):
    # Classifiers scaled so logits span about +-3, as trained ones do (the demo task's: +-2.5).
    # With the tiny models' scale (0.5 x 384 features) MiniLM logits reach +-11, where 1e-5 is
    # 10 fp32 ulps after six layers: the batch-shape-dependent rounding of the matmuls (mixed
    # batch vs one row) then measured 0.9-1.05e-5 worst, padding packed or not; now about 3e-6.
    tasks = _tasks(minilm_engine, tmp_path / "store", per_method=2, head_scale=0.15)
    assert _check_mixed_equals_alone(minilm_engine, tasks) <= ATOL


def test_albert_positions_keep_their_own_weights(tmp_path):
    """ALBERT shares layer weights across depth; task weights stay per position."""
    engine = Engine(tiny_backbone("albert", tmp_path))
    info = engine.backbone.info
    assert engine.backbone.family.layers[0].query is engine.backbone.family.layers[1].query
    g = torch.Generator().manual_seed(0)
    from tests.factories import random_lora

    head = random_head(info, g)
    only0 = random_lora(info, g, layers=[0])
    only1 = type(only0)(r=only0.r, alpha=only0.alpha, use_rslora=False, pairs={(1, s): ab for (_, s), ab in only0.pairs.items()})
    out = []
    for name, lw in (("at0", only0), ("at1", only1)):
        v = publish(tmp_path / "s", name, {"lora": lw, "head": head}, ["a", "b"])
        t = engine.load_task(tmp_path / "s" / name / v, TaskKey(name, v))
        out.append(engine.logits(engine.tokenize([ClassifyItem(t, "good movie")]))[0])
    assert float((out[0] - out[1]).abs().max()) > 1e-4


def test_a_task_whose_weights_overflow_fails_alone(tmp_path):
    """Finite weights can still overflow in arithmetic (a head of +-3e38): that task's rows get
    TaskUnavailable, never NaN scores, and the other rows of the same batch are answered as alone."""
    engine = Engine(tiny_backbone("bert", tmp_path))
    info = engine.backbone.info
    tasks = _tasks(engine, tmp_path / "store", per_method=1)
    head = random_head(info, torch.Generator().manual_seed(7))
    huge = dataclasses.replace(head, out_w=torch.where(head.out_w > 0, 3e38, -3e38))
    v = publish(tmp_path / "store", "overflow", {"head": huge}, ["a", "b"], fingerprint=info.fingerprint)
    bad = engine.load_task(tmp_path / "store" / "overflow" / v, TaskKey("overflow", v))
    items = [ClassifyItem(bad if i % 3 == 0 else tasks[i % len(tasks)], text) for i, text in enumerate(_texts(12, seed=3))]
    for it, answer in zip(items, engine.classify(items)):
        if it.task is bad:
            assert isinstance(answer, TaskUnavailable), answer
            assert "'overflow'" in answer.message and "non-finite scores" in answer.message
            continue
        alone = engine.classify([it])[0]
        assert all(math.isfinite(p) for p in answer.scores.values()) and answer.label == alone.label
        torch.testing.assert_close(torch.tensor(answer.logits), torch.tensor(alone.logits), atol=ATOL, rtol=0)


def test_logits_leave_the_device_in_one_copy_per_batch(tmp_path, monkeypatch):
    """`Engine.run` hands every row's logits to the host in one copy, however many rows and
    tasks (on a GPU a copy per row was a sync per row and 64 of a 32-row batch's ~270 launches)."""
    engine = Engine(tiny_backbone("bert", tmp_path))
    tasks = _tasks(engine, tmp_path / "store")
    texts = _texts(4 * len(tasks), seed=3)
    batch = engine.tokenize([ClassifyItem(tasks[i % len(tasks)], t) for i, t in enumerate(texts)])
    calls = []
    cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(self.shape)
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    with torch.inference_mode():
        rows = engine.run(batch)
    assert len(rows) == len(texts) and len(calls) == 1
    assert calls[0] == (sum(len(it.labels) for it in batch.tasks for _ in range(4)),)


def test_host_logits_keep_each_rows_values_shape_and_layer():
    from service.engine.engine import _to_host

    rows = [(torch.tensor([0.5, -1.25], dtype=torch.bfloat16), 6), (torch.tensor([1.0, 2.0, 3.0]), 2),
            (torch.arange(4.0).view(2, 2), 6)]
    out = _to_host(rows)
    assert [layer for _, layer in out] == [6, 2, 6]
    for (z, _), (h, _) in zip(rows, out):
        assert h.dtype == torch.float32 and h.device.type == "cpu" and h.shape == z.shape
        assert torch.equal(h, z.float())
    assert _to_host([]) == []


def test_a_prefix_row_beside_a_row_at_the_position_limit(minilm_engine, tmp_path):
    """A prefix shifts its row's positions by P, so that row's padding, out to the length of a
    512-token row of another task, reached positions 512..531: past MiniLM's position table, an
    IndexError for the whole batch (on a GPU, a device-side assert). Both rows answer as alone."""
    info = minilm_engine.backbone.info
    g = torch.Generator().manual_seed(4)
    weights = {"prefix": {"prefix": random_prefix(info, g, p=20), "head": random_head(info, g, scale=0.15)},
               "plain": {"head": random_head(info, g, scale=0.15)}}
    tasks = []
    for (name, w), max_length in zip(weights.items(), (info.max_positions - 20, info.max_positions)):
        v = publish(tmp_path, name, w, ["a", "b"], max_length=max_length, fingerprint=info.fingerprint)
        tasks.append(minilm_engine.load_task(tmp_path / name / v, TaskKey(name, v)))
    items = [ClassifyItem(tasks[0], "a short text"), ClassifyItem(tasks[1], "word " * 600)]
    batch = minilm_engine.tokenize(items)
    assert batch.input_ids.shape[1] == info.max_positions
    for it, z in zip(items, minilm_engine.logits(batch)):
        alone = minilm_engine.logits(minilm_engine.tokenize([it]))[0]
        torch.testing.assert_close(z, alone, atol=ATOL, rtol=0)
