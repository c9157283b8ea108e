"""Malformed bundles of every method are refused with an error that names the problem."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.engine.bundle import CONFIG, WEIGHTS
from service.engine.engine import Engine
from service.engine.types import TaskKey, unprintable
from service.errors import BundleError, NoMatchingModuleError
from service.methods.lora import POOLER
from tests.factories import publish, random_head, random_lora, random_method, tiny_backbone


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tiny_backbone("bert", tmp_path_factory.mktemp("bb")))


def _bundle(engine: Engine, root: Path, method: str) -> Path:
    info = engine.backbone.info
    g = torch.Generator().manual_seed(0)
    w = {"head": random_head(info, g)}
    if method != "head":
        w[method] = random_method(method, info, g, 0)
    v = publish(root, "t", w, ["neg", "pos"], fingerprint=info.fingerprint)
    return root / "t" / v


def _edit(bundle: Path, cfg_fn=None, tensors_fn=None) -> None:
    if cfg_fn:
        cfg = json.loads((bundle / CONFIG).read_text())
        cfg_fn(cfg)
        (bundle / CONFIG).write_text(json.dumps(cfg))
    if tensors_fn:
        t = load_file(str(bundle / WEIGHTS))
        tensors_fn(t)
        save_file(t, str(bundle / WEIGHTS))


def _set(d: dict, path: str, value) -> None:
    *head, last = path.split(".")
    for k in head:
        d = d[k]
    d[last] = value


L = 2  # tiny backbone layers
H = 32
CASES = [
    # (method, config edit, tensor edit, expected message fragment)
    ("lora", None, lambda t: t.__setitem__("lora.0.query.A", torch.zeros(3, H)), "has shape [3, 32], expected [2, 32]"),
    ("lora", None, lambda t: t.pop("lora.1.query.B"), "missing tensor 'lora.1.query.B'"),
    ("lora", None, lambda t: t.__setitem__("lora.5.query.A", torch.zeros(2, H)), "layer 5, but the backbone has 2 layers"),
    ("lora", None, lambda t: t.__setitem__("lora.0.pooler_out.A", torch.zeros(2, H)), "not one of"),
    ("lora", None, lambda t: [t.pop(k) for k in list(t) if k.startswith("lora.")], "would change nothing"),
    ("lora", lambda c: _set(c, "methods.lora.r", 0), None, "'r' must be a positive integer"),
    ("lora", lambda c: _set(c, "methods.lora.r", True), None, "'r' must be a positive integer, got True"),
    # numbers no scale can be: they made every score NaN, or float() raised OverflowError
    ("lora", lambda c: _set(c, "methods.lora.alpha", float("nan")), None, "'alpha' must be a positive finite number, got nan"),
    ("lora", lambda c: _set(c, "methods.lora.alpha", float("inf")), None, "'alpha' must be a positive finite number, got inf"),
    ("lora", lambda c: _set(c, "methods.lora.alpha", 10**400), None, "'alpha' must be a positive finite number, got 1000"),
    ("lora", lambda c: _set(c, "methods.lora.alpha", True), None, "'alpha' must be a positive finite number, got True"),
    ("lora", None, lambda t: t["lora.0.query.A"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
    # `layers` and `targets` are optional, but when stated they must say what the tensors hold
    ("lora", lambda c: _set(c, "methods.lora.layers", [0, 1, 2]), None, "'layers' names layers [2], but the backbone has 2 layers (0..1)"),
    ("lora", lambda c: _set(c, "methods.lora.layers", [0]), None, "'layers' is [0], but the lora.* tensors adapt layers [0, 1]"),
    ("lora", lambda c: _set(c, "methods.lora.layers", "all"), None, "'layers' must be a list of layer indices"),
    ("lora", lambda c: _set(c, "methods.lora.targets", ["query", "value"]), None, "'targets' is ['query', 'value'], but the lora.* tensors adapt ['query']"),
    ("lora", lambda c: _set(c, "methods.lora.targets", ["q_proj"]), None, "'targets' names ['q_proj'], which are not sites of this backbone"),
    ("adapter", None, lambda t: t.__setitem__("adapter.0.ffn.up.weight", torch.zeros(H, 3)), "expected [32, 4]"),
    ("adapter", None, lambda t: t.pop("adapter.1.attn.down.bias"), "missing tensor 'adapter.1.attn.down.bias'"),
    ("adapter", None, lambda t: t.__setitem__("adapter.4.ffn.up.bias", torch.zeros(H)), "for layer 4, but the backbone has 2 layers"),
    ("adapter", lambda c: _set(c, "methods.adapter.kind", "pfeiffer"), None, "which a pfeiffer adapter does not use"),
    ("adapter", lambda c: _set(c, "methods.adapter.activation", "swish2"), None, "'activation' must be one of"),
    ("adapter", lambda c: _set(c, "methods.adapter.kind", ["houlsby"]), None, "'kind' must be one of ['houlsby', 'pfeiffer'], got ['houlsby']"),
    ("prefix", None, lambda t: t.__setitem__("prefix.keys", torch.zeros(L + 1, 2, H)), "prefixes for 3 layers, but the backbone has 2"),
    ("prefix", None, lambda t: t.pop("prefix.values"), "missing tensor 'prefix.values'"),
    ("prefix", None, lambda t: t.__setitem__("prefix.values", torch.zeros(L, 2, H + 1)), "expected [2, 2, 32]"),
    ("prefix", lambda c: _set(c, "methods.prefix.num_virtual_tokens", 1000), None, "'num_virtual_tokens' must be an integer in [1, 256]"),
    ("prefix", lambda c: _set(c, "max_length", 64), None, "virtual tokens exceeds the backbone's 64 positions"),
    ("prompt", None, lambda t: t.__setitem__("prompt.embeddings", torch.zeros(3, H + 2)), "expected [3, 32]"),
    ("prompt", None, lambda t: t.pop("prompt.embeddings"), "missing tensor 'prompt.embeddings'"),
    ("prompt", lambda c: _set(c, "max_length", 63), None, "virtual tokens exceeds"),
    ("head", lambda c: _set(c, "backbone", ["sha256:0"]), None, "'backbone' must be an object"),
    ("head", lambda c: _set(c, "labels", ["a", "b", "c"]), None, "head has 2 outputs but 3 labels are named"),
    ("head", None, lambda t: t.pop("head.out.bias"), "missing tensor 'head.out.bias'"),
    ("head", lambda c: _set(c, "methods.head.pooling", "max"), None, "pooling 'max' is not one of"),
    ("head", lambda c: _set(c, "methods.bitfit", {}), None, "unknown method(s) ['bitfit']"),
    ("head", None, lambda t: t.__setitem__("lora.0.query.A", torch.zeros(2, H)), "tensors belonging to no method"),
    ("head", lambda c: _set(c, "backbone.fingerprint", "sha256:" + "0" * 64), None, "task weights only make sense on the backbone"),
    ("head", lambda c: _set(c, "labels", ["a", "a"]), None, "'labels' has duplicates"),
    ("head", lambda c: _set(c, "labels", ["a", "b\x00"]), None, "'labels' must be printable text"),
    ("head", lambda c: _set(c, "labels", ["a", "two\nlines"]), None, "'labels' must be printable text"),
    ("head", lambda c: _set(c, "input_kind", "triple"), None, "'input_kind' must be one of"),
    ("head", lambda c: c.pop("methods"), None, "'methods' must be a non-empty object"),
]


@pytest.mark.parametrize("method,cfg_fn,tensors_fn,message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_malformed_bundle_is_refused(engine, tmp_path, method, cfg_fn, tensors_fn, message):
    b = _bundle(engine, tmp_path, method)
    engine.load_task(b, TaskKey("t", "ok"))  # the unedited bundle is fine
    _edit(b, cfg_fn, tensors_fn)
    with pytest.raises(BundleError) as e:
        engine.load_task(b, TaskKey("t", "bad"))
    assert message in str(e.value)


def test_lora_layers_and_targets_may_be_left_out_or_name_the_pooler(engine, tmp_path):
    b = _bundle(engine, tmp_path, "lora")
    _edit(b, lambda c: (c["methods"]["lora"].pop("layers"), c["methods"]["lora"].pop("targets")))
    engine.load_task(b, TaskKey("t", "unstated"))  # optional: the tensors decide
    info = engine.backbone.info
    g = torch.Generator().manual_seed(1)
    lora = random_lora(info, g, layers=[1])
    lora = dataclasses.replace(lora, pairs={**lora.pairs, POOLER: (torch.randn(lora.r, H), torch.randn(H, lora.r))})
    v = publish(tmp_path / "p", "t", {"lora": lora, "head": random_head(info, g)}, ["a", "b"], fingerprint=info.fingerprint)
    stated = json.loads((tmp_path / "p" / "t" / v / CONFIG).read_text())["methods"]["lora"]
    assert (stated["layers"], stated["targets"]) == ([1], ["pooler", "query", "value"])
    task = engine.load_task(tmp_path / "p" / "t" / v, TaskKey("t", v))
    assert set(task.weights["lora"].pairs) == set(lora.pairs)


def test_every_problem_reported_at_once(engine, tmp_path):
    b = _bundle(engine, tmp_path, "lora")
    _edit(b, lambda c: _set(c, "labels", ["x"]), lambda t: t.pop("lora.0.query.B"))
    with pytest.raises(BundleError) as e:
        engine.load_task(b, TaskKey("t", "bad"))
    assert "at least 2" in str(e.value) and "lora.0.query.B" in str(e.value)
    b = _bundle(engine, tmp_path / "2", "lora")
    _edit(b, None, lambda t: (t.pop("lora.0.query.B"), t.__setitem__("lora.1.query.A", torch.zeros(9, H))))
    with pytest.raises(BundleError) as e:
        engine.load_task(b, TaskKey("t", "bad"))
    assert "lora.0.query.B" in str(e.value) and "lora.1.query.A" in str(e.value)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: (b / CONFIG).write_text("{not json"), "not valid UTF-8 JSON"),
        (lambda b: (b / CONFIG).unlink(), "has no adapter_config.json"),
        (lambda b: (b / WEIGHTS).write_bytes(b"\x80\x03pickle"), "not a readable safetensors file"),
        (lambda b: (b / WEIGHTS).unlink(), "has no adapter_model.safetensors"),
        (lambda b: (b / CONFIG).write_text("[1, 2]"), "must hold a JSON object"),
    ],
)
def test_damaged_files(engine, tmp_path, damage, message):
    b = _bundle(engine, tmp_path, "lora")
    damage(b)
    with pytest.raises(BundleError) as e:
        engine.load_task(b, TaskKey("t", "bad"))
    assert message in str(e.value)


def test_peft_lora_matching_no_module_is_an_error(engine, tmp_path):
    """A PEFT LoRA whose targets match nothing in this backbone must not load as a no-op."""
    d = tmp_path / "peft"
    d.mkdir()
    (d / CONFIG).write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4,
                                        "target_modules": ["c_attn"]}))
    save_file(
        {
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, H),
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(H, 2),
            "base_model.model.classifier.weight": torch.zeros(2, H),
            "base_model.model.classifier.bias": torch.zeros(2),
        },
        str(d / WEIGHTS),
    )
    with pytest.raises(NoMatchingModuleError) as e:
        engine.load_task(d, TaskKey("t", "bad"))
    assert "do not exist in this bert backbone" in str(e.value)


def test_peft_prefix_with_wrong_layer_count(engine, tmp_path):
    d = tmp_path / "peft"
    d.mkdir()
    (d / CONFIG).write_text(json.dumps({"peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 4}))
    save_file({"prompt_embeddings": torch.zeros(4, 3 * 2 * H), "base_model.classifier.weight": torch.zeros(2, H),
               "base_model.classifier.bias": torch.zeros(2)}, str(d / WEIGHTS))
    with pytest.raises(BundleError) as e:
        engine.load_task(d, TaskKey("t", "bad"))
    assert "3 layers x 2 x 32" in str(e.value) and "(2 layers x 2 x 32)" in str(e.value)


def _peft_bundle(root: Path, peft_type: str, **config) -> Path:
    """A PEFT-format bundle for the tiny BERT (LoRA on one query, or a 4-token soft prompt) + classifier."""
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {"base_model.model.classifier.weight": torch.randn(2, H, generator=g),
               "base_model.model.classifier.bias": torch.randn(2, generator=g)}
    if peft_type == "LORA":
        module = "base_model.model.bert.encoder.layer.0.attention.self.query"
        tensors |= {f"{module}.lora_A.weight": torch.randn(2, H, generator=g), f"{module}.lora_B.weight": torch.randn(H, 2, generator=g)}
        base = {"r": 2, "lora_alpha": 4, "target_modules": ["query"]}
    else:
        tensors["prompt_embeddings"] = torch.randn(4, H, generator=g)
        base = {"num_virtual_tokens": 4}
    cfg = {"peft_type": peft_type, "task_type": "SEQ_CLS", **base, "adaptserve": {"labels": ["neg", "pos"]}}
    (root / CONFIG).write_text(json.dumps(cfg | config))
    save_file(tensors, str(root / WEIGHTS))
    return root


# id -> (PEFT type, config keys replaced, expected message fragment)
PEFT_CASES: dict[str, tuple[str, dict, str]] = {
    "adaptserve section a list": ("LORA", {"adaptserve": [1, 2]}, "the 'adaptserve' section must be an object such as {\"labels\": [...]"),
    "adaptserve section a string": ("PROMPT_TUNING", {"adaptserve": "neg,pos"}, "the 'adaptserve' section must be an object"),
    "LoRA num_virtual_tokens text": ("LORA", {"num_virtual_tokens": "abc"}, "'num_virtual_tokens' must be a non-negative integer, got 'abc'"),
    "prompt num_virtual_tokens text": ("PROMPT_TUNING", {"num_virtual_tokens": "abc"}, "'num_virtual_tokens' must be a positive integer, got 'abc'"),
    "prompt num_virtual_tokens true": ("PROMPT_TUNING", {"num_virtual_tokens": True}, "'num_virtual_tokens' must be a positive integer, got True"),
    "prompt num_virtual_tokens null": ("PROMPT_TUNING", {"num_virtual_tokens": None}, "'num_virtual_tokens' must be a positive integer, got None"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES), ids=list(PEFT_CASES))
def test_malformed_peft_config_is_a_bundle_error_naming_the_field(engine, tmp_path, case):
    """Not the TypeError / ValueError a parser would raise on the way (they read as bugs, and
    as `cannot convert dictionary update sequence element #0` to whoever uploaded the bundle)."""
    peft_type, config, message = PEFT_CASES[case]
    engine.load_task(_peft_bundle(tmp_path / "ok", peft_type), TaskKey("t", "ok"))  # the unedited bundle is fine
    with pytest.raises(BundleError) as e:
        engine.load_task(_peft_bundle(tmp_path / "bad", peft_type, **config), TaskKey("t", "bad"))
    assert f"task 't': {message}" in str(e.value)


def test_labels_refuse_control_characters_but_keep_format_characters() -> None:
    assert unprintable("pos\x00") and unprintable("a\tb") and unprintable("\ud800")
    assert not unprintable("می\u200cخواهم") and not unprintable("👍🏽") and not unprintable("très bien")
