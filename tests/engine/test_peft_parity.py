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
