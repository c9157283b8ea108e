"""The PEFT fixtures work, and pin down the PEFT semantics our own encoder forward must reproduce.

The hand-written BERT forward at the bottom is the executable summary of /work/notes/peft.md: if a transformers or
peft upgrade changes position ids, masks, pooling position or the saved key layout, these tests say so.
"""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

try:
    import peft_fixtures as pf  # tests/ on sys.path (pytest's default "prepend" import mode)
except ImportError:  # tests/ is a package
    from tests import peft_fixtures as pf

example_batch, load_peft_model, make_peft_bundle, peft_logits = (
    pf.example_batch, pf.load_peft_model, pf.make_peft_bundle, pf.peft_logits,
)

_CACHE: dict = {}


def bundle(tmp_path_factory, method, family="bert", **kw):
    key = (method, family, tuple(sorted(kw.items())))
    if key not in _CACHE:
        out = tmp_path_factory.mktemp(f"{family}_{method}")
        _CACHE[key] = make_peft_bundle(method, out, family=family, **kw)
    return _CACHE[key]


BERT_CASES = [("lora", {}), ("lora", {"use_rslora": True}), ("prompt", {}), ("prefix", {}),
              ("prefix", {"prefix_projection": True})]


@pytest.mark.parametrize("method,kw", BERT_CASES, ids=lambda x: str(x))
def test_bert_bundle_reloads_with_same_logits(tmp_path_factory, method, kw):
    base_dir, adapter_dir, ref = bundle(tmp_path_factory, method, **kw)
    batch = example_batch("bert")
    want = ref(**batch)
    assert want.shape == (2, 3) and want.dtype == torch.float32
    got = peft_logits(load_peft_model(base_dir, adapter_dir), **batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # every trainable piece was randomised, so the adapter visibly changes the output
    assert (want - ref.base_logits(**batch)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "family,method",
    [("roberta", "lora"), ("roberta", "prompt"), ("roberta", "prefix"), ("distilbert", "lora"),
     ("distilbert", "prompt"), ("albert", "lora"), ("albert", "prompt"), ("electra", "lora"),
     ("electra", "prompt"), ("electra", "prefix")],
)
def test_other_families_reload(tmp_path_factory, family, method):
    base_dir, adapter_dir, ref = bundle(tmp_path_factory, method, family)
    batch = example_batch(family)
    want = ref(**batch)
    got = peft_logits(load_peft_model(base_dir, adapter_dir), **batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (want - ref.base_logits(**batch)).abs().max() > 1e-3


def test_prefix_unsupported_families_raise(tmp_path):
    for family in ("distilbert", "albert"):
        with pytest.raises(NotImplementedError):
            make_peft_bundle("prefix", tmp_path / family, family=family)


def test_base_folder_loads_offline_with_tokenizer(tmp_path_factory):
    from transformers import AutoConfig, AutoTokenizer

    base_dir, _, _ = bundle(tmp_path_factory, "lora")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(base_dir))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    enc = tok(["w1 w2", "w3 w4 w5"], ["w6", "w7"], padding=True, return_tensors="pt")
    # [CLS]=2 w1=6 w2=7 [SEP]=3 w6=11 [SEP]=3, [PAD]=0
    assert enc["input_ids"][0].tolist() == [2, 6, 7, 3, 11, 3, 0]
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert AutoConfig.from_pretrained(str(base_dir)).model_type == "bert"


def test_roberta_tokenizer_matches_config_pad(tmp_path_factory):
    from transformers import AutoConfig, AutoTokenizer

    base_dir, _, _ = bundle(tmp_path_factory, "lora", "roberta")
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    assert tok.pad_token_id == AutoConfig.from_pretrained(str(base_dir)).pad_token_id == 1
    assert "token_type_ids" not in tok("w1")


def test_saved_key_layout(tmp_path_factory):
    """The on-disk names our loader relies on."""
    _, lora_dir, _ = bundle(tmp_path_factory, "lora")
    keys = load_file(str(lora_dir / "adapter_model.safetensors"))
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    a = keys["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
    b = keys["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (32, 4)  # A: [r, in], B: [out, r]; no ".default." in saved names
    assert keys["base_model.model.bert.encoder.layer.1.intermediate.dense.lora_B.weight"].shape == (64, 4)
    assert "base_model.model.bert.pooler.dense.lora_A.weight" in keys  # "dense" also hits the pooler
    assert keys["base_model.model.classifier.weight"].shape == (3, 32)  # modules_to_save, unwrapped name
    # nothing else: no base weights (pooler included), no "modules_to_save"/"original_module" wrappers
    assert all(".lora_" in k or k.startswith("base_model.model.classifier.") for k in keys)
    assert set(k for k in keys if ".lora_" not in k) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}

    for method, shape in (("prompt", (4, 32)), ("prefix", (4, 2 * 2 * 32))):
        _, d, _ = bundle(tmp_path_factory, method)
        keys = load_file(str(d / "adapter_model.safetensors"))
        assert set(keys) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
        assert keys["prompt_embeddings"].shape == shape
    # prefix_projection: only the projected [P, 2*L*H] table is saved, not the MLP
    _, d, _ = bundle(tmp_path_factory, "prefix", prefix_projection=True)
    keys = load_file(str(d / "adapter_model.safetensors"))
    assert keys["prompt_embeddings"].shape == (4, 128) and not any("transform" in k for k in keys)


def test_extra_config_keys_are_tolerated(tmp_path):
    from peft import PeftConfig

    extra = {"adaptserve": {"name": "demo", "labels": ["a", "b", "c"], "version": 1}}
    base_dir, adapter_dir, ref = make_peft_bundle("lora", tmp_path, extra_config=extra)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["adaptserve"] == extra["adaptserve"]
    with pytest.warns(UserWarning, match="adaptserve"):
        cfg = PeftConfig.from_pretrained(str(adapter_dir))
    assert cfg.peft_type == "LORA"
    batch = example_batch()
    torch.testing.assert_close(peft_logits(load_peft_model(base_dir, adapter_dir), **batch), ref(**batch), rtol=0, atol=1e-6)


def test_prefix_replica_is_only_a_fallback(tmp_path_factory):
    """peft 0.21.2 + transformers 5.24 refuse prefix tuning on encoder classifiers; if a later version accepts it,
    its logits must equal our replica."""
    _, _, ref = bundle(tmp_path_factory, "prefix")
    pm = ref.peft_model
    batch = example_batch()
    with torch.no_grad():
        replica = pf._prefix_forward_replica(pm, **batch)
        try:
            native = pm(**batch).logits
        except ValueError as err:
            assert "past key values" in str(err)
        else:
            torch.testing.assert_close(native, replica, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Hand-written BERT forward from the files on disk: the semantics contract.
# ---------------------------------------------------------------------------------------------------------------

def _hand_bert_logits(base_dir, adapter_dir, input_ids, attention_mask, token_type_ids):
    cfg = json.loads((base_dir / "config.json").read_text())
    sd = load_file(str(base_dir / "model.safetensors"))
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ad = load_file(str(adapter_dir / "adapter_model.safetensors"))
    kind, P = acfg["peft_type"], acfg.get("num_virtual_tokens") or 0
    H, nh, L, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["layer_norm_eps"]
    hd = H // nh
    head = "base_model.model." if kind == "LORA" else "base_model."
    sd.update({k[len(head):]: v for k, v in ad.items() if k.startswith(head) and ".lora_" not in k})
    scale = acfg["lora_alpha"] / (math.sqrt(acfg["r"]) if acfg.get("use_rslora") else acfg["r"]) if kind == "LORA" else 0

    def lin(x, n):
        y = x @ sd[n + ".weight"].T + sd[n + ".bias"]
        if f"base_model.model.{n}.lora_A.weight" in ad:
            y = y + x @ ad[f"base_model.model.{n}.lora_A.weight"].T @ ad[f"base_model.model.{n}.lora_B.weight"].T * scale
        return y

    ln = lambda x, n: F.layer_norm(x, (H,), sd[n + ".weight"], sd[n + ".bias"], eps)  # noqa: E731
    B, T = input_ids.shape
    x = sd["bert.embeddings.word_embeddings.weight"][input_ids]
    mask, tt, pos0 = attention_mask.float(), token_type_ids, 0
    if kind == "PROMPT_TUNING":  # prompts prepended as input embeddings: positions 0..P-1, type 0, mask 1
        x = torch.cat([ad["prompt_embeddings"][None].expand(B, -1, -1), x], 1)
        tt = torch.cat([torch.zeros(B, P, dtype=torch.long), tt], 1)
        mask = torch.cat([torch.ones(B, P), mask], 1)
    if kind == "PREFIX_TUNING":  # real tokens get positions P..P+T-1; prefix keys always visible
        pos0, mask = P, torch.cat([torch.ones(B, P), mask], 1)
        kv = ad["prompt_embeddings"].view(P, 2 * L, nh, hd)
    S = x.shape[1]
    x = x + sd["bert.embeddings.position_embeddings.weight"][pos0:pos0 + S] + sd["bert.embeddings.token_type_embeddings.weight"][tt]
    x = ln(x, "bert.embeddings.LayerNorm")
    bias = (1 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + n).view(B, S, nh, hd).transpose(1, 2) for n in ("query", "key", "value"))
        if kind == "PREFIX_TUNING":
            k = torch.cat([kv[:, 2 * i].transpose(0, 1).expand(B, -1, -1, -1), k], 2)
            v = torch.cat([kv[:, 2 * i + 1].transpose(0, 1).expand(B, -1, -1, -1), v], 2)
        a = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, -1) @ v).transpose(1, 2).reshape(B, S, H)
        x = ln(lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        x = ln(lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense") + x, p + "output.LayerNorm")
    pooled = torch.tanh(lin(x[:, 0], "bert.pooler.dense"))  # position 0 = first virtual token for prompt tuning
    return lin(pooled, "classifier")


@pytest.mark.parametrize("method,kw", BERT_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_hand_written_bert_forward_matches_peft(tmp_path_factory, method, kw, padding_side):
    base_dir, adapter_dir, ref = bundle(tmp_path_factory, method, **kw)
    batch = example_batch("bert", padding_side=padding_side)
    with torch.no_grad():
        got = _hand_bert_logits(base_dir, adapter_dir, **batch)
    torch.testing.assert_close(got, ref(**batch), rtol=0, atol=1e-5)
