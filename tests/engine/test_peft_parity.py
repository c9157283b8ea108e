"""Ours == HF PEFT's own forward for the same adapter files (LoRA, prefix tuning, prompt tuning)."""
from __future__ import annotations

import pytest
import torch

from service.engine.backbone import load_backbone
from service.engine.engine import Batch, Engine
from service.engine.types import TaskKey
from tests.peft_fixtures import FAMILIES, PREFIX_FAMILIES, example_batch, make_peft_bundle

CASES = [("lora", f) for f in FAMILIES] + [("prompt", f) for f in FAMILIES] + [("prefix", f) for f in PREFIX_FAMILIES]


@pytest.mark.parametrize("method,family", CASES)
def test_peft_bundle_matches_peft(method, family, tmp_path):
    base_dir, adapter_dir, reference = make_peft_bundle(method, tmp_path, family=family, seed=3)
    engine = Engine(load_backbone(base_dir, device="cpu", dtype="float32"))
    task = engine.load_task(adapter_dir, TaskKey("peft-task", "v1"))
    b = example_batch(family)
    tt = b.get("token_type_ids")
    if tt is None and engine.backbone.family.embeddings.token_type is not None:
        tt = torch.zeros_like(b["input_ids"])
    batch = Batch(b["input_ids"], b["attention_mask"], tt, [task], torch.zeros(len(b["input_ids"]), dtype=torch.long))
    ours = torch.stack(engine.logits(batch))
    ref = reference(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
    assert not torch.allclose(ref, reference.base_logits(b["input_ids"], b["attention_mask"], b.get("token_type_ids")), atol=1e-3)
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("options, named", [
    ({"modules_to_save": ["classifier", "pooler"]}, "cannot apply, so it would answer otherwise than the adapter: bert.pooler.dense.bias"),
    ({"target_modules": ["query", "word_embeddings"]}, "lora_embedding_A"),
    ({"lora_bias": True}, "lora_bias=True"),
], ids=["pooler in modules_to_save", "LoRA on the embeddings", "lora_bias"])
def test_peft_state_the_service_cannot_apply_is_refused_not_dropped(options, named, tmp_path):
    """Trained tensors the import has no place for would be dropped, and the task would answer
    otherwise than the adapter: refused, naming them."""
    from service.errors import BundleError

    base_dir, adapter_dir, _ = make_peft_bundle("lora", tmp_path, family="bert", seed=3, lora_options=options)
    engine = Engine(load_backbone(base_dir, device="cpu", dtype="float32"))
    with pytest.raises(BundleError, match=named):
        engine.load_task(adapter_dir, TaskKey("peft-task", "v1"))


def test_peft_lora_config_without_lora_alpha_scales_as_peft_does(tmp_path):
    """PEFT reads a missing lora_alpha as its default (8), not as r: served logits match PEFT's own
    reload of the same files."""
    import json

    from tests.peft_fixtures import load_peft_model

    base_dir, adapter_dir, _ = make_peft_bundle("lora", tmp_path, family="bert", seed=3, r=4, lora_alpha=2)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["lora_alpha"]
    cfg_path.write_text(json.dumps(cfg))
    engine = Engine(load_backbone(base_dir, device="cpu", dtype="float32"))
    task = engine.load_task(adapter_dir, TaskKey("peft-task", "v1"))
    b = example_batch("bert")
    batch = Batch(b["input_ids"], b["attention_mask"], b["token_type_ids"], [task], torch.zeros(2, dtype=torch.long))
    ref = load_peft_model(base_dir, adapter_dir)(**b).logits
    torch.testing.assert_close(torch.stack(engine.logits(batch)), ref.detach().float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("options, extra, named", [
    ({"init_lora_weights": "pissa"}, None, "init_lora_weights='pissa' rewrites the base model's weights"),
    ({"init_lora_weights": "olora"}, None, "init_lora_weights='olora' rewrites the base model's weights"),
    (None, {"alora_invocation_tokens": [7, 8]}, "activated LoRA"),
    (None, {"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
], ids=["pissa", "olora", "alora", "layer_replication"])
def test_peft_lora_whose_math_the_service_does_not_do_is_refused(options, extra, named, tmp_path):
    """LoRA variants whose tensors look plain but whose PEFT forward is not W + s*BA on this backbone
    (PiSSA/OLoRA rewrite the base weights, aLoRA gates by position, layer_replication changes depth)
    were served as plain LoRA: answers that differ from PEFT's."""
    from service.errors import BundleError

    base_dir, adapter_dir, _ = make_peft_bundle("lora", tmp_path, family="bert", seed=3, lora_options=options,
                                                extra_config=extra)
    engine = Engine(load_backbone(base_dir, device="cpu", dtype="float32"))
    with pytest.raises(BundleError, match=named):
        engine.load_task(adapter_dir, TaskKey("peft-task", "v1"))


@pytest.mark.parametrize("method, family, named", [
    ("lora", "roberta", "trained on another architecture: its modules are under \\['roberta'\\]"),
    ("lora", "electra", "trained on another architecture: its modules are under \\['electra'\\]"),
    ("prompt", "roberta", "'classifier.dense' \\+ 'classifier.out_proj', the head of another architecture"),
])
def test_peft_adapter_of_another_architecture_with_matching_shapes_is_refused(method, family, named, tmp_path):
    """A RoBERTa / ELECTRA adapter whose shapes happen to fit a BERT backbone was mapped onto it
    module by module and served (with a head BERT does not have): numbers of no model at all."""
    from service.errors import BundleError
    from tests.peft_fixtures import make_base_model

    _, adapter_dir, _ = make_peft_bundle(method, tmp_path / "foreign", family=family, seed=3)
    bert_dir, _ = make_base_model(tmp_path / "bert", "bert", seed=3)
    engine = Engine(load_backbone(bert_dir, device="cpu", dtype="float32"))
    with pytest.raises(BundleError, match=named):
        engine.load_task(adapter_dir, TaskKey("peft-task", "v1"))


def test_peft_lora_config_without_r_names_the_missing_key_and_the_tensors_rank(tmp_path):
    """No 'r' in the config: one problem saying so and which rank the tensors have, not one shape
    problem per LoRA tensor."""
    import json

    from service.errors import BundleError

    base_dir, adapter_dir, _ = make_peft_bundle("lora", tmp_path, family="bert", seed=3, r=4)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["r"]
    cfg_path.write_text(json.dumps(cfg))
    engine = Engine(load_backbone(base_dir, device="cpu", dtype="float32"))
    with pytest.raises(BundleError) as refused:
        engine.load_task(adapter_dir, TaskKey("peft-task", "v1"))
    assert refused.value.problems == [
        "task 'peft-task': PEFT LoRA config has no 'r', which PEFT reads as 8, but its lora_A tensors have rank 4: "
        "add the r it was trained with (\"r\": 4) to adapter_config.json"]
