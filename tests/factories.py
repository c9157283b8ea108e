"""Builders for tests: tiny random backbones of every family and random task weights."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

from service.engine.backbone import Backbone, load_backbone
from service.engine.bundle import write_bundle
from service.engine.families import SITES
from service.engine.spec import BackboneInfo
from service.methods.adapter import PLACEMENTS, AdapterWeights
from service.methods.head import HeadWeights
from service.methods.lora import LoraWeights
from service.methods.prefix import PrefixWeights
from service.methods.prompt import PromptWeights

WORDS = (
    "the a an movie film great good bad terrible boring fun plot acting is was it and or but not very "
    "really day park walk news sports world business science game team market price stock win lose "
    "love hate happy sad ok fine story long short ? . , !"
).split()
FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra")


def tiny_config(family: str, layers: int = 2) -> T.PretrainedConfig:
    vocab = 5 + len(WORDS)
    common = dict(vocab_size=vocab, max_position_embeddings=80)
    if family == "bert":
        return T.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, **common)
    if family == "roberta":
        return T.RobertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                               pad_token_id=0, vocab_size=vocab, max_position_embeddings=82)
    if family == "distilbert":
        return T.DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=64, **common)
    if family == "albert":
        return T.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=layers + 1, num_attention_heads=4,
                              intermediate_size=64, **common)
    if family == "electra":
        return T.ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                               intermediate_size=64, **common)
    raise ValueError(family)


def save_tiny_backbone(family: str, out: Path, seed: int = 0) -> Path:
    """A randomly initialised encoder folder with a word-level BERT tokenizer, loadable offline."""
    torch.manual_seed(seed)
    model = T.AutoModel.from_config(tiny_config(family))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # transformers 5's BertTokenizerFast takes the vocabulary as a dict (vocab_file= is ignored)
    tok = T.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, model_max_length=64)
    tok.save_pretrained(out)
    return out


def tiny_backbone(family: str, tmp: Path, seed: int = 0) -> Backbone:
    return load_backbone(save_tiny_backbone(family, tmp / f"backbone-{family}", seed), device="cpu", dtype="float32")


def _r(g: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def random_lora(info: BackboneInfo, g: torch.Generator, r: int = 4, sites=("query", "value"), layers=None) -> LoraWeights:
    pairs = {}
    for layer in layers if layers is not None else range(info.num_layers):
        for s in sites:
            fin, fout = info.site_shape(s)
            pairs[(layer, s)] = (_r(g, r, fin), _r(g, fout, r))
    return LoraWeights(r=r, alpha=2.0 * r, use_rslora=False, pairs=pairs)


def random_adapter(info: BackboneInfo, g: torch.Generator, kind: str = "houlsby", bottleneck: int = 8, activation: str = "relu") -> AdapterWeights:
    h = info.hidden_size
    blocks = {
        (layer, site): (_r(g, bottleneck, h), _r(g, bottleneck), _r(g, h, bottleneck), _r(g, h))
        for layer in range(info.num_layers)
        for site in PLACEMENTS[kind]
    }
    return AdapterWeights(kind=kind, bottleneck=bottleneck, activation=activation, blocks=blocks)


def random_prefix(info: BackboneInfo, g: torch.Generator, p: int = 3) -> PrefixWeights:
    shape = (info.num_layers, p, info.hidden_size)
    return PrefixWeights(keys=_r(g, *shape, scale=1.0), values=_r(g, *shape, scale=1.0), num_heads=info.num_heads)


def random_prompt(info: BackboneInfo, g: torch.Generator, p: int = 3) -> PromptWeights:
    return PromptWeights(embeddings=_r(g, p, info.embedding_size, scale=1.0))


def random_head(info: BackboneInfo, g: torch.Generator, labels: int = 2, pooling: str = "cls", dense: bool = False,
                scale: float = 0.5) -> HeadWeights:
    h = info.hidden_size
    return HeadWeights(
        pooling=pooling,
        out_w=_r(g, labels, h, scale=scale),
        out_b=_r(g, labels),
        dense_w=_r(g, h, h) if dense else None,
        dense_b=_r(g, h) if dense else None,
    )


def random_method(method: str, info: BackboneInfo, g: torch.Generator, variant: int = 0):
    """One task's weights for `method`, varied by `variant` (ranks, sites, lengths differ)."""
    if method == "lora":
        sites = [SITES[(variant + k) % len(SITES)] for k in range(1 + variant % len(SITES))]
        return random_lora(info, g, r=[2, 4, 8][variant % 3], sites=sites)
    if method == "adapter":
        return random_adapter(info, g, kind=["houlsby", "pfeiffer"][variant % 2], bottleneck=[4, 8, 16][variant % 3],
                              activation=["relu", "gelu"][variant % 2])
    if method == "prefix":
        return random_prefix(info, g, p=[2, 5, 3][variant % 3])
    if method == "prompt":
        return random_prompt(info, g, p=[3, 1, 6][variant % 3])
    raise ValueError(method)


def publish(store: Path, name: str, weights: dict, labels: list[str], input_kind: str = "single", max_length: int = 32,
            fingerprint: str | None = None) -> str:
    cfg = {"labels": labels, "input_kind": input_kind, "max_length": max_length}
    if fingerprint:
        cfg["backbone"] = {"fingerprint": fingerprint}
    return write_bundle(store, name, cfg, weights)


def save_tiny_lm(kind: str, out: Path, seed: int = 0) -> Path:
    """A tiny random LM with its head: kind "mlm" (BertForMaskedLM) or "causal" (LlamaForCausalLM)."""
    torch.manual_seed(seed)
    vocab = 5 + len(WORDS)
    if kind == "mlm":
        model = T.BertForMaskedLM(T.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, max_position_embeddings=80))
    elif kind == "causal":
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=80,
                                                pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True))
    else:
        raise ValueError(kind)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    T.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, model_max_length=64).save_pretrained(out)
    return out


def verbalizer_task(tokenizer, label_words: dict[str, list[str]]):
    from service.methods.verbalizer import VerbalizerWeights

    ids = tuple(tuple(tokenizer.convert_tokens_to_ids(w) for w in ws) for ws in label_words.values())
    return VerbalizerWeights(words=tuple(tuple(ws) for ws in label_words.values()), token_ids=ids)
