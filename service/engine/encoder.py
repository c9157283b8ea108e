"""The shared encoder forward, written once over any supported family's frozen weights.

The encoder never sees a request or a task name: it sees token tensors and a `Plan`, the list of
per-method batch tables (`MethodBatch`) for this batch. Each hook point asks every method in the
plan; rows of tasks without that method get zeros from the method's tables.

It is driven layer by layer (`embed`, then `layer(i)` for each i) so that the engine can read
intermediate states (early exit) and drop rows between layers (`State.select`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.families import Family
from service.methods.base import MethodBatch


@dataclass
class Plan:
    """The per-method tables of one batch (already restricted to the batch's rows)."""

    batches: tuple[MethodBatch, ...] = ()
    # Training only: dropout on the embeddings, each sub-layer's output and the attention weights,
    # as the backbone was pre-trained and HF fine-tunes it. Serving never sets it.
    dropout: float = 0.0

    def select(self, rows: Tensor) -> "Plan":
        return Plan(tuple(b.select(rows) for b in self.batches), self.dropout)

    def drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout else x


@dataclass
class State:
    """Hidden states between layers. Row b of every tensor belongs to the same input."""

    hidden: Tensor  # [B, S, H]
    keep: Tensor  # [B, S] bool: real (prompt or text) positions
    text_start: Tensor  # [B] long: index of the first text token (after any soft prompt)
    text_len: Tensor  # [B] long: number of text tokens
    plan: Plan
    _packing: "Packing | None | bool" = False  # False: not computed yet

    @property
    def packing(self) -> "Packing | None":
        """The real positions as one flat index, when padding is worth skipping (else None)."""
        if self._packing is False:
            self._packing = Packing.of(self.keep)
        return self._packing  # type: ignore[return-value]

    def select(self, rows: Tensor) -> "State":
        """Keep only `rows` (in that order): early-exit compaction."""
        return State(
            hidden=self.hidden.index_select(0, rows),
            keep=self.keep.index_select(0, rows),
            text_start=self.text_start.index_select(0, rows),
            text_len=self.text_len.index_select(0, rows),
            plan=self.plan.select(rows),
        )


class Encoder:
    def __init__(self, family: Family):
        self.f = family
        self.num_layers = len(family.layers)
        self.head_dim = family.hidden_size // family.num_heads

    # -- embeddings ------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None, plan: Plan) -> State:
        """Token (and soft-prompt) embeddings. input_ids [B, T], right-padded."""
        e = self.f.embeddings
        words, keep, token_type_ids, text_start, text_len = assemble(e.word(input_ids), attention_mask, token_type_ids, plan)
        bsz, s = keep.shape
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(bsz, -1)  # [B, S]
        shifts = [x for x in (b.position_shift() for b in plan.batches) if x is not None]
        for shift in shifts:  # prefix tuning as PEFT runs it: text positions start after the prefix
            pos = pos + shift.unsqueeze(1)
        if shifts:  # a shifted row's padding, out to a longer row's length, can lie past the position
            pos = pos.masked_fill(~keep, 0)  # table (its real positions fit: bundle.py checks); it is never read
        x = words + e.position(pos + e.position_offset)
        if e.token_type is not None:
            x = x + e.token_type(token_type_ids)
        x = plan.drop(e.norm(x))
        if e.project is not None:
            x = e.project(x)
        return State(hidden=x, keep=keep, text_start=text_start, text_len=text_len, plan=plan)

    def finish(self, st: State) -> State:
        """After the last layer (decoders apply their final norm here)."""
        return st

    # -- one layer ---------------------------------------------------------------------------
    def _linear(self, i: int, site: str, x: Tensor, plan: Plan) -> Tensor:
        return linear(self.f, i, site, x, plan)

    def layer(self, i: int, st: State) -> State:
        """Run layer position i over the batch: post-LN attention block, then post-LN FFN block.

        Every linear, norm and residual is per position, so when the batch has enough padding
        they run on the real positions only (`Packing`); only attention itself needs the padded
        [B, S] layout. Per-row methods (LoRA deltas, adapters) read padded inputs either way."""
        L, plan, h = self.f.layers[i], st.plan, st.hidden
        pk = st.packing
        if pk is None:
            lin = lambda site, x: self._linear(i, site, x, plan)  # noqa: E731
            after = lambda site, x: self._after(i, site, x, plan)  # noqa: E731
            ctx = self._attention(i, st, lin("query", h), lin("key", h), lin("value", h))
            hp = h
            a = after("attn", plan.drop(lin("attn_out", ctx)))
        else:
            lin = lambda site, x: self._linear_packed(i, site, x, plan, pk)  # noqa: E731
            after = lambda site, x: self._after_packed(i, site, x, plan, pk)  # noqa: E731
            hp = pk.pack(h)  # [N, H]

            def proj(site: str) -> Tensor:  # q, k, v in the padded layout attention reads: the
                # frozen linear on real positions, per-row deltas added on the padded rows
                y = pk.unpack(L.site(site)(hp))
                for b in plan.batches:
                    if b.adapts(i, site):
                        y = b.add_linear_delta(i, site, h, y)
                return y

            ctx = self._attention(i, st, proj("query"), proj("key"), proj("value"))  # [B, S, H]
            # attn_out with per-row deltas that do not run on packed spans: padded, deltas fused
            padded = any(b.adapts(i, "attn_out") and not b.packed_spans(i, "attn_out", h.device) for b in plan.batches)
            a = pk.pack(self._linear(i, "attn_out", ctx, plan)) if padded else lin("attn_out", pk.pack(ctx))
            a = after("attn", plan.drop(a))
        hp = L.attn_norm(a + hp)
        f = lin("ffn_out", self.f.activation(lin("ffn_in", hp)))
        hp = L.ffn_norm(after("ffn", plan.drop(f)) + hp)
        return replace(st, hidden=hp if pk is None else pk.unpack_into(h, hp))

    def _attention(self, i: int, st: State, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Multi-head self-attention over [B, S, H] projections (any prefixes prepended) -> [B, S, H]."""
        bsz, s, hid = q.shape
        nh, hd = self.f.num_heads, self.head_dim

        def heads(t: Tensor) -> Tensor:  # [B, S, H] -> [B, nh, S, hd]
            return t.view(bsz, -1, nh, hd).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        keep = st.keep  # [B, S]
        for b in st.plan.batches:
            pre = b.kv_prefix(i)
            if pre is not None:  # prepend per-row prefixes, padding masked out
                pk, pv, pkeep = pre
                k = torch.cat([pk.to(k.dtype), k], dim=2)
                v = torch.cat([pv.to(v.dtype), v], dim=2)
                keep = torch.cat([pkeep, keep], dim=1)
        # softmax(q k^T / sqrt(d) + mask) v, with masked keys excluded exactly
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=st.plan.dropout)
        return ctx.transpose(1, 2).reshape(bsz, s, hid)

    def _after(self, i: int, site: str, x: Tensor, plan: Plan) -> Tensor:
        for b in plan.batches:
            x = b.after_sublayer(i, site, x)
        return x

    def _linear_packed(self, i: int, site: str, xp: Tensor, plan: Plan, pk: "Packing") -> Tensor:
        """The frozen linear on packed positions xp [N, in]; per-row deltas on the unpacked input,
        packed and added."""
        y = self.f.layers[i].site(site)(xp)  # [N, out]
        for b in plan.batches:
            if not b.adapts(i, site):
                continue
            if b.packed_spans(i, site, xp.device):
                b.add_packed_delta(i, site, xp, y, pk)
                continue
            d = b.linear_delta(i, site, pk.unpack(xp))
            if d is not None:
                y = y + pk.pack(d)
        return y

    def _after_packed(self, i: int, site: str, xp: Tensor, plan: Plan, pk: "Packing") -> Tensor:
        for b in plan.batches:
            if not b.adapts(i, site):
                continue
            if b.packed_spans(i, site, xp.device):
                xp = b.after_sublayer_packed(i, site, xp, pk)
            else:
                xp = pk.pack(b.after_sublayer(i, site, pk.unpack(xp)))
        return xp

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None, plan: Plan) -> State:
        st = self.embed(input_ids, attention_mask, token_type_ids, plan)
        for i in range(self.num_layers):
            st = self.layer(i, st)
        return self.finish(st)


@dataclass(frozen=True)
class Packing:
    """Real (kept) positions of a padded batch as one flat index: [B, S, X] <-> [N, X]."""

    index: Tensor  # [N] into the flattened B*S positions
    shape: tuple[int, int]  # (B, S)
    _lengths: list[int] | None = None  # real positions per row, computed on first use

    # Below this share of padding the copies in and out cost more than the skipped matmul rows save.
    MIN_PADDING = 0.1  # a guess, not tuned: on CPU packing paid off from about this much padding

    @classmethod
    def of(cls, keep: Tensor) -> "Packing | None":
        if keep.device.type != "cpu":
            # Packing saves arithmetic, which a GPU at serving shapes has to spare: it waits on
            # the CPU launching its kernels. There, packing cost ~100 more ops a MiniLM batch
            # (pack and unpack around every layer) and a device sync (`nonzero`), for nothing.
            return None
        bsz, s = keep.shape
        index = keep.reshape(-1).nonzero().squeeze(1)  # one device sync per batch (and per compaction)
        if index.numel() > (1 - cls.MIN_PADDING) * bsz * s:
            return None
        return cls(index, (bsz, s))

    def runs(self, row_keys: list[int]) -> list[tuple[int, int, int]]:
        """(start, end, key) spans of packed positions: consecutive rows with the same non-zero
        key (e.g. a slot) merged, rows with key 0 left out. Positions are row-major, so each row's
        real positions are one contiguous span."""
        if self._lengths is None:
            object.__setattr__(self, "_lengths", self.index.new_zeros(self.shape[0]).index_add_(
                0, self.index // self.shape[1], torch.ones_like(self.index)).tolist())
        out: list[tuple[int, int, int]] = []
        start = 0
        for key, n in zip(row_keys, self._lengths):  # type: ignore[arg-type]
            if key and out and out[-1][2] == key and out[-1][1] == start:
                out[-1] = (out[-1][0], start + n, key)
            elif key and n:
                out.append((start, start + n, key))
            start += n
        return out

    def pack(self, x: Tensor) -> Tensor:
        """[B, S, X] -> [N, X]"""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, xp: Tensor) -> Tensor:
        """[N, X] -> [B, S, X], zeros at padded positions."""
        out = xp.new_zeros(self.shape[0] * self.shape[1], xp.shape[-1])
        return out.index_copy(0, self.index, xp).view(*self.shape, xp.shape[-1])

    def unpack_into(self, base: Tensor, xp: Tensor) -> Tensor:
        """`base` [B, S, X] with its real positions replaced by xp [N, X]; padded positions keep
        base's (finite, ignored) values."""
        return base.reshape(-1, base.shape[-1]).index_copy(0, self.index, xp).view_as(base)


def assemble(words: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None, plan: Plan):
    """Prepend each row's soft prompt (if any) to its word embeddings.

    Row b becomes [prompt_b (P_b), text_b], right-padded to max_b(P_b + len_b); rows without a
    prompt have P_b = 0. Returns (embeddings [B, S, E], keep [B, S], token types [B, S], text_start [B], text_len [B]).
    """
    bsz, t = attention_mask.shape
    dev = attention_mask.device
    text_len = attention_mask.sum(dim=1).long()  # [B]
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(attention_mask)
    prompts = [p for p in (b.prompt() for b in plan.batches) if p is not None]
    if not prompts:
        return words, attention_mask.bool(), token_type_ids, torch.zeros(bsz, dtype=torch.long, device=dev), text_len
    (prompt, plen), = prompts  # a task has at most one soft prompt: [B, Pmax, E], [B]
    pmax = prompt.shape[1]
    # S = the longest row's prompt + text, not Pmax + T: a long prompt on a short text (or a
    # prompt-less row at full length) does not lengthen every row of the batch. Off the CPU,
    # reading that length back would wait for every kernel queued so far: S = Pmax + T there.
    s = int((plen + text_len).max()) if dev.type == "cpu" else pmax + t
    j = torch.arange(s, device=dev).unsqueeze(0)  # [1, S]
    in_prompt = j < plen.unsqueeze(1)  # [B, S]
    src = torch.where(in_prompt, j, pmax + (j - plen.unsqueeze(1))).clamp(0, pmax + t - 1)  # index into cat(prompt, words)
    stacked = torch.cat([prompt.to(words.dtype), words], dim=1)  # [B, Pmax + T, E]
    words = stacked.gather(1, src.unsqueeze(-1).expand(-1, -1, stacked.shape[-1]))  # [B, S, E]
    tt = torch.where(in_prompt, 0, token_type_ids.gather(1, (j - plen.unsqueeze(1)).clamp(0, t - 1)))
    keep = j < (plen + text_len).unsqueeze(1)
    return words, keep, tt, plen.long(), text_len


def linear(family: Family, i: int, site: str, x: Tensor, plan: Plan) -> Tensor:
    """The frozen linear `site` of layer i plus every method's per-row delta (LoRA)."""
    y = family.layers[i].site(site)(x)
    for b in plan.batches:
        y = b.add_linear_delta(i, site, x, y)
    return y
