"""The shared forward for Llama-family causal LMs (SmolLM2 by default for prompt tasks).

Same contract as `Encoder` (embed, layer, finish over a `State` and a `Plan`), so every
encoder-stage method that makes sense on a decoder works unchanged: LoRA on any of the seven
linears (ffn_gate included), bottleneck adapters on the attention and FFN outputs, soft prompts.
Per layer:  h = h + o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h))));  h = h + down(silu(gate(n2(h))) * up(n2(h)))
with a causal mask over right-padded rows; the final RMSNorm is applied by `finish`.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from service.engine.encoder import Plan, State, assemble, linear
from service.engine.families import Family


class Decoder:
    def __init__(self, family: Family):
        self.f = family
        self.num_layers = len(family.layers)
        self.head_dim = family.layers[0].query.out_features // family.num_heads
        self.kv_groups = family.num_heads // family.num_kv_heads

    def embed(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None, plan: Plan) -> State:
        words, keep, _, text_start, text_len = assemble(self.f.embeddings.word(input_ids), attention_mask, None, plan)
        return State(hidden=plan.drop(words), keep=keep, text_start=text_start, text_len=text_len, plan=plan)

    def _linear(self, i: int, site: str, x: Tensor, plan: Plan) -> Tensor:
        return linear(self.f, i, site, x, plan)

    def layer(self, i: int, st: State) -> State:
        L, plan, h = self.f.layers[i], st.plan, st.hidden
        bsz, s, _ = h.shape
        nh, hd = self.f.num_heads, self.head_dim
        for b in plan.batches:
            if b.kv_prefix(i) is not None:
                raise ValueError("prefix tuning is not supported on causal-LM backbones; use LoRA or a soft prompt")
        x = L.attn_norm(h)
        q = self._linear(i, "query", x, plan).view(bsz, s, nh, hd).transpose(1, 2)  # [B, nh, S, hd]
        k = self._linear(i, "key", x, plan).view(bsz, s, -1, hd).transpose(1, 2)  # [B, nkv, S, hd]
        v = self._linear(i, "value", x, plan).view(bsz, s, -1, hd).transpose(1, 2)
        pos = torch.arange(s, device=h.device).unsqueeze(0).expand(bsz, -1)
        cos, sin = self.f.rotary(v, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.kv_groups > 1:  # grouped-query attention: each kv head serves kv_groups query heads
            k = k.repeat_interleave(self.kv_groups, dim=1)
            v = v.repeat_interleave(self.kv_groups, dim=1)
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
        mask = causal[None, None] & st.keep[:, None, None, :]  # [B, 1, S, S]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=plan.dropout)
        a = plan.drop(self._linear(i, "attn_out", ctx.transpose(1, 2).reshape(bsz, s, nh * hd), plan))
        for b in plan.batches:
            a = b.after_sublayer(i, "attn", a)
        h = h + a
        x = L.ffn_norm(h)
        f = self.f.activation(self._linear(i, "ffn_gate", x, plan)) * self._linear(i, "ffn_in", x, plan)
        f = plan.drop(self._linear(i, "ffn_out", f, plan))
        for b in plan.batches:
            f = b.after_sublayer(i, "ffn", f)
        return replace(st, hidden=h + f)

    def finish(self, st: State) -> State:
        return replace(st, hidden=self.f.final_norm(st.hidden))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None, plan: Plan) -> State:
        st = self.embed(input_ids, attention_mask, token_type_ids, plan)
        for i in range(self.num_layers):
            st = self.layer(i, st)
        return self.finish(st)
