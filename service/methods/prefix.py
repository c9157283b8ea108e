"""Prefix tuning (Li & Liang, 2021): per-layer key/value prefixes of length P prepended in
self-attention. The stored tensors are the *projected* keys and values (what HF PEFT saves after
running its reparameterisation MLP), so serving needs no MLP.

Following PEFT on BERT-family encoders, where the prefix travels as `past_key_values`, the text
positions start after the prefix (position ids offset by P) unless `shift_positions` is false.
In a batch, rows are padded to the longest prefix and the padding is masked out of attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from service.engine.spec import BackboneInfo
from service.methods import slots
from service.methods.base import Method, MethodBatch, Problems, TaskWeights, register, take, trainable
from service.methods.prompt import MAX_VIRTUAL_TOKENS, sample_token_ids

if TYPE_CHECKING:
    from service.engine.backbone import Backbone

# Prefixes here are [L, P, hidden] split into the query heads, as BERT-family encoders attend. A
# causal LM with grouped-query attention (SmolLM2: 9 query heads, 3 key/value heads) keeps keys
# and values at the narrower KV width, and its forward (`service/engine/decoder.py`) has no
# prefix path: refused on decoders, as docs/few_shot.md says, until it is built and tested.
DECODER_REFUSAL = ("prefix tuning is not supported on causal-LM backbones (their attention has no prefix path); "
                   "use lora, adapter or prompt there")


@dataclass(frozen=True)
class PrefixWeights(TaskWeights):
    method = "prefix"
    keys: Tensor  # [L, P, H]
    values: Tensor  # [L, P, H]
    num_heads: int  # the backbone's, to split H into heads
    shift_positions: bool = True

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def positions_used(self) -> int:
        return self.num_virtual_tokens if self.shift_positions else 0

    @classmethod
    def init(
        cls,
        backbone: "Backbone",
        *,
        num_virtual_tokens: int,
        shift_positions: bool = True,
        generator: torch.Generator | None = None,
    ) -> "PrefixWeights":
        """Fresh trainable prefixes: the keys and values the frozen backbone itself computes, layer
        by layer, for a sequence of random common vocabulary tokens, i.e. the prefix starts as if
        those words had been prepended to every input.

        Li & Liang (2021) report that initialising from real words' activations trains better than
        random initialisation, and that optimising the prefix directly was unstable for them without
        a reparameterising MLP. Random normal keys/values are off the scale of real ones (large:
        they swamp attention; small: they only dilute it); starting on the backbone's own scale,
        the prefix trains directly in the serving format, with no MLP to fold away afterwards."""
        if backbone.info.kind == "decoder":
            raise ValueError(DECODER_REFUSAL)
        if not isinstance(num_virtual_tokens, int) or not 1 <= num_virtual_tokens <= MAX_VIRTUAL_TOKENS:
            raise ValueError(f"prefix length must be an integer in [1, {MAX_VIRTUAL_TOKENS}], got {num_virtual_tokens!r}")
        from service.engine.encoder import Plan  # the encoder imports the method contract

        info, layers, enc = backbone.info, backbone.family.layers, backbone.encoder
        ids = sample_token_ids(backbone.tokenizer, num_virtual_tokens, generator).to(info.device).unsqueeze(0)  # [1, P]
        keys, values = [], []
        with torch.no_grad():
            st = enc.embed(ids, torch.ones_like(ids), None, Plan())
            for i in range(enc.num_layers):  # the keys/values layer i attends over: [P, H] each
                keys.append(layers[i].key(st.hidden)[0])
                values.append(layers[i].value(st.hidden)[0])
                st = enc.layer(i, st)
        k, v = torch.stack(keys), torch.stack(values)  # [L, P, H]
        return cls(keys=trainable(k, info), values=trainable(v, info), num_heads=info.num_heads,
                   shift_positions=shift_positions)

    def tensors(self) -> dict[str, Tensor]:
        return {"prefix.keys": self.keys, "prefix.values": self.values}

    def config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "shift_positions": self.shift_positions}


def _pool_entries(w: PrefixWeights) -> dict:
    return {("kv", *w.keys.shape[::2], w.keys.device, w.keys.dtype): (w.keys, w.values)}  # [L, P, H] each


POOL = slots.SlotPool(_pool_entries)


class PrefixBatch(MethodBatch):
    """Rows read their prefixes from the slot pool (serving) or from tables stacked for this batch
    (training, where they carry gradients); both pad to the batch's longest prefix."""

    def __init__(self, parts: Sequence[PrefixWeights | None], row_part: Tensor, num_heads: int, _built=None):
        self.parts = parts
        self.row_part = row_part
        self.num_heads = num_heads
        self._rows: tuple[Tensor, Tensor] | None = None
        if _built is not None:  # select(): reuse the tables, slice the per-row state
            self.table, self.plen, self.shift, self.keep = _built
            return
        if slots.poolable(parts):
            self.table = slots.OneKey(POOL.gather(parts, row_part))
        else:
            self.table = slots.build([None if p is None else (p.keys, p.values) for p in parts], row_part)
        dev = row_part.device
        plen = slots.to_device([0 if p is None else p.num_virtual_tokens for p in parts], dev)
        shift = slots.to_device([p.positions_used if p is not None else 0 for p in parts], dev)
        self.plen = plen.index_select(0, row_part)  # [B]
        self.shift = shift.index_select(0, row_part)  # [B]
        pmax = max(p.num_virtual_tokens for p in parts if p is not None)
        self.keep = torch.arange(pmax, device=dev).unsqueeze(0) < self.plen.unsqueeze(1)  # [B, Pmax]

    def position_shift(self) -> Tensor | None:
        # asked of the parts, not of `shift`: reading a device tensor back waits for the device
        return self.shift if any(p is not None and p.positions_used for p in self.parts) else None

    def kv_prefix(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        if self._rows is None:
            self._rows = (self.table.rows(0), self.table.rows(1))  # [B, L, Pmax, H] each
        k, v = self._rows
        bsz, _, pmax, hid = k.shape
        nh = self.num_heads

        def heads(t: Tensor) -> Tensor:  # [B, Pmax, H] -> [B, nh, Pmax, hd]
            return t.view(bsz, pmax, nh, hid // nh).transpose(1, 2)

        return heads(k[:, layer]), heads(v[:, layer]), self.keep

    def select(self, rows: Tensor) -> "PrefixBatch":
        return PrefixBatch(self.parts, self.row_part.index_select(0, rows), self.num_heads,
                           _built=(self.table.select(rows), self.plen.index_select(0, rows),
                                   self.shift.index_select(0, rows), self.keep.index_select(0, rows)))


@register
class Prefix(Method):
    name = "prefix"
    order = 40

    def parse(self, section: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> PrefixWeights:
        problems = Problems("prefix")
        if backbone.kind == "decoder":
            problems.add(DECODER_REFUSAL)
            problems.raise_if_any()
        p = section.get("num_virtual_tokens")
        if not isinstance(p, int) or not 1 <= p <= MAX_VIRTUAL_TOKENS:
            problems.add(f"'num_virtual_tokens' must be an integer in [1, {MAX_VIRTUAL_TOKENS}], got {p!r}")
            problems.raise_if_any()
        extra = sorted(set(tensors) - {"prefix.keys", "prefix.values"})
        if extra:
            problems.add(f"unrecognised prefix tensors {extra}")
        for name in ("prefix.keys", "prefix.values"):
            t = tensors.get(name)
            if t is not None and t.dim() == 3 and t.shape[0] != backbone.num_layers:
                problems.add(f"tensor {name!r} has prefixes for {t.shape[0]} layers, but the backbone has {backbone.num_layers}")
        shape = (backbone.num_layers, p, backbone.hidden_size)
        k = take(tensors, "prefix.keys", shape, problems)
        v = take(tensors, "prefix.values", shape, problems)
        problems.raise_if_any()
        cast = lambda t: t.to(device=backbone.device, dtype=backbone.dtype).contiguous()  # noqa: E731
        return PrefixWeights(keys=cast(k), values=cast(v), num_heads=backbone.num_heads, shift_positions=bool(section.get("shift_positions", True)))

    def batch(self, parts: Sequence[TaskWeights | None], row_part: Tensor) -> PrefixBatch | None:
        if all(p is None for p in parts):
            return None
        num_heads = next(p for p in parts if p is not None).num_heads
        return PrefixBatch(parts, row_part, num_heads)  # type: ignore[arg-type]
