"""Bottleneck adapters: `h + up(act(down(h)))` on a sub-layer's output, before its residual + LN.

* Houlsby et al. (2019): after the attention output projection *and* after the FFN.
* Pfeiffer et al. (2021): after the FFN only (half the parameters, about the same accuracy).
The bottleneck size is given directly or as hidden_size / reduction_factor (16 is Pfeiffer's
default). Batched like LoRA: per-(layer, site) slot tables, zero-padded to the largest bottleneck.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from transformers.activations import ACT2FN

from service.engine.spec import BackboneInfo
from service.methods import slots
from service.methods.base import Method, MethodBatch, Problems, TaskWeights, register, take, trainable
from service.methods.slots import SlotTable

PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "tanh")
# Houlsby et al. (2019), section 3.6: weights drawn from a zero-mean normal with std 1e-2.
INIT_STD = 1e-2
_KEY = re.compile(r"^adapter\.(\d+)\.(attn|ffn)\.(down|up)\.(weight|bias)$")


@dataclass(frozen=True)
class AdapterWeights(TaskWeights):
    method = "adapter"
    kind: str
    bottleneck: int
    activation: str
    # (layer, site) -> (down_w [m, H], down_b [m], up_w [H, m], up_b [H])
    blocks: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor, Tensor]]

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for (layer, site), (dw, db, uw, ub) in sorted(self.blocks.items()):
            p = f"adapter.{layer}.{site}"
            out.update({f"{p}.down.weight": dw, f"{p}.down.bias": db, f"{p}.up.weight": uw, f"{p}.up.bias": ub})
        return out

    @classmethod
    def init(
        cls,
        info: BackboneInfo,
        *,
        kind: str,
        bottleneck: int,
        activation: str = "relu",
        generator: torch.Generator | None = None,
    ) -> "AdapterWeights":
        """Fresh trainable weights: down ~ N(0, 1e-2) and up, biases zero. Houlsby draws both
        projections from the small normal (near-identity); a zero `up` makes the start exactly
        the identity, as LoRA's zero B does, while `down` still gets gradients from step 2."""
        if kind not in PLACEMENTS:
            raise ValueError(f"adapter kind must be one of {sorted(PLACEMENTS)}, got {kind!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"adapter activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be a positive integer, got {bottleneck!r}")
        h, m = info.hidden_size, bottleneck
        blocks = {}
        for layer in range(info.num_layers):
            for site in PLACEMENTS[kind]:
                down = torch.empty(m, h).normal_(0.0, INIT_STD, generator=generator)
                zeros = (torch.zeros(m), torch.zeros(h, m), torch.zeros(h))
                blocks[(layer, site)] = tuple(trainable(t, info) for t in (down, *zeros))
        return cls(kind=kind, bottleneck=m, activation=activation, blocks=blocks)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "bottleneck": self.bottleneck, "activation": self.activation}


class AdapterBatch(MethodBatch):
    def __init__(self, parts: Sequence[AdapterWeights | None], row_part: Tensor):
        self.parts = parts
        self.row_part = row_part
        # One table set per activation present (almost always one).
        self.acts = sorted({p.activation for p in parts if p is not None})
        self._tables: dict[tuple[int, str, str], SlotTable | None] = {}

    def _table(self, layer: int, site: str, act: str) -> SlotTable | None:
        key = (layer, site, act)
        if key not in self._tables:
            per_part = [
                p.blocks.get((layer, site)) if p is not None and p.activation == act else None for p in self.parts
            ]
            self._tables[key] = slots.build(per_part, self.row_part)
        return self._tables[key]

    def adapts(self, layer: int, site: str) -> bool:
        return any(self._table(layer, site, act) is not None for act in self.acts)

    def after_sublayer(self, layer: int, site: str, h: Tensor) -> Tensor:
        for act in self.acts:
            t = self._table(layer, site, act)
            if t is not None:  # rows in slot 0 get up(act(0)) with zero weights: no change
                z = ACT2FN[act](slots.linear(h, t, 0, 1))  # [B, T, m]
                h = h + slots.linear(z, t, 2, 3)  # [B, T, H]
        return h

    def select(self, rows: Tensor) -> "AdapterBatch":
        out = AdapterBatch(self.parts, self.row_part.index_select(0, rows))
        out._tables = {k: None if v is None else v.select(rows) for k, v in self._tables.items()}
        return out


def _pool_entries(w: AdapterWeights) -> dict:
    """Per (layer, site): down^T [H, m], down bias [m], up^T [m, H], up bias [H]. Bottlenecks pad
    with zeros: a padded unit gets act(0) = 0 for every supported activation and meets a zero row
    of up^T, so it adds nothing."""
    return {(layer, site, w.activation, dw.shape[1], dw.device, dw.dtype): (dw.T, db, uw.T, ub)
            for (layer, site), (dw, db, uw, ub) in w.blocks.items()}


POOL = slots.SlotPool(_pool_entries)


class PooledAdapterBatch(MethodBatch):
    """Serving path: rows read their task's adapter from the persistent pool by slot."""

    def __init__(self, rows: slots.PoolRows, sites: dict[tuple[int, str], list[tuple]]):
        self.pool_rows = rows
        self.sites = sites  # (layer, site) -> pool keys (one per activation present)

    def adapts(self, layer: int, site: str) -> bool:
        return (layer, site) in self.sites

    def after_sublayer(self, layer: int, site: str, h: Tensor) -> Tensor:
        pr = self.pool_rows
        for key in self.sites.get((layer, site), ()):
            act = ACT2FN[key[2]]
            if pr.single:
                z = act(torch.addmm(pr.one(key, 1), h.view(-1, h.shape[-1]), pr.one(key, 0)))  # [B*T, m]
                h = h + (z @ pr.one(key, 2) + pr.one(key, 3)).view_as(h)
                continue
            # z_b = act(h_b Wd_b^T + bd_b); h_b += z_b Wu_b^T + bu_b, for every row b at once
            z = act(torch.baddbmm(pr.rows(key, 1).unsqueeze(1), h, pr.rows(key, 0)))  # [B, T, m]
            h = torch.baddbmm(h + pr.rows(key, 3).unsqueeze(1), z, pr.rows(key, 2))  # [B, T, H]
        return h

    def packed_spans(self, layer: int, site: str, device) -> bool:
        return self.pool_rows.use_spans(device)

    def after_sublayer_packed(self, layer: int, site: str, hp: Tensor, packing) -> Tensor:
        """Per span of rows sharing a task, in place on the packed positions (rows without an
        adapter are not touched)."""
        runs = packing.runs(self.pool_rows.host_slots)
        for key in self.sites.get((layer, site), ()):
            act = ACT2FN[key[2]]
            dw, db, uw, ub = self.pool_rows.views[key]  # [S, H, m], [S, m], [S, m, H], [S, H]
            for start, end, slot in runs:
                x = hp[start:end]
                x.add_(torch.addmm(ub[slot], act(torch.addmm(db[slot], x, dw[slot])), uw[slot]))
        return hp

    def select(self, rows: Tensor) -> "PooledAdapterBatch":
        return PooledAdapterBatch(self.pool_rows.select(rows), self.sites)


@register
class Adapter(Method):
    name = "adapter"
    order = 20

    def parse(self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> AdapterWeights:
        problems = Problems("adapter")
        kind = section.get("kind", "pfeiffer")
        if not isinstance(kind, str) or kind not in PLACEMENTS:  # a list or object: not even hashable
            problems.add(f"'kind' must be one of {sorted(PLACEMENTS)}, got {kind!r}")
        act = section.get("activation", "relu")
        if act not in ACTIVATIONS:
            problems.add(f"'activation' must be one of {ACTIVATIONS}, got {act!r}")
        m = section.get("bottleneck")
        if m is None and isinstance(section.get("reduction_factor"), int) and section["reduction_factor"] > 0:
            m = backbone.hidden_size // section["reduction_factor"]
        if not isinstance(m, int) or m < 1:
            problems.add(f"'bottleneck' (or 'reduction_factor') must give a positive size, got {m!r}")
        problems.raise_if_any()
        for k in tensors:
            g = _KEY.match(k)
            if not g:
                problems.add(f"unrecognised adapter tensor {k!r} (expected adapter.<layer>.<attn|ffn>.<down|up>.<weight|bias>)")
            elif int(g.group(1)) >= backbone.num_layers:
                problems.add(f"adapter tensor {k!r} is for layer {g.group(1)}, but the backbone has {backbone.num_layers} layers")
            elif g.group(2) not in PLACEMENTS[kind]:
                problems.add(f"adapter tensor {k!r} is at site {g.group(2)!r}, which a {kind} adapter does not use")
        h = backbone.hidden_size
        blocks = {}
        for layer in range(backbone.num_layers):
            for site in PLACEMENTS[kind]:
                p = f"adapter.{layer}.{site}"
                got = (
                    take(tensors, f"{p}.down.weight", (m, h), problems),
                    take(tensors, f"{p}.down.bias", (m,), problems),
                    take(tensors, f"{p}.up.weight", (h, m), problems),
                    take(tensors, f"{p}.up.bias", (h,), problems),
                )
                if all(t is not None for t in got):
                    blocks[(layer, site)] = tuple(t.to(device=backbone.device, dtype=backbone.dtype).contiguous() for t in got)
        problems.raise_if_any()
        return AdapterWeights(kind=kind, bottleneck=m, activation=act, blocks=blocks)

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> MethodBatch | None:
        if all(p is None for p in parts):
            return None
        if not slots.poolable(parts):
            return AdapterBatch(parts, row_part)  # type: ignore[arg-type]
        rows = POOL.gather(parts, row_part)
        sites: dict[tuple[int, str], list[tuple]] = {}
        for key in sorted(rows.views, key=lambda k: k[2]):
            sites.setdefault((key[0], key[1]), []).append(key)
        return PooledAdapterBatch(rows, sites)
