"""The prefix's reparameterising MLP (training/reparam.py): it starts where the unprojected prefix
starts, its gradients are those of the composed function, and it trains through the loop into a
bundle that stores only the folded prefix."""
from __future__ import annotations

import pytest
import torch

from service.methods.prefix import PrefixWeights
from training.config import ConfigError, PrefixConfig
from training.data import load_splits
from training.reparam import PrefixProjection
from training.trainer import train
from training.weights import init_weights, parameter_groups, trainable_tensors
from tests.training.conftest import tiny_config


def _prefix(tiny, seed: int = 0) -> PrefixWeights:
    return PrefixWeights.init(tiny, num_virtual_tokens=3, generator=torch.Generator().manual_seed(seed))


def test_starts_at_the_unprojected_prefix(tiny):
    prefix = _prefix(tiny)
    keys, values = prefix.keys.detach().clone(), prefix.values.detach().clone()
    proj = PrefixProjection(prefix, 8, torch.Generator().manual_seed(1))
    proj.write()
    assert torch.equal(prefix.keys, keys) and torch.equal(prefix.values, values)


def test_gradients_are_those_of_the_composed_function(tiny):
    """Leaf gradients pushed through `backward` == autograd through start + MLP(E) directly."""
    prefix = _prefix(tiny)
    proj = PrefixProjection(prefix, 8, torch.Generator().manual_seed(1))
    with torch.no_grad():  # move off the zero start, so every parameter gets a gradient
        proj.w2.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    proj.write()
    a = torch.randn(prefix.keys.shape, generator=torch.Generator().manual_seed(3))
    b = torch.randn(prefix.values.shape, generator=torch.Generator().manual_seed(4))

    def loss(k, v):
        return (k * a).sum() + (v.pow(2) * b).sum()

    loss(prefix.keys, prefix.values).backward()
    proj.backward()
    via_leaves = [p.grad.clone() for p in proj.parameters()]
    assert prefix.keys.grad is None and prefix.values.grad is None, "leaf gradients must not reach the optimiser"

    for p in proj.parameters():
        p.grad = None
    k, v = proj._output().chunk(2)
    loss(k, v).backward()
    for got, want in zip(via_leaves, (p.grad for p in proj.parameters())):
        torch.testing.assert_close(got, want)
        assert want.abs().sum() > 0


def test_the_optimiser_steps_the_mlp_not_the_prefix(tiny):
    cfg = tiny_config("prefix", prefix=PrefixConfig(length=3, projection=8))
    gen = torch.Generator().manual_seed(0)
    weights = init_weights(cfg, tiny, 2, gen)
    proj = PrefixProjection(weights["prefix"], 8, gen)
    stepped = trainable_tensors(weights, proj)
    grouped = [t for g in parameter_groups(weights, None, 0.01, proj) for t in g["params"]]
    for ts in (stepped, grouped):
        assert not any(t is d for t in ts for d in proj.driven)
        assert all(any(p is t for t in ts) for p in proj.parameters())
        assert any(t is weights["head"].out_w for t in ts)


def test_a_projected_prefix_trains_and_stores_only_the_folded_prefix(tiny, csvs):
    splits = load_splits(csvs["train"], csvs["dev"])
    plain = train(splits, tiny_config("prefix"), name="p", backbone=tiny, progress=False)
    projected = train(splits, tiny_config("prefix", prefix=PrefixConfig(4, projection=16)), name="p",
                      backbone=tiny, progress=False)
    a, b = plain.weights["prefix"], projected.weights["prefix"]
    assert set(b.tensors()) == {"prefix.keys", "prefix.values"}
    assert b.keys.shape == a.keys.shape
    assert not torch.allclose(a.keys, b.keys), "the projection changed nothing"
    assert projected.config.hyperparameters()["prefix"]["projection"] == 16  # recorded in the bundle


@pytest.mark.parametrize("value", (-1, 1.5))
def test_a_bad_projection_size_is_refused(value):
    with pytest.raises(ConfigError, match="--prefix-projection must be a non-negative integer"):
        PrefixConfig(projection=value).check()
