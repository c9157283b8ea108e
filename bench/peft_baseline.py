"""HF PEFT as the baseline: one PeftModel holding the same LoRA tasks as the engine.

The model is `BertForSequenceClassification` over the engine's own backbone weights (state dict
copied, so both start from identical numbers), with one PEFT LoRA adapter per task and each
task's classifier as PEFT's `modules_to_save` copy (what `task_type="SEQ_CLS"` does). The A/B
matrices and classifier weights are copied from the engine's `TaskWeights`, so the two must give
the same logits; the benchmark checks that before it times anything.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForSequenceClassification

from service.engine.backbone import Backbone
from service.methods.head import HeadWeights
from service.methods.lora import LoraWeights


def _paths(backbone: Backbone) -> dict[tuple[int, str], str]:
    """(layer, site) -> the module path PEFT matches (e.g. 'encoder.layer.0.attention.self.query')."""
    return {(layer, site): path for path, (layer, site) in backbone.info.peft_paths.items() if layer is not None}


def build_peft_lora(backbone: Backbone, tasks: Sequence[tuple[str, LoraWeights, HeadWeights]]):
    """A PeftModel with one adapter per (name, lora, head); returns it in eval mode on the backbone's
    device and dtype. Adapter weights stay in the serving dtype (autocast_adapter_dtype=False), as
    the engine keeps them, so both sides do the same arithmetic."""
    heads = {h.pooling for _, _, h in tasks}
    if heads != {"pooler"}:
        raise ValueError("BertForSequenceClassification pools with the BERT pooler: use pooling='pooler' heads")
    labels = {h.num_labels for _, _, h in tasks}
    if len(labels) != 1:
        raise ValueError("PEFT's modules_to_save copies one classifier shape: give every task the same label count")
    cfg = copy.deepcopy(backbone.model.config)
    cfg.num_labels = labels.pop()
    hf = AutoModelForSequenceClassification.from_config(cfg)
    base = getattr(hf, hf.base_model_prefix)
    base.load_state_dict(backbone.model.state_dict(), strict=True)
    hf.to(device=backbone.device, dtype=backbone.dtype).eval().requires_grad_(False)

    paths = _paths(backbone)
    pm = None
    for name, lw, _ in tasks:
        targets = sorted(paths[k] for k in lw.pairs)  # full paths: no suffix ambiguity (output.dense)
        lc = LoraConfig(task_type="SEQ_CLS", r=lw.r, lora_alpha=lw.alpha, lora_dropout=0.0, target_modules=targets,
                        use_rslora=lw.use_rslora, init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(hf, lc, adapter_name=name, autocast_adapter_dtype=False)
        else:
            pm.add_adapter(name, lc, autocast_adapter_dtype=False)
    assert pm is not None

    site_of = {path: key for key, path in paths.items()}
    by_name = {name: (lw, hw) for name, lw, hw in tasks}
    copied = 0
    with torch.no_grad():
        for mod_name, mod in pm.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            key = next(site_of[p] for p in site_of if mod_name.endswith("." + p))
            for name in mod.lora_A:
                lw = by_name[name][0]
                a, b = lw.pairs[key]
                mod.lora_A[name].weight.copy_(a)
                mod.lora_B[name].weight.copy_(b)
                if abs(mod.scaling[name] - lw.scale) > 1e-9:
                    raise AssertionError(f"PEFT scaling {mod.scaling[name]} != ours {lw.scale} for {name}")
                copied += 1
        clf = pm.base_model.model.classifier  # ModulesToSaveWrapper
        for name, (_, hw) in by_name.items():
            clf.modules_to_save[name].weight.copy_(hw.out_w)
            clf.modules_to_save[name].bias.copy_(hw.out_b)
    expected = sum(len(lw.pairs) for _, lw, _ in tasks)
    if copied != expected:
        raise AssertionError(f"copied {copied} LoRA pairs into PEFT, expected {expected}")
    pm.eval().requires_grad_(False)
    return pm
