"""The loop: only task tensors learn, seeds reproduce, the best dev checkpoint is the one kept."""
from __future__ import annotations

import pytest
import torch

import training.trainer as trainer_mod
from service.engine.backbone import load_backbone
from training.config import DEFAULT_EMA, ConfigError, TrainConfig
from training.data import load_splits
from training.metrics import Metrics
from training.trainer import train
from training.weights import init_weights
from tests.training.conftest import tiny_config

METHODS = ("lora", "adapter", "prefix", "prompt", "head", "full")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tensors(result) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for w in result.weights.values() for k, t in w.tensors().items()}


@pytest.mark.parametrize("method", METHODS)
def test_only_task_tensors_change(method, tiny, csvs):
    splits = load_splits(csvs["train"], csvs["dev"])
    cfg = tiny_config(method)
    before = _state(tiny.model)
    result = train(splits, cfg, name="frozen", backbone=tiny, progress=False)

    after = _state(tiny.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the shared backbone changed"
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())

    initial = init_weights(cfg, result.engine.backbone, 2, torch.Generator().manual_seed(cfg.seed))
    start = {k: t for w in initial.values() for k, t in w.tensors().items()}
    trained = _tensors(result)
    assert start.keys() == trained.keys()
    unchanged = [k for k in start if torch.equal(start[k], trained[k])]
    assert not unchanged, f"task tensors that did not learn: {unchanged}"
    if method == "full":  # the copy learned, the original did not
        tuned = result.engine.backbone.model.state_dict()
        assert any(not torch.equal(before[k], tuned[k]) for k in before)
    else:
        assert result.engine.backbone is tiny


@pytest.mark.parametrize("method", ("lora", "prefix", "full"))
def test_same_seed_same_weights(method, tiny, csvs):
    splits = load_splits(csvs["train"], csvs["dev"])
    runs = [train(splits, tiny_config(method, seed=s), name="seed", backbone=tiny, progress=False) for s in (3, 3, 4)]
    a, b, c = (_tensors(r) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    if method == "full":
        sa, sb = (r.engine.backbone.model.state_dict() for r in runs[:2])
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_best_dev_checkpoint_is_kept_and_training_stops_early(tiny, csvs, monkeypatch):
    """Scripted dev scores 0.5, 0.9, 0.6, 0.6, ...: best epoch 2, stop after epoch 4 (patience 2),
    and the weights returned are those evaluated at epoch 2, not the last ones."""
    scores = iter([0.5, 0.9, 0.6, 0.6, 0.6, 0.6])
    seen: list[dict[str, torch.Tensor]] = []

    def scripted(engine, task, data, *args, **kw) -> Metrics:
        seen.append({k: t.detach().clone() for w in task.weights.values() for k, t in w.tensors().items()})
        acc = next(scores)
        return Metrics(label_names=data.label_names, accuracy=acc, macro_f1=acc, per_class={}, confusion=(), n=len(data))

    monkeypatch.setattr(trainer_mod, "evaluate", scripted)
    splits = load_splits(csvs["train"], csvs["dev"])
    result = train(splits, tiny_config("lora", max_steps=None, epochs=6, patience=2), name="es", backbone=tiny, progress=False)
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == 2 and result.dev_metrics.accuracy == 0.9
    assert [r.best for r in result.history] == [True, True, False, False]
    final = _tensors(result)
    assert all(torch.equal(final[k], seen[1][k]) for k in final)
    assert any(not torch.equal(final[k], seen[3][k]) for k in final)


def test_a_backbone_that_is_not_frozen_is_refused(tiny_dir, csvs):
    leaky = load_backbone(tiny_dir, device="cpu", dtype="float32")
    leaky.family.layers[0].query.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="shared backbone received gradients"):
        train(load_splits(csvs["train"], csvs["dev"]), tiny_config("lora"), name="leak", backbone=leaky, progress=False)


@pytest.mark.parametrize("cfg,message", [
    (TrainConfig(method="prompt", max_length=62), "exceeds the backbone's 64 positions"),
    (TrainConfig(method="nope"), "--method must be one of"),
    (TrainConfig(method="lora", epochs=0), "--epochs must be an integer >= 1"),
])
def test_bad_configs_are_refused_before_training(cfg, message, tiny, csvs):
    with pytest.raises(ConfigError, match=message):
        train(load_splits(csvs["train"], csvs["dev"]), cfg, name="bad", backbone=tiny, progress=False)


@pytest.mark.parametrize("name", ["../escape", "Upper", "", "a/b"])
def test_task_names_that_could_escape_the_store_are_refused(name, tiny, csvs):
    with pytest.raises(ConfigError, match="invalid task name"):
        train(load_splits(csvs["train"], csvs["dev"]), tiny_config("head"), name=name, backbone=tiny, progress=False)


def test_a_dev_split_is_required(tiny, csvs):
    with pytest.raises(ConfigError, match="a dev split is required"):
        train(load_splits(csvs["train"]), tiny_config("head"), name="nodev", backbone=tiny, progress=False)


def test_dropout_is_a_training_only_forward_option(tiny, csvs):
    """--dropout perturbs training steps (reproducibly for a seed) and nothing else: forwards of
    the trained task outside training steps are deterministic, and the serving forward equals them."""
    splits = load_splits(csvs["train"], csvs["dev"])
    plain = train(splits, tiny_config("lora", seed=3), name="d", backbone=tiny, progress=False)
    runs = [train(splits, tiny_config("lora", seed=3, dropout=0.3), name="d", backbone=tiny, progress=False)
            for _ in range(2)]
    a, b, p = (_tensors(r) for r in (*runs, plain))
    assert all(torch.equal(a[k], b[k]) for k in a), "the same seed must give the same weights with dropout"
    assert any(not torch.equal(a[k], p[k]) for k in a), "dropout changed nothing in training"
    assert runs[0].config.hyperparameters()["dropout"] == 0.3  # recorded in the bundle's training section

    result = runs[0]
    task = trainer_mod._task("d", result.weights, result.label_names, result.input_kind, result.config, tiny)
    rows = trainer_mod._items(task, ["good fun film here", "a dull grey one"], None)
    engine = result.engine
    with torch.no_grad():
        first, again, dropped = (trainer_mod.forward(engine, rows, d) for d in (0.0, 0.0, 0.5))
        served = torch.stack(engine.logits(engine.tokenize(rows)))
    assert torch.equal(first, again)
    assert not torch.allclose(first, dropped)
    assert torch.allclose(served, first, atol=1e-6)


@pytest.mark.parametrize("value", (-0.1, 1.0, 2))
def test_dropout_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"--dropout must be in \[0, 1\)"):
        TrainConfig(method="lora", dropout=value).check()


@pytest.mark.parametrize("method", ("lora", "prefix"))
def test_ema_keeps_the_average_of_the_trained_weights(method, tiny, csvs, monkeypatch):
    """--ema: the live weights train as without it, and what the run keeps (dev scores it, the
    bundle holds it) is their moving average over the steps, warm-up decay included."""
    splits = load_splits(csvs["train"], csvs["dev"])
    trajectory: list[dict[int, torch.Tensor]] = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        trajectory.append({id(p): p.detach().clone() for g in self.param_groups for p in g["params"]})
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    cfg = tiny_config(method, max_steps=3, ema=0.6)
    result = train(splits, cfg, name="ema", backbone=tiny, progress=False)
    live = trajectory[:]
    trajectory.clear()
    plain = train(splits, tiny_config(method, max_steps=3, ema=0.0), name="ema", backbone=tiny, progress=False)
    assert len(live) == len(trajectory) == 3

    initial = init_weights(cfg, result.engine.backbone, 2, torch.Generator().manual_seed(cfg.seed))
    start = {k: t for w in initial.values() for k, t in w.tensors().items()}
    kept = {k: t for w in result.weights.values() for k, t in w.tensors().items()}
    without = _tensors(plain)
    for name, tensor in kept.items():
        expected = start[name].clone()
        for t, values in enumerate(live):
            d = min(0.6, (1 + t) / (10 + t))
            expected = d * expected + (1 - d) * values[id(tensor)]
        torch.testing.assert_close(tensor.detach(), expected, rtol=0, atol=1e-6)
        # the live weights of the last step are what a run without --ema keeps
        assert torch.equal(live[-1][id(tensor)], without[name])
    assert result.config.hyperparameters()["ema"] == 0.6
    assert result.dev_metrics == trainer_mod.evaluate(result.engine, result.task, splits.dev, 64, False)


def test_ema_default_is_per_method_and_zero_turns_it_off():
    """Prefix tuning averages by default (DEFAULT_EMA, chosen on dev); the others do not; an explicit
    value, 0 included, wins, and the bundle records the decay that ran."""
    assert TrainConfig(method="prefix").hyperparameters()["ema"] == DEFAULT_EMA["prefix"] == 0.99
    assert TrainConfig(method="lora").hyperparameters()["ema"] == 0.0
    assert TrainConfig(method="prefix", ema=0.0).hyperparameters()["ema"] == 0.0
    assert TrainConfig(method="lora", ema=0.9).hyperparameters()["ema"] == 0.9


@pytest.mark.parametrize("value", (-0.1, 1.0, "x"))
def test_ema_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"--ema must be a decay in \[0, 1\)"):
        TrainConfig(method="lora", ema=value).check()
