"""LoRA: a low-rank update on frozen linears, `y = x W^T + scale * (x A^T) B^T` (Hu et al., 2021).

Batched across tasks without merging: for each (layer, site) the batch stacks the A and B of the
tasks present into tables indexed by a per-row slot (slot 0 is all zeros for rows whose task has
no LoRA there), pads ranks to the largest in the batch, and computes every row's delta with two
`bmm`s. One task in the batch skips the gather and uses plain matmuls.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.spec import BackboneInfo
from service.methods import slots
from service.methods.base import Method, MethodBatch, Problems, TaskWeights, register, take, trainable
from service.methods.slots import SlotTable

# The BERT pooler (dense + tanh on the first token) can carry LoRA too when a PEFT bundle targets
# "dense"; it lives outside the layer stack, at this pseudo layer index.
POOLER = (-1, "pooler")
_KEY = re.compile(r"^lora\.(-?\d+)\.(\w+)\.(A|B)$")


@dataclass(frozen=True)
class LoraWeights(TaskWeights):
    method = "lora"
    r: int
    alpha: float
    use_rslora: bool
    # (layer, site) -> (A [r, in], B [out, r])
    pairs: dict[tuple[int, str], tuple[Tensor, Tensor]]

    @property
    def scale(self) -> float:
        # rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r); classic LoRA by alpha / r.
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for (layer, site), (a, b) in sorted(self.pairs.items()):
            out[f"lora.{layer}.{site}.A"] = a
            out[f"lora.{layer}.{site}.B"] = b
        return out

    @classmethod
    def init(
        cls,
        info: BackboneInfo,
        *,
        r: int,
        alpha: float,
        targets: Sequence[str],
        layers: Sequence[int] | None = None,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> "LoraWeights":
        """Fresh trainable weights (leaf tensors, requires_grad): A kaiming-uniform(a=sqrt(5)) and
        B zeros, as HF PEFT initialises LoRA, so the update starts at exactly zero."""
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
        bad = [t for t in targets if t not in info.sites]
        if bad or not targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {', '.join(info.sites)}; got {list(targets)}")
        layers = range(info.num_layers) if layers is None else layers
        pairs = {}
        for layer in layers:
            for site in targets:
                fin, fout = info.site_shape(site)
                a = torch.nn.init.kaiming_uniform_(torch.empty(r, fin), a=math.sqrt(5), generator=generator)
                b = torch.zeros(fout, r)
                pairs[(layer, site)] = (trainable(a, info), trainable(b, info))
        return cls(r=r, alpha=float(alpha), use_rslora=use_rslora, pairs=pairs)

    def config(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "targets": sorted({site for _, site in self.pairs}),
            "layers": sorted({layer for layer, _ in self.pairs if layer >= 0}),
        }


class LoraBatch(MethodBatch):
    """Training path: tables stacked from the (gradient-carrying) task tensors for this batch."""

    def __init__(self, parts: Sequence[LoraWeights | None], row_part: Tensor):
        self.parts = parts
        self.row_part = row_part  # [B] index into parts
        self._tables: dict[tuple[int, str], SlotTable | None] = {}

    def _table(self, key: tuple[int, str]) -> SlotTable | None:
        """Tables (A [S, r, in], B [S, out, r] with the scale folded in) for one site, built once."""
        if key not in self._tables:
            per_part = [
                None if p is None or key not in p.pairs else (p.pairs[key][0], p.pairs[key][1] * p.scale)
                for p in self.parts
            ]
            self._tables[key] = slots.build(per_part, self.row_part)
        return self._tables[key]

    def adapts(self, layer: int, site: str) -> bool:
        return self._table((layer, site)) is not None

    def linear_delta(self, layer: int, site: str, x: Tensor) -> Tensor | None:
        t = self._table((layer, site))
        if t is None:
            return None
        lead = x.shape[:-1]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        y = slots.linear(slots.linear(x3, t, 0), t, 1)  # (x A^T) B^T per row: [B, T, out]
        return y.reshape(*lead, y.shape[-1])

    def select(self, rows: Tensor) -> "LoraBatch":
        out = LoraBatch(self.parts, self.row_part.index_select(0, rows))
        out._tables = {k: None if v is None else v.select(rows) for k, v in self._tables.items()}
        return out


def _pool_entries(w: LoraWeights) -> dict:
    """A task's pool entries: per (layer, site), A^T [in, r] and (scale B)^T [r, out], so a batch's
    delta is two bmms over gathered rows with no per-batch transpose or scaling."""
    return {(layer, site, a.shape[1], b.shape[0], a.device, a.dtype): (a.T, (b * w.scale).T)
            for (layer, site), (a, b) in w.pairs.items()}


POOL = slots.SlotPool(_pool_entries)


class PooledLoraBatch(MethodBatch):
    """Serving path: rows read their task's A and B from the persistent pool by slot; the delta is
    added into the frozen linear's fresh output in place (`baddbmm_`), saving a pass over it."""

    def __init__(self, rows: slots.PoolRows, sites: dict[tuple[int, str], tuple]):
        self.pool_rows = rows
        self.sites = sites  # (layer, site) -> pool key, for the sites some task of the batch adapts
        self._subset: tuple[Tensor, Tensor] | None | bool = False  # see _using (False: not computed)

    def add_linear_delta(self, layer: int, site: str, x: Tensor, y: Tensor) -> Tensor:
        key = self.sites.get((layer, site))
        if key is None:
            return y
        pr = self.pool_rows
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        y3 = y.view(y.shape[0], -1, y.shape[-1])  # [B, T, out]
        if pr.single:  # one task: plain matmuls, no gather
            y3.add_((x3 @ pr.one(key, 0)) @ pr.one(key, 1))
            return y
        using = self._using()
        if using is None:  # y_b += (x_b A_b^T)(s B_b)^T for every row b at once
            y3.baddbmm_(torch.bmm(x3, pr.rows(key, 0)), pr.rows(key, 1))
        else:  # the same for the rows whose task has LoRA here only
            rows, slot = using
            at, bt = pr.views[key]
            d = torch.bmm(torch.bmm(x3.index_select(0, rows), at.index_select(0, slot)), bt.index_select(0, slot))
            y3.index_add_(0, rows, d)
        return y

    def _using(self) -> tuple[Tensor, Tensor] | None:
        """(rows whose task has LoRA, their slots) when that is at most half the batch, else None."""
        if self._subset is False:
            slot = self.pool_rows.slot
            rows = slot.nonzero().squeeze(1)
            self._subset = (rows, slot.index_select(0, rows)) if rows.numel() <= slots.SPAN_MAX_SHARE * slot.numel() else None
        return self._subset  # type: ignore[return-value]

    def adapts(self, layer: int, site: str) -> bool:
        return (layer, site) in self.sites

    def packed_spans(self, layer: int, site: str, device) -> bool:
        return self.pool_rows.use_spans(device, wide=site in ("ffn_in", "ffn_out", "ffn_gate"))

    def add_packed_delta(self, layer: int, site: str, xp: Tensor, yp: Tensor, packing) -> None:
        """Per span of rows sharing a task: y[s:e] += (x[s:e] A^T)(sB)^T on packed positions."""
        key = self.sites.get((layer, site))
        if key is None:
            return
        at, bt = self.pool_rows.views[key]  # [S, in, r], [S, r, out]
        for start, end, slot in packing.runs(self.pool_rows.host_slots):
            yp[start:end].addmm_(xp[start:end] @ at[slot], bt[slot])

    def linear_delta(self, layer: int, site: str, x: Tensor) -> Tensor | None:
        """The delta alone, for x [B, in] (the pooler) or [B, T, in]."""
        key = self.sites.get((layer, site))
        if key is None:
            return None
        pr = self.pool_rows
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        y = torch.bmm(torch.bmm(x3, pr.rows(key, 0)), pr.rows(key, 1))  # [B, T, out]
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def select(self, rows: Tensor) -> "PooledLoraBatch":
        return PooledLoraBatch(self.pool_rows.select(rows), self.sites)


@register
class Lora(Method):
    name = "lora"
    order = 10

    def parse(self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> LoraWeights:
        problems = Problems("lora")
        r = section.get("r")
        alpha = section.get("alpha", r)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            problems.add(f"'r' must be a positive integer, got {r!r}")
        # JSON's NaN, 1e400 (inf) and 400-digit integers (float() raises) are numbers too: a scale
        # of them made every score NaN, refused only by the upload's probe forward as "overflow".
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= sys.float_info.max:
            problems.add(f"'alpha' must be a positive finite number, got {alpha!r}")
        problems.raise_if_any()
        pairs: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        keys = sorted({k.rsplit(".", 1)[0] for k in tensors if k.startswith("lora.")})
        for k in tensors:
            if k.startswith("lora.") and not _KEY.match(k):
                problems.add(f"unrecognised LoRA tensor {k!r} (expected lora.<layer>.<site>.A|B)")
        for base in keys:
            m = _KEY.match(base + ".A")
            if not m:
                continue
            layer, site = int(m.group(1)), m.group(2)
            if (layer, site) == POOLER:
                if not backbone.has_pooler:
                    problems.add("LoRA targets the pooler but the backbone has none")
                    continue
                fin, fout = backbone.hidden_size, backbone.hidden_size
            else:
                if site not in backbone.sites:
                    problems.add(f"LoRA site {site!r} is not one of {', '.join(backbone.sites)}")
                    continue
                if not 0 <= layer < backbone.num_layers:
                    problems.add(f"LoRA on layer {layer}, but the backbone has {backbone.num_layers} layers")
                    continue
                fin, fout = backbone.site_shape(site)
            a = take(tensors, f"{base}.A", (r, fin), problems)
            b = take(tensors, f"{base}.B", (fout, r), problems)
            if a is not None and b is not None:
                pairs[(layer, site)] = (_to(a, backbone), _to(b, backbone))
        if not keys:
            problems.add("the bundle declares LoRA but has no lora.* tensors: it would change nothing")
        found = {(int(m.group(1)), m.group(2)) for m in (_KEY.match(k + ".A") for k in keys) if m}
        _check_stated(section, found, backbone, problems)
        problems.raise_if_any()
        return LoraWeights(r=r, alpha=float(alpha), use_rslora=bool(section.get("use_rslora", False)), pairs=pairs)

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> MethodBatch | None:
        if all(p is None for p in parts):
            return None
        if not slots.poolable(parts):
            return LoraBatch(parts, row_part)  # type: ignore[arg-type]
        rows = POOL.gather(parts, row_part)
        sites = {(k[0], k[1]): k for k in rows.views}
        return PooledLoraBatch(rows, sites)


def _check_stated(section: Mapping[str, Any], found: set[tuple[int, str]], backbone: BackboneInfo, problems: Problems) -> None:
    """`layers` and `targets` are optional in the config (the tensors decide what is adapted), but
    a config that states them must say what the tensors hold: `LoraWeights.config` writes both, so a
    mismatch means the two files do not belong together, or a hand edit nobody can serve as written."""
    have_layers = sorted({layer for layer, _ in found if layer >= 0})  # as `LoraWeights.config` lists them
    have_sites = sorted({site for _, site in found})
    if "layers" in section:
        layers = section["layers"]
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            problems.add(f"'layers' must be a list of layer indices, got {layers!r}")
        else:
            missing = sorted({x for x in layers if not 0 <= x < backbone.num_layers})
            if missing:
                problems.add(f"'layers' names layers {missing}, but the backbone has {backbone.num_layers} layers "
                             f"(0..{backbone.num_layers - 1})")
            elif sorted(set(layers)) != have_layers:
                problems.add(f"'layers' is {sorted(set(layers))}, but the lora.* tensors adapt layers {have_layers}")
    if "targets" in section:
        targets = section["targets"]
        known = [*backbone.sites, *((POOLER[1],) if backbone.has_pooler else ())]
        if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets):
            problems.add(f"'targets' must be a list of site names, got {targets!r}")
        else:
            unknown = sorted({x for x in targets if x not in known})
            if unknown:
                problems.add(f"'targets' names {unknown}, which are not sites of this backbone ({', '.join(known)})")
            elif sorted(set(targets)) != have_sites:
                problems.add(f"'targets' is {sorted(set(targets))}, but the lora.* tensors adapt {have_sites}")


def _to(t: Tensor, backbone: BackboneInfo) -> Tensor:
    return t.to(device=backbone.device, dtype=backbone.dtype).contiguous()
