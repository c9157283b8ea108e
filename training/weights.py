"""Fresh trainable task weights for a `TrainConfig`, built by each method's own `init`.

The tensors are the serving format itself (`LoraWeights`, `AdapterWeights`, ... from
`service/methods/`), created as leaf tensors with `requires_grad=True`: the optimiser updates
exactly what `write_bundle` will store, so there is nothing to convert after training. The one
exception is opt-in: a prefix trained through `--prefix-projection` is stepped through its MLP
(`training/reparam.py`), which writes its output into the same serving tensors after every step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from service.engine.backbone import Backbone
from service.methods.adapter import AdapterWeights
from service.methods.base import TaskWeights
from service.methods.head import HeadWeights
from service.methods.lora import LoraWeights
from service.methods.prefix import PrefixWeights
from service.methods.prompt import PromptWeights
from training.config import ConfigError, TrainConfig
from training.reparam import PrefixProjection


def init_weights(cfg: TrainConfig, backbone: Backbone, num_labels: int, generator: torch.Generator) -> dict[str, TaskWeights]:
    """The task's weights before training: the method's (if any), then the classification head.

    Draws from `generator` in a fixed order, so a seed fixes the initial weights. A method's
    `init` refusing its settings for this backbone is a `ConfigError` (a bad option, not a bug)."""
    try:
        return _init(cfg, backbone, num_labels, generator)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _init(cfg: TrainConfig, backbone: Backbone, num_labels: int, generator: torch.Generator) -> dict[str, TaskWeights]:
    info = backbone.info
    weights: dict[str, TaskWeights] = {}
    if cfg.method == "lora":
        c = cfg.lora
        weights["lora"] = LoraWeights.init(info, r=c.r, alpha=c.alpha, targets=c.targets, generator=generator)
    elif cfg.method == "adapter":
        c = cfg.adapter
        weights["adapter"] = AdapterWeights.init(
            info, kind=c.kind, bottleneck=c.size(info.hidden_size), activation=c.activation, generator=generator
        )
    elif cfg.method == "prefix":
        weights["prefix"] = PrefixWeights.init(backbone, num_virtual_tokens=cfg.prefix.length,
                                               shift_positions=cfg.prefix.shift_positions, generator=generator)
    elif cfg.method == "prompt":
        weights["prompt"] = PromptWeights.init(backbone, num_virtual_tokens=cfg.prompt.length, generator=generator)
    weights["head"] = HeadWeights.init(
        info, num_labels=num_labels, pooling=cfg.pooling, dense=cfg.head_dense, generator=generator
    )
    return weights


def parameter_groups(weights: dict[str, TaskWeights], model: torch.nn.Module | None, weight_decay: float,
                     projection: PrefixProjection | None = None) -> list[dict]:
    """AdamW groups: decay weight matrices; never biases, LayerNorm, or virtual tokens.

    Biases and LayerNorm are exempt as in BERT's recipe. Prompt and prefix tensors are
    activations-in-waiting, not maps: decay would pull them towards the zero vector, which is no
    meaningful prior for an embedding or a key. A prefix trained through `projection` is stepped
    through the MLP's parameters instead (its matrices decay, towards the unprojected start)."""
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for method, w in weights.items():
        for t in w.tensors().values():
            if not t.requires_grad or _driven(t, projection):  # stored, not trained / written by the MLP
                continue
            (decay if t.dim() >= 2 and method not in ("prompt", "prefix") else no_decay).append(t)
    if projection is not None:
        decay.extend(projection.matrices())
        no_decay.extend(projection.vectors())
    if model is not None:  # full fine-tuning: the copied backbone's own parameters too
        for p in model.parameters():  # 1-D: biases and LayerNorm gains
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def init_projection(cfg: TrainConfig, weights: dict[str, TaskWeights], generator: torch.Generator) -> PrefixProjection | None:
    """The MLP a prefix trains through (`--prefix-projection`), or None."""
    if cfg.method != "prefix" or not cfg.prefix.projection:
        return None
    return PrefixProjection(weights["prefix"], cfg.prefix.projection, generator)  # type: ignore[arg-type]


def trainable_tensors(weights: dict[str, TaskWeights], projection: PrefixProjection | None = None) -> list[Tensor]:
    """What the optimiser steps (and checkpoints save): the task's trainable tensors, with a projected
    prefix replaced by its MLP's parameters."""
    own = [t for w in weights.values() for t in w.tensors().values() if t.requires_grad and not _driven(t, projection)]
    return own + ([] if projection is None else projection.parameters())


def _driven(t: Tensor, projection: PrefixProjection | None) -> bool:
    return projection is not None and any(t is d for d in projection.driven)
