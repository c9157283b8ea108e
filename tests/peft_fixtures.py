"""Tiny, random, fully offline Hugging Face PEFT adapters for BERT-family sequence classifiers.

`make_peft_bundle(method, out_dir, family=..., seed=...)` writes

    out_dir/base/     config.json, model.safetensors, tokenizer.json, tokenizer_config.json, vocab.txt
    out_dir/adapter/  adapter_config.json, adapter_model.safetensors  (exactly what PEFT's save_pretrained writes)

and returns `(base_dir, adapter_dir, reference_fn)`, where
`reference_fn(input_ids, attention_mask=None, token_type_ids=None) -> logits [B, num_labels]` is computed by PEFT
itself (the in-memory PeftModel that produced the adapter, eval mode, float32).

Every trainable weight is randomised (LoRA A *and* B, prompt / prefix embeddings, the `modules_to_save` copy of the
classifier head), so adapted logits differ from the base model's and a loader that drops any piece is caught.

Methods: "lora", "prompt", "prefix".  Families: "bert", "roberta", "distilbert", "albert", "electra".
Prefix tuning is only possible where the HF backbone accepts a KV cache: bert, roberta, electra.

Version caveat (peft 0.21.2 + transformers 5.24): PEFT's own forward for prefix tuning on *encoder* sequence
classifiers raises "Model does not support past key values which are required for prefix tuning." because
transformers renamed the backbone's `past_key_values` argument to `cache` (old name still accepted through a
deprecation shim, but PEFT inspects the signature).  `peft_logits` therefore replicates
`PeftModelForSequenceClassification._prefix_tuning_forward` line for line (PEFT's `get_prompt` -> DynamicCache,
attention mask prefixed with P ones, backbone called with the cache, dropout, classifier) when, and only when,
PEFT raises exactly that error.  Everything else is PEFT's forward unmodified.

Only torch, transformers and peft are imported.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import transformers
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

__all__ = [
    "FAMILIES",
    "METHODS",
    "PREFIX_FAMILIES",
    "DEFAULT_LORA_TARGETS",
    "tiny_config",
    "make_base_model",
    "make_peft_bundle",
    "load_peft_model",
    "peft_logits",
    "example_batch",
]

METHODS = ("lora", "prompt", "prefix")
FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra")
PREFIX_FAMILIES = ("bert", "roberta", "electra")  # backbones that accept a KV cache

# Default LoRA targets: every linear of every encoder layer (suffix match on module names).
# Note for bert: "dense" also matches bert.pooler.dense (PEFT adapts the pooler too).
# For roberta/electra "dense" would also match classifier.dense, but the classifier is in modules_to_save,
# which wins: the head is saved whole and gets no LoRA.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "albert": ["query", "key", "value", "dense", "ffn", "ffn_output"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}

_CLASSES = {
    "bert": transformers.BertForSequenceClassification,
    "roberta": transformers.RobertaForSequenceClassification,
    "distilbert": transformers.DistilBertForSequenceClassification,
    "albert": transformers.AlbertForSequenceClassification,
    "electra": transformers.ElectraForSequenceClassification,
}

VOCAB_SIZE = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
FFN = 64
EMBED = 16  # albert/electra embedding_size (!= hidden, so the embedding projection is exercised)
MAX_POS = 64
_N_WORDS = VOCAB_SIZE - 5  # words are "w0" ... "w94"


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and warnings for the duration (restores the previous state)."""
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _special_tokens(family: str) -> list[str]:
    # roberta numbers positions from padding_idx + 1 and its real checkpoints use <s>=0, <pad>=1, </s>=2;
    # mirror that id layout (with BERT-style names so one WordPiece tokenizer serves every family).
    if family == "roberta":
        return ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_config(family: str = "bert", num_labels: int = 3) -> transformers.PretrainedConfig:
    """A tiny randomly-initialisable config for `family` (dropout values are HF defaults; models are used in eval)."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS,
        num_labels=num_labels,
    )
    if family == "bert":
        return transformers.BertConfig(hidden_size=HIDDEN, intermediate_size=FFN, pad_token_id=0, **common)
    if family == "roberta":
        return transformers.RobertaConfig(
            hidden_size=HIDDEN, intermediate_size=FFN, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, **common,
        )
    if family == "electra":
        return transformers.ElectraConfig(
            hidden_size=HIDDEN, embedding_size=EMBED, intermediate_size=FFN, pad_token_id=0, **common
        )
    if family == "albert":
        return transformers.AlbertConfig(
            hidden_size=HIDDEN, embedding_size=EMBED, intermediate_size=FFN, pad_token_id=0,
            bos_token_id=2, eos_token_id=3, **common,
        )
    if family == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=VOCAB_SIZE, dim=HIDDEN, hidden_dim=FFN, n_layers=LAYERS, n_heads=HEADS,
            max_position_embeddings=MAX_POS, num_labels=num_labels, pad_token_id=0,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _has_token_types(family: str) -> bool:
    return family not in ("distilbert",)


def _write_tokenizer(base_dir: Path, family: str) -> None:
    vocab = _special_tokens(family) + [f"w{i}" for i in range(_N_WORDS)]
    (base_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    kwargs: dict[str, Any] = {"model_max_length": MAX_POS}
    if family in ("roberta", "distilbert"):
        kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    # transformers 5: BertTokenizerFast is an alias of the tokenizers-backed BertTokenizer, which takes the
    # vocabulary as a dict (`vocab_file=` is silently ignored there).
    tok = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, **kwargs)
    tok.save_pretrained(str(base_dir))


def make_base_model(out_dir: Path, family: str = "bert", *, seed: int = 0, num_labels: int = 3):
    """Build, save (config + model.safetensors + tokenizer) and return `(base_dir, model)` (model in eval mode)."""
    base_dir = Path(out_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _CLASSES[family](tiny_config(family, num_labels)).eval()
    with _quiet():
        model.save_pretrained(str(base_dir))
        _write_tokenizer(base_dir, family)
    model.name_or_path = str(base_dir)  # recorded by PEFT as base_model_name_or_path
    return base_dir, model


def _peft_config(method: str, family: str, cfg, *, num_virtual_tokens: int, r: int, lora_alpha: int,
                 use_rslora: bool, target_modules, prefix_projection: bool, encoder_hidden_size: int | None,
                 lora_options: Mapping[str, Any] | None = None):
    if method == "lora":
        kwargs: dict[str, Any] = dict(
            task_type="SEQ_CLS",
            r=r,
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
            lora_dropout=0.0,
            target_modules=list(target_modules or DEFAULT_LORA_TARGETS[family]),
            modules_to_save=["classifier"],  # distilbert: also matches pre_classifier (suffix match)
        )
        kwargs.update(lora_options or {})
        return LoraConfig(**kwargs)
    # PEFT infers token_dim/num_layers/heads from config.hidden_size etc.; that fails for distilbert (dim/n_layers)
    # and is wrong for prompt tuning on albert/electra, whose word embeddings are embedding_size wide.
    dims: dict[str, Any] = {}
    if family == "distilbert":
        dims = dict(token_dim=cfg.dim, num_layers=cfg.n_layers, num_attention_heads=cfg.n_heads)
    if method == "prompt":
        if family in ("albert", "electra"):
            dims["token_dim"] = cfg.embedding_size
        return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=num_virtual_tokens, **dims)
    if method == "prefix":
        if family not in PREFIX_FAMILIES:
            raise NotImplementedError(
                f"prefix tuning is not supported by HF {family} (its backbone takes no KV cache)"
            )
        return PrefixTuningConfig(
            task_type="SEQ_CLS",
            num_virtual_tokens=num_virtual_tokens,
            prefix_projection=prefix_projection,
            encoder_hidden_size=encoder_hidden_size or cfg.hidden_size,
            **dims,
        )
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


@torch.no_grad()
def _randomise_trainables(pm, seed: int) -> None:
    """Give every trainable tensor non-zero random values (LoRA B included)."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_" in name:
            std = 0.1
        elif "prompt_encoder" in name:
            std = 0.5
        else:  # modules_to_save copy of the classifier head
            std = 0.2
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def _as_long(x) -> torch.Tensor | None:
    if x is None:
        return None
    return torch.as_tensor(x, dtype=torch.long)


_PREFIX_ERR = "does not support past key values"


def _prefix_forward_replica(pm, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
    """Line-for-line replica of PeftModelForSequenceClassification.forward + _prefix_tuning_forward (backbone branch)."""
    pcfg = pm.active_peft_config
    batch = input_ids.shape[0]
    if attention_mask is not None:
        prefix_mask = torch.ones(batch, pcfg.num_virtual_tokens).to(attention_mask.device)
        attention_mask = torch.cat((prefix_mask, attention_mask), dim=1)
    past_key_values = pm.get_prompt(batch)  # DynamicCache holding the per-layer [B, heads, P, head_dim] K/V
    backbone = pm.base_model.get_submodule(pm.transformer_backbone_name)
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    if "cache" in inspect.signature(backbone.forward).parameters:
        kwargs["cache"] = past_key_values  # transformers >= 5.x name; `past_key_values=` is a deprecated alias
    else:
        kwargs["past_key_values"] = past_key_values
    outputs = backbone(**kwargs)
    pooled = outputs[1] if len(outputs) > 1 else outputs[0]
    if "dropout" in [n for n, _ in pm.base_model.named_children()]:
        pooled = pm.base_model.dropout(pooled)
    return pm.base_model.get_submodule(pm.cls_layer_name)(pooled)


@torch.no_grad()
def peft_logits(pm, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
    """Logits of a PeftModel (any method) in eval mode.

    Uses PEFT's own forward; only for prefix tuning, where peft 0.21.2 + transformers 5.x refuses encoder
    classifiers, falls back to `_prefix_forward_replica` (same computation, see module docstring).
    """
    pm.eval()
    input_ids = _as_long(input_ids)
    attention_mask = _as_long(attention_mask)
    token_type_ids = _as_long(token_type_ids)
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask)
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    with _quiet():
        try:
            return pm(**kwargs).logits
        except ValueError as err:
            if pm.active_peft_config.peft_type != "PREFIX_TUNING" or _PREFIX_ERR not in str(err):
                raise
            return _prefix_forward_replica(pm, input_ids, attention_mask, token_type_ids)


def load_peft_model(base_dir: Path, adapter_dir: Path):
    """Reload a bundle from disk the standard way: AutoModelForSequenceClassification + PeftModel.from_pretrained."""
    with _quiet():
        base = transformers.AutoModelForSequenceClassification.from_pretrained(str(base_dir)).eval()
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def make_peft_bundle(
    method: str,
    out_dir: Path,
    *,
    family: str = "bert",
    seed: int = 0,
    num_labels: int = 3,
    num_virtual_tokens: int = 4,
    r: int = 4,
    lora_alpha: int = 8,
    use_rslora: bool = False,
    target_modules: Sequence[str] | None = None,
    prefix_projection: bool = False,
    encoder_hidden_size: int | None = 16,
    lora_options: Mapping[str, Any] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> tuple[Path, Path, Callable[..., torch.Tensor]]:
    """Write a tiny base model + PEFT adapter under `out_dir` and return (base_dir, adapter_dir, reference_fn).

    reference_fn(input_ids, attention_mask=None, token_type_ids=None) -> float32 logits [B, num_labels], computed by
    PEFT (see `peft_logits`).  It also carries `.peft_model` (the PeftModel) and `.base_logits(...)` (the un-adapted
    base model's logits, for "the adapter changed something" checks).

    lora_options: extra LoraConfig kwargs, e.g. {"rank_pattern": {"query": 2}, "alpha_pattern": {"value": 3}}.
    extra_config: keys merged into adapter_config.json after saving (e.g. {"adaptserve": {...}}); PEFT ignores
    unknown keys with a UserWarning.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out_dir = Path(out_dir)
    base_dir, model = make_base_model(out_dir / "base", family, seed=seed, num_labels=num_labels)
    base_model = copy.deepcopy(model)  # untouched copy (get_peft_model wraps `model` in place)

    pcfg = _peft_config(
        method, family, model.config,
        num_virtual_tokens=num_virtual_tokens, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
        target_modules=target_modules, prefix_projection=prefix_projection,
        encoder_hidden_size=encoder_hidden_size, lora_options=lora_options,
    )
    with _quiet():
        pm = get_peft_model(model, pcfg)  # wraps `model` in place
        _randomise_trainables(pm, seed)
        pm.eval()
        adapter_dir = out_dir / "adapter"
        pm.save_pretrained(str(adapter_dir))
    if extra_config:
        cfg_path = adapter_dir / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data.update(extra_config)
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True))

    has_tt = _has_token_types(family)

    def reference_fn(input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return peft_logits(pm, input_ids, attention_mask, token_type_ids if has_tt else None)

    @torch.no_grad()
    def base_logits(input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        kw = dict(input_ids=_as_long(input_ids), attention_mask=_as_long(attention_mask))
        if has_tt and token_type_ids is not None:
            kw["token_type_ids"] = _as_long(token_type_ids)
        return base_model(**kw).logits

    reference_fn.peft_model = pm  # type: ignore[attr-defined]
    reference_fn.base_logits = base_logits  # type: ignore[attr-defined]
    reference_fn.family = family  # type: ignore[attr-defined]
    reference_fn.method = method  # type: ignore[attr-defined]
    return base_dir, adapter_dir, reference_fn


def example_batch(family: str = "bert", padding_side: str = "right") -> dict[str, torch.Tensor]:
    """A padded batch of 2 with a sentence pair (token types 0/1) in the first row.

    padding_side="left" puts the pads first (HF BERT/ELECTRA/ALBERT/DistilBERT still number positions 0..S-1
    including pads; RoBERTa's input_ids path is pad-aware), which exercises position-id handling.
    Built from the fixture vocabulary ids directly (no tokenizer needed): special ids follow `_special_tokens`.
    """
    sp = {t: i for i, t in enumerate(_special_tokens(family))}
    cls, sep, pad = sp["[CLS]"], sp["[SEP]"], sp["[PAD]"]
    w = lambda i: 5 + i  # noqa: E731  id of word "w{i}"
    rows = [
        ([cls, w(1), w(2), sep, w(3), w(4), sep], [0, 0, 0, 0, 1, 1, 1]),
        ([cls, w(10), w(11), w(12), sep], [0, 0, 0, 0, 0]),
    ]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)
    if padding_side not in ("right", "left"):
        raise ValueError(padding_side)
    for i, (ids, tts) in enumerate(rows):
        sl = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
        input_ids[i, sl] = torch.tensor(ids)
        attention_mask[i, sl] = 1
        token_type_ids[i, sl] = torch.tensor(tts)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _has_token_types(family) and family != "roberta":
        batch["token_type_ids"] = token_type_ids
    return batch
