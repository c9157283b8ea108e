"""Where each BERT-family encoder keeps its weights.

Every supported family is a post-LayerNorm transformer encoder with the same per-layer math:

    h = LN_attn(h + attn_out(attention(query(h), key(h), value(h))))
    h = LN_ffn(h + ffn_out(act(ffn_in(h))))

They differ only in module names, in the embeddings (token types or not, an embedding-size
projection, RoBERTa's position offset) and in ALBERT sharing one layer's weights across depth.
A `Family` maps a loaded Hugging Face model onto that common shape so the encoder in
`encoder.py` is written once. Task weights are always addressed by layer *position* and a
canonical site name, so ALBERT's shared layers still get per-position task weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

# Canonical names of the linears inside one encoder layer; task weights (LoRA) target these.
SITES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class LayerModules:
    """The modules of one layer position (shared objects across positions for ALBERT)."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    attn_norm: nn.LayerNorm
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    ffn_norm: nn.LayerNorm
    ffn_gate: nn.Linear | None = None  # gated FFNs (Llama: down(silu(gate(x)) * up(x)))

    def site(self, name: str) -> nn.Linear:
        return getattr(self, name)

    def site_shapes(self) -> dict[str, tuple[int, int]]:
        names = SITES + (("ffn_gate",) if self.ffn_gate is not None else ())
        return {n: (self.site(n).in_features, self.site(n).out_features) for n in names}


@dataclass(frozen=True)
class EmbeddingModules:
    word: nn.Embedding
    position: nn.Embedding
    token_type: nn.Embedding | None
    norm: nn.LayerNorm
    project: nn.Linear | None  # ALBERT / ELECTRA map embedding_size -> hidden_size
    position_offset: int  # RoBERTa numbers positions from padding_idx + 1


@dataclass(frozen=True)
class Family:
    """A backbone family mapped onto the common encoder shape."""

    model_type: str
    embeddings: EmbeddingModules
    layers: tuple[LayerModules, ...]
    activation: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    hidden_size: int
    embedding_size: int
    max_positions: int  # usable positions (after RoBERTa's offset)
    pooler: nn.Linear | None  # BERT-style pooler (dense + tanh on the first token), if the checkpoint has one
    # PEFT module paths -> (layer position or None for all positions, site); used to import PEFT bundles.
    peft_paths: dict[str, tuple[int | None, str]]
    kind: str = "encoder"  # "encoder": post-LN, bidirectional; "decoder": pre-norm, causal (Llama)
    num_kv_heads: int = 0  # grouped-query attention (decoders); 0 = same as num_heads
    final_norm: nn.Module | None = None  # decoders normalise the last layer's output
    rotary: nn.Module | None = None  # decoders: rotary position embedding module


def _bert_like(model: nn.Module, model_type: str) -> Family:
    cfg = model.config
    emb = model.embeddings
    project = getattr(model, "embeddings_project", None)  # ELECTRA with embedding_size != hidden
    offset = 0
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        offset = cfg.pad_token_id + 1
    layers = []
    paths: dict[str, tuple[int | None, str]] = {}
    for i, layer in enumerate(model.encoder.layer):
        att = layer.attention
        layers.append(
            LayerModules(
                query=att.self.query,
                key=att.self.key,
                value=att.self.value,
                attn_out=att.output.dense,
                attn_norm=att.output.LayerNorm,
                ffn_in=layer.intermediate.dense,
                ffn_out=layer.output.dense,
                ffn_norm=layer.output.LayerNorm,
            )
        )
        base = f"encoder.layer.{i}"
        paths.update(
            {
                f"{base}.attention.self.query": (i, "query"),
                f"{base}.attention.self.key": (i, "key"),
                f"{base}.attention.self.value": (i, "value"),
                f"{base}.attention.output.dense": (i, "attn_out"),
                f"{base}.intermediate.dense": (i, "ffn_in"),
                f"{base}.output.dense": (i, "ffn_out"),
            }
        )
    pooler = model.pooler.dense if getattr(model, "pooler", None) is not None else None
    return Family(
        model_type=model_type,
        embeddings=EmbeddingModules(
            word=emb.word_embeddings,
            position=emb.position_embeddings,
            token_type=getattr(emb, "token_type_embeddings", None),
            norm=emb.LayerNorm,
            project=project,
            position_offset=offset,
        ),
        layers=tuple(layers),
        activation=ACT2FN[cfg.hidden_act],
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        embedding_size=emb.word_embeddings.embedding_dim,
        max_positions=cfg.max_position_embeddings - offset,
        pooler=pooler,
        peft_paths=paths,
    )


def _distilbert(model: nn.Module) -> Family:
    cfg = model.config
    emb = model.embeddings
    layers = []
    paths: dict[str, tuple[int | None, str]] = {}
    for i, layer in enumerate(model.transformer.layer):
        att = layer.attention
        layers.append(
            LayerModules(
                query=att.q_lin,
                key=att.k_lin,
                value=att.v_lin,
                attn_out=att.out_lin,
                attn_norm=layer.sa_layer_norm,
                ffn_in=layer.ffn.lin1,
                ffn_out=layer.ffn.lin2,
                ffn_norm=layer.output_layer_norm,
            )
        )
        base = f"transformer.layer.{i}"
        paths.update(
            {
                f"{base}.attention.q_lin": (i, "query"),
                f"{base}.attention.k_lin": (i, "key"),
                f"{base}.attention.v_lin": (i, "value"),
                f"{base}.attention.out_lin": (i, "attn_out"),
                f"{base}.ffn.lin1": (i, "ffn_in"),
                f"{base}.ffn.lin2": (i, "ffn_out"),
            }
        )
    return Family(
        model_type="distilbert",
        embeddings=EmbeddingModules(
            word=emb.word_embeddings,
            position=emb.position_embeddings,
            token_type=None,
            norm=emb.LayerNorm,
            project=None,
            position_offset=0,
        ),
        layers=tuple(layers),
        activation=ACT2FN[cfg.activation],
        num_heads=cfg.n_heads,
        hidden_size=cfg.dim,
        embedding_size=cfg.dim,
        max_positions=cfg.max_position_embeddings,
        pooler=None,
        peft_paths=paths,
    )


def _albert(model: nn.Module) -> Family:
    cfg = model.config
    emb = model.embeddings
    enc = model.encoder
    # ALBERT shares layer groups across depth: position i uses group i * groups // layers.
    layers = []
    paths: dict[str, tuple[int | None, str]] = {}
    n_layers, n_groups = cfg.num_hidden_layers, cfg.num_hidden_groups
    per_group = cfg.inner_group_num
    for i in range(n_layers):
        g = int(i / (n_layers / n_groups))
        for inner in range(per_group):
            layer = enc.albert_layer_groups[g].albert_layers[inner]
            att = layer.attention
            layers.append(
                LayerModules(
                    query=att.query,
                    key=att.key,
                    value=att.value,
                    attn_out=att.dense,
                    attn_norm=att.LayerNorm,
                    ffn_in=layer.ffn,
                    ffn_out=layer.ffn_output,
                    ffn_norm=layer.full_layer_layer_norm,
                )
            )
    for g in range(n_groups):
        for inner in range(per_group):
            base = f"encoder.albert_layer_groups.{g}.albert_layers.{inner}"
            # A PEFT module here is shared by every position that uses this group.
            paths.update(
                {
                    f"{base}.attention.query": (None, "query"),
                    f"{base}.attention.key": (None, "key"),
                    f"{base}.attention.value": (None, "value"),
                    f"{base}.attention.dense": (None, "attn_out"),
                    f"{base}.ffn": (None, "ffn_in"),
                    f"{base}.ffn_output": (None, "ffn_out"),
                }
            )
    return Family(
        model_type="albert",
        embeddings=EmbeddingModules(
            word=emb.word_embeddings,
            position=emb.position_embeddings,
            token_type=emb.token_type_embeddings,
            norm=emb.LayerNorm,
            project=enc.embedding_hidden_mapping_in,
            position_offset=0,
        ),
        layers=tuple(layers),
        activation=ACT2FN[cfg.hidden_act],
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        embedding_size=cfg.embedding_size,
        max_positions=cfg.max_position_embeddings,
        pooler=model.pooler if getattr(model, "pooler", None) is not None else None,
        peft_paths=paths,
    )


def _llama(model: nn.Module) -> Family:
    """Llama-family causal LMs (SmolLM2, Llama, Mistral without sliding window): pre-RMSNorm,
    rotary positions, grouped-query attention, SiLU-gated FFN."""
    cfg = model.config
    layers = []
    paths: dict[str, tuple[int | None, str]] = {}
    for i, layer in enumerate(model.layers):
        att, mlp = layer.self_attn, layer.mlp
        layers.append(
            LayerModules(
                query=att.q_proj, key=att.k_proj, value=att.v_proj, attn_out=att.o_proj,
                attn_norm=layer.input_layernorm, ffn_in=mlp.up_proj, ffn_out=mlp.down_proj,
                ffn_norm=layer.post_attention_layernorm, ffn_gate=mlp.gate_proj,
            )
        )
        base = f"layers.{i}"
        for name, site in (("self_attn.q_proj", "query"), ("self_attn.k_proj", "key"), ("self_attn.v_proj", "value"),
                           ("self_attn.o_proj", "attn_out"), ("mlp.up_proj", "ffn_in"), ("mlp.down_proj", "ffn_out"),
                           ("mlp.gate_proj", "ffn_gate")):
            paths[f"{base}.{name}"] = (i, site)
    return Family(
        model_type=cfg.model_type,
        embeddings=EmbeddingModules(word=model.embed_tokens, position=None, token_type=None, norm=None,  # type: ignore[arg-type]
                                    project=None, position_offset=0),
        layers=tuple(layers),
        activation=ACT2FN[cfg.hidden_act],
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        embedding_size=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        pooler=None,
        peft_paths=paths,
        kind="decoder",
        num_kv_heads=cfg.num_key_value_heads,
        final_norm=model.norm,
        rotary=model.rotary_emb,
    )


SUPPORTED = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "llama", "mistral", "qwen2")


def family_of(model: nn.Module) -> Family:
    """Map a loaded `AutoModel` encoder onto the common shape, or explain why it can't be."""
    model_type = model.config.model_type
    if model_type in ("bert", "roberta", "xlm-roberta", "camembert", "electra"):
        return _bert_like(model, model_type)
    if model_type == "distilbert":
        return _distilbert(model)
    if model_type == "albert":
        return _albert(model)
    if model_type in ("llama", "mistral", "qwen2"):
        return _llama(model)
    raise ValueError(
        f"backbone model_type {model_type!r} is not supported; supported encoder families: "
        + ", ".join(SUPPORTED)
    )


class SmallBatchLinear(nn.Linear):
    """A frozen layer linear that also keeps its weight input-major, for few-token inputs on a CPU.

    Single-threaded MKL sgemm reads `nn.Linear`'s [out, in] weight slowly when the input has few
    rows: a serving batch of 1-4 short texts is 10-60 tokens, and there the forward is bound by
    streaming the weights. With a contiguous [in, out] copy the same product runs as one `addmm`
    over contiguous columns: whole MiniLM forwards 1.08-1.22x faster at 1-4 short rows, about a
    tie from a few hundred tokens up (`bench/small_batch_layout.py`). Inputs of more than
    `max_tokens` rows keep PyTorch's own layout, which is the faster one for large Houlsby
    batches (docs/reliability.md, run 7).

    The weight and bias are the wrapped module's own Parameters, so the state dict, the
    fingerprint and the Hugging Face model are unchanged; the copy is a plain attribute (not a
    buffer, so it is never saved). Only the summation order differs: results move by float
    rounding. A trainable weight always takes `F.linear` (the copy would go stale).
    """

    def __init__(self, linear: nn.Linear, max_tokens: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.max_tokens = max_tokens
        self.weight_in_major = linear.weight.detach().t().contiguous()  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_tokens or self.weight.requires_grad or x.device != self.weight_in_major.device:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, self.in_features)
        y = torch.mm(x2, self.weight_in_major) if self.bias is None else torch.addmm(self.bias, x2, self.weight_in_major)
        return y.view(*x.shape[:-1], self.out_features)


def with_small_batch_layout(family: Family, max_tokens: int) -> Family:
    """The family with every layer linear wrapped in `SmallBatchLinear` (ALBERT's shared modules
    once). The Hugging Face model keeps its own modules; only the engine's forward uses these.
    Costs one more copy of the layer linears' weights (42 MB on MiniLM)."""
    wrapped: dict[int, SmallBatchLinear] = {}

    def wrap(lin: nn.Linear) -> SmallBatchLinear:
        if id(lin) not in wrapped:
            wrapped[id(lin)] = SmallBatchLinear(lin, max_tokens)
        return wrapped[id(lin)]

    layers = tuple(replace(layer, **{name: wrap(layer.site(name)) for name in layer.site_shapes()}) for layer in family.layers)
    return replace(family, layers=layers)
