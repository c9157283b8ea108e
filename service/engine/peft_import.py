"""Translate an HF PEFT bundle (LoRA, prefix tuning, prompt tuning) into the native format.

PEFT keeps the whole model's module paths in its tensor names and a PEFT-shaped config; serving
needs neither. We keep the few fields that change the math (as LoRAX does), map every module path
onto (layer position, canonical site) through the backbone family, and refuse what we cannot
reproduce exactly instead of serving something subtly different: LoRA variants whose forward is not
W + s*B*A on this backbone (DoRA, PiSSA/CorDA/OLoRA/LoftQ/LoRA-GA inits, which rewrite the base weights,
aLoRA, layer_replication, ...), and adapters trained on another architecture (module paths under another
model's prefix, or another family's classifier head) even where their shapes fit. A missing r / lora_alpha
means PEFT's defaults (8), as PEFT reads it.

Labels are not part of PEFT's format: an optional ``"adaptserve": {"labels": [...],
"input_kind": ..., "max_length": ...}`` section in adapter_config.json supplies them (PEFT ignores
unknown keys); without it labels are named LABEL_0..LABEL_{n-1}.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from service.engine.bundle import FORMAT, MIN_MAX_LENGTH
from service.engine.spec import BackboneInfo
from service.errors import BundleError, NoMatchingModuleError
from service.methods.lora import POOLER
from service.methods.prompt import MAX_VIRTUAL_TOKENS

# PEFT names LoRA tensors "base_model.model.<path>" and prompt-learning heads "base_model.<path>".
_PREFIXES = ("base_model.model.", "base_model.")
_DENSE_ACT = {"roberta": "tanh", "xlm-roberta": "tanh", "camembert": "tanh", "electra": "gelu", "distilbert": "relu"}
# The attribute under which each family's *ForSequenceClassification holds its encoder (HF `base_model_prefix`):
# PEFT module paths start with it. A LoRA module path under another one was trained on another architecture.
_MODEL_PREFIX = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta",
                 "electra": "electra", "distilbert": "distilbert", "albert": "albert",
                 "llama": "model", "mistral": "model", "qwen2": "model"}
# The head each family's *ForSequenceClassification has: `classifier` on the pooler (BERT, ALBERT),
# `classifier.dense` + `classifier.out_proj` (RoBERTa, ELECTRA), `pre_classifier` + `classifier` (DistilBERT).
_HEAD_STYLE = {"bert": "classifier", "albert": "classifier", "roberta": "out_proj", "xlm-roberta": "out_proj",
               "camembert": "out_proj", "electra": "out_proj", "distilbert": "pre_classifier"}
_HEAD_NAMES = {"classifier": "a single 'classifier' linear", "out_proj": "'classifier.dense' + 'classifier.out_proj'",
               "pre_classifier": "'pre_classifier' + 'classifier'"}
# PEFT's peft_type -> the method it is served as. PEFT spells its types so and reads no other spelling;
# uploads are held to it (`upload.intake.PEFT_TYPES`).
PEFT_METHODS = {"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
# PEFT's defaults (LoraConfig), used by PEFT itself when adapter_config.json lacks the key.
_PEFT_LORA_DEFAULT_R = 8
_PEFT_LORA_DEFAULT_ALPHA = 8
# init_lora_weights values whose initialisation rewrites the base model's weights (W - B0 A0 for PiSSA, ...):
# PEFT redoes it when the adapter is loaded, so the adapter is only right on that modified base.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _module_site(module: str, backbone: BackboneInfo) -> tuple[int | None, str] | None:
    """'bert.encoder.layer.0.attention.self.query' -> (0, 'query'); the model prefix is checked by `_foreign_prefix`."""
    return _module_site_and_prefix(module, backbone)[0]


def _module_site_and_prefix(module: str, backbone: BackboneInfo) -> tuple[tuple[int | None, str] | None, str]:
    """(site, the module path before it): 'bert.encoder.layer.0.attention.self.query' -> ((0, 'query'), 'bert')."""
    parts = module.split(".")
    for i in range(len(parts)):
        hit = backbone.peft_paths.get(".".join(parts[i:]))
        if hit is not None:
            return hit, ".".join(parts[:i])
    if parts[-2:] == ["pooler", "dense"]:
        return POOLER, ".".join(parts[:-2])
    if parts[-1:] == ["pooler"]:
        return POOLER, ".".join(parts[:-1])
    return None, ""


def _foreign_prefix(prefix: str, backbone: BackboneInfo) -> bool:
    """A module path under another model's attribute ('roberta.encoder...' on a BERT backbone): the adapter was
    trained on another architecture whose module names happen to match. No prefix (PEFT on the bare encoder)
    and the family's own prefix are fine; a backbone family this table does not know is not checked."""
    expected = _MODEL_PREFIX.get(backbone.model_type)
    return expected is not None and prefix not in ("", expected)


def _head(tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> tuple[dict[str, Any], dict[str, Tensor]]:
    names = {_strip(k): v for k, v in tensors.items()}
    if "classifier.out_proj.weight" in names:
        out, dense, pooling = "classifier.out_proj", "classifier.dense", "cls"
    elif "pre_classifier.weight" in names:  # DistilBERT: pre_classifier -> ReLU -> classifier
        out, dense, pooling = "classifier", "pre_classifier", "cls"
    elif backbone.model_type == "distilbert":
        raise BundleError(
            "DistilBERT's classifier reads a pre_classifier layer that this PEFT bundle does not carry: "
            "save it with modules_to_save=['pre_classifier', 'classifier']"
        )
    elif "classifier.weight" in names:
        out, dense = "classifier", None
        pooling = "pooler" if backbone.has_pooler else "cls"
    else:
        raise BundleError(
            "PEFT bundle has no classifier weights: save it from a *ForSequenceClassification model "
            "with the classifier in modules_to_save (task_type SEQ_CLS)"
        )
    style = "out_proj" if out == "classifier.out_proj" else ("pre_classifier" if dense == "pre_classifier" else "classifier")
    expected = _HEAD_STYLE.get(backbone.model_type)
    if expected is not None and style != expected:
        raise BundleError(
            f"PEFT bundle's classifier is {_HEAD_NAMES[style]}, the head of another architecture: a "
            f"{backbone.model_type} *ForSequenceClassification has {_HEAD_NAMES[expected]}. The adapter was trained "
            f"on another model than this {backbone.model_type} backbone; train it on this backbone"
        )
    section: dict[str, Any] = {"pooling": pooling, "dense": dense is not None}
    t = {"head.out.weight": names[f"{out}.weight"], "head.out.bias": names.get(f"{out}.bias")}
    used = {f"{out}.weight", f"{out}.bias"}
    if dense is not None:
        section["dense_activation"] = _DENSE_ACT.get(backbone.model_type, "tanh")
        t["head.dense.weight"] = names.get(f"{dense}.weight")
        t["head.dense.bias"] = names.get(f"{dense}.bias")
        used |= {f"{dense}.weight", f"{dense}.bias"}
    return section, {k: v for k, v in t.items() if v is not None}, used


def _lora(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo) -> tuple[dict, dict]:
    problems = []
    if cfg.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported")
    if cfg.get("bias", "none") != "none":
        problems.append(f"LoRA bias={cfg.get('bias')!r} trains backbone biases; only bias='none' is supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("per-module rank_pattern / alpha_pattern are not supported")
    if cfg.get("lora_bias"):
        problems.append("lora_bias=True (a bias on lora_B) is not supported")
    if cfg.get("trainable_token_indices"):
        problems.append("trainable_token_indices (trained embedding rows) are not supported")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        problems.append(
            f"init_lora_weights={init!r} rewrites the base model's weights when the adapter is made (and again when "
            "PEFT loads it), so the adapter only fits that modified model; convert it to a plain LoRA first: "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved before training>)"
        )
    for key, what in (("alora_invocation_tokens", "activated LoRA (applied only after the invocation tokens)"),
                      ("layer_replication", "layer_replication (repeated backbone layers)"),
                      ("target_parameters", "LoRA on parameters (target_parameters)"),
                      ("use_qalora", "QALoRA (use_qalora)"),
                      ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
                      ("arrow_config", "Arrow routing (arrow_config)")):
        if cfg.get(key):
            problems.append(f"{what} is not supported")
    if problems:
        raise BundleError("PEFT LoRA bundle: " + "; ".join(problems), problems=[f"PEFT LoRA bundle: {p}" for p in problems])
    out: dict[str, Tensor] = {}
    unmatched = []
    foreign: set[str] = set()
    for key, t in tensors.items():
        k = _strip(key)
        for ab in ("A", "B"):
            marker = f".lora_{ab}."
            if k.endswith(f"{marker}weight"):  # a lora_B.bias, lora_embedding_A, ... is not LoRA on a linear
                module = k.split(marker)[0]
                hit, prefix = _module_site_and_prefix(module, backbone)
                if hit is None:
                    unmatched.append(module)
                    continue
                if _foreign_prefix(prefix, backbone):
                    foreign.add(prefix)
                    continue
                layer, site = hit
                layers = range(backbone.num_layers) if layer is None else [layer]  # ALBERT: shared module
                for i in layers:
                    out[f"lora.{i}.{site}.{ab}"] = t
    if unmatched:
        raise NoMatchingModuleError(
            f"PEFT LoRA targets modules that do not exist in this {backbone.model_type} backbone: "
            f"{sorted(set(unmatched))[:5]}"
        )
    if foreign:
        expected = _MODEL_PREFIX[backbone.model_type]
        raise BundleError(
            f"PEFT LoRA was trained on another architecture: its modules are under {sorted(foreign)[:3]}, but a "
            f"{backbone.model_type} *ForSequenceClassification keeps its encoder under {expected!r}; train the "
            f"adapter on this {backbone.model_type} backbone"
        )
    if not out:
        raise NoMatchingModuleError(
            f"PEFT LoRA bundle targets {cfg.get('target_modules')!r} but holds no LoRA tensors for this backbone"
        )
    # A config without r / lora_alpha (hand-made, or trimmed) means PEFT's defaults, which PEFT itself then uses.
    if "r" not in cfg:
        ranks = sorted({t.shape[0] for k, t in out.items() if k.endswith(".A") and t.dim() == 2})
        if ranks != [_PEFT_LORA_DEFAULT_R]:
            raise BundleError(f"PEFT LoRA config has no 'r', which PEFT reads as {_PEFT_LORA_DEFAULT_R}, but its lora_A "
                              f"tensors have rank {', '.join(map(str, ranks))}: add the r it was trained with "
                              f"(\"r\": {ranks[0]}) to adapter_config.json")
    section = {"r": cfg.get("r", _PEFT_LORA_DEFAULT_R), "alpha": cfg.get("lora_alpha", _PEFT_LORA_DEFAULT_ALPHA),
               "use_rslora": bool(cfg.get("use_rslora"))}
    return section, out


def _virtual(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo, method: str) -> tuple[dict, dict]:
    names = {_strip(k): v for k, v in tensors.items()}
    emb = names.get("prompt_embeddings")
    if emb is None:
        raise BundleError(f"PEFT {method} bundle has no 'prompt_embeddings' tensor")
    p = _virtual_tokens(cfg, required=True)
    if cfg.get("num_transformer_submodules", 1) not in (1, None):
        raise BundleError("PEFT bundles for encoder-decoder models are not supported")
    if emb.dim() != 2 or emb.shape[0] != p:
        raise BundleError(f"PEFT {method} 'prompt_embeddings' has shape {list(emb.shape)}, expected [{p}, ...]")
    if method == "prompt":
        return {"num_virtual_tokens": p}, {"prompt.embeddings": emb}
    L, H = backbone.num_layers, backbone.hidden_size
    if emb.shape[1] != 2 * L * H:
        layers = emb.shape[1] / (2 * H)
        raise BundleError(
            f"PEFT prefix 'prompt_embeddings' has width {emb.shape[1]} (= {layers:g} layers x 2 x {H}); "
            f"this backbone needs {2 * L * H} ({L} layers x 2 x {H})"
        )
    # [P, L * 2 * H] -> [P, L, 2, H]: for layer l, index 2l is the key prefix and 2l+1 the value (PEFT's split(2)).
    kv = emb.view(p, L, 2, H).permute(2, 1, 0, 3)  # [2, L, P, H]
    return {"num_virtual_tokens": p, "shift_positions": True}, {"prefix.keys": kv[0].contiguous(), "prefix.values": kv[1].contiguous()}


def _refuse_unused(tensors: Mapping[str, Tensor], method: str, head_names: set[str]) -> None:
    """Every tensor of the bundle must be one this import applies. Another one (modules_to_save
    beyond the classifier, LoRA on embeddings, a lora_B bias, trainable token rows) is trained
    state the service would silently drop: it would then answer otherwise than the adapter."""
    unused = []
    for key in tensors:
        k = _strip(key)
        if k in head_names:
            continue
        if method == "lora" and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")):
            continue
        if method != "lora" and k == "prompt_embeddings":
            continue
        unused.append(k)
    if unused:
        shown = ", ".join(sorted(unused)[:5]) + (f" ... and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise BundleError(f"PEFT bundle holds tensors this service cannot apply, so it would answer otherwise than "
                          f"the adapter: {shown} (supported: LoRA on the encoder's linears and the pooler, prompt or "
                          "prefix embeddings, and the classifier in modules_to_save)")


def _virtual_tokens(cfg: Mapping[str, Any], *, required: bool) -> int:
    """`num_virtual_tokens`: a positive integer where the method needs it (prefix, prompt), else
    absent or a non-negative integer (JSON's true is not a count)."""
    p = cfg.get("num_virtual_tokens")
    if p is None and not required:
        return 0
    if not isinstance(p, int) or isinstance(p, bool) or p < (1 if required else 0):
        raise BundleError(f"'num_virtual_tokens' must be a {'positive' if required else 'non-negative'} integer, got {p!r}")
    return p


def _check_virtual_fits(p: int, backbone: BackboneInfo) -> None:
    """Refuse a prompt or prefix longer than this server serves on this backbone, naming the limit
    and why, before a max_length is derived from what the virtual tokens leave of the positions
    (which would otherwise come out below 2, even negative, and be reported as a second problem)."""
    room = backbone.max_positions - MIN_MAX_LENGTH  # prompt and prefix tokens take positions (`positions_used`)
    limit = min(MAX_VIRTUAL_TOKENS, room)
    if p <= limit:
        return
    why = []
    if p > MAX_VIRTUAL_TOKENS:
        why.append(f"this server serves at most {MAX_VIRTUAL_TOKENS} virtual tokens (longer prompts cost "
                   "more than they have been shown to help)")
    if p > room:
        why.append(f"this {backbone.model_type} backbone has {backbone.max_positions} positions, which the virtual "
                   f"tokens share with at least {MIN_MAX_LENGTH} text tokens")
    shown = p if p < 10**12 else f"a {len(str(p))}-digit number"
    raise BundleError(f"'num_virtual_tokens' is {shown}, more than the {limit} allowed here: {'; and '.join(why)}; "
                      f"train the adapter with num_virtual_tokens <= {limit}")


def _extra_section(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The optional `adaptserve` section (labels, input_kind, ...): an object when present; its
    fields are checked with the native config's (`bundle.parse`)."""
    extra = cfg.get("adaptserve")
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise BundleError(
            "the 'adaptserve' section must be an object such as {\"labels\": [...], \"input_kind\": \"single\"}, "
            f"got {type(extra).__name__}"
        )
    return dict(extra)


def from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], backbone: BackboneInfo, name: str) -> tuple[dict, dict]:
    """(PEFT config, PEFT tensors) -> (native config, native tensors); `bundle.parse` validates the rest."""
    # Any case: an upload spelled otherwise than PEFT ("lora") is refused (`upload.intake`), but a bundle stored
    # before that check, or put in the store by hand, serves as it did rather than fail at its next load.
    peft_type = str(cfg.get("peft_type", "")).upper()
    if cfg.get("task_type") not in (None, "SEQ_CLS"):
        raise BundleError(f"task {name!r}: PEFT task_type {cfg.get('task_type')!r} is not supported; use SEQ_CLS")
    if peft_type not in PEFT_METHODS:
        raise BundleError(f"task {name!r}: PEFT type {peft_type!r} is not supported (supported: {', '.join(PEFT_METHODS)})")
    method = PEFT_METHODS[peft_type]
    try:
        extra = _extra_section(cfg)
        virtual_tokens = _virtual_tokens(cfg, required=method != "lora")
        if method == "lora":
            section, native = _lora(cfg, tensors, backbone)
            virtual_tokens = 0  # PEFT's LoRA ignores num_virtual_tokens: it takes no positions
        else:
            _check_virtual_fits(virtual_tokens, backbone)
            section, native = _virtual(cfg, tensors, backbone, method)
        head_section, head, head_names = _head(tensors, backbone)
        _refuse_unused(tensors, method, head_names)
    except BundleError as e:
        raise type(e)(f"task {name!r}: {e}", problems=[f"task {name!r}: {p}" for p in e.problems]) from None
    n = head["head.out.weight"].shape[0]
    out_cfg = {
        "format": FORMAT,
        "labels": extra.get("labels") or [f"LABEL_{i}" for i in range(n)],
        "input_kind": extra.get("input_kind", "single"),
        "max_length": extra.get("max_length", min(128, backbone.max_positions - virtual_tokens)),
        "methods": {method: section, "head": head_section},
        "peft": {"peft_type": peft_type, "base_model_name_or_path": cfg.get("base_model_name_or_path")},
    }
    if "overflow" in extra:
        out_cfg["overflow"] = extra["overflow"]
    if extra.get("backbone_fingerprint"):
        out_cfg["backbone"] = {"fingerprint": extra["backbone_fingerprint"]}
    return out_cfg, {**native, **head}
