"""PEFT prompt and prefix uploads whose num_virtual_tokens leave no positions for the text: one
problem naming the count, the limit and why, never a derived max_length below 2 beside it."""
from __future__ import annotations

import dataclasses
import json
import tempfile

import pytest
import torch
from safetensors.torch import save as st_save

from service.engine.backbone import load_backbone
from service.engine.bundle import content_version, parse
from service.engine.engine import Engine
from service.engine.peft_import import from_peft
from service.engine.types import TaskKey
from service.errors import BundleError, UploadRejected
from service.hotswap import load_upload
from service.settings import Settings
from service.upload import Part, UploadLimits, assemble
from tests.factories import save_tiny_backbone
from tests.hotswap.bundles import CONFIG, WEIGHTS

SERVER = "this server serves at most 256 virtual tokens"
POSITIONS = "backbone has 64 positions"  # the tiny backbone's tokenizer: model_max_length 64


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    backbone_dir = save_tiny_backbone("bert", tmp_path_factory.mktemp("peft") / "backbone")
    return Engine(load_backbone(backbone_dir, device="cpu", dtype="float32"))


def _peft(engine: Engine, peft_type: str, p: int, **config: object) -> tuple[dict, dict[str, torch.Tensor]]:
    info = engine.backbone.info
    h = info.hidden_size
    width = 2 * info.num_layers * h if peft_type == "PREFIX_TUNING" else h
    tensors = {"base_model.model.classifier.weight": torch.full((2, h), 0.1), "base_model.model.classifier.bias": torch.zeros(2)}
    if peft_type == "LORA":
        module = "base_model.model.bert.encoder.layer.0.attention.self.query"
        tensors |= {f"{module}.lora_A.weight": torch.full((2, h), 0.01), f"{module}.lora_B.weight": torch.full((h, 2), 0.01)}
        config = {"r": 2, "lora_alpha": 4, "target_modules": ["query"]} | config
    else:
        tensors["base_model.prompt_embeddings"] = torch.full((min(p, 1000), width), 0.01)  # refused before shapes count
    return {"peft_type": peft_type, "task_type": "SEQ_CLS", "num_virtual_tokens": p} | config, tensors


def _upload(engine: Engine, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    limits = UploadLimits.from_settings(Settings(store=tempfile.gettempdir()))
    files = assemble([Part(CONFIG, CONFIG, json.dumps(cfg).encode()), Part(WEIGHTS, WEIGHTS, st_save(tensors))], limits)
    load_upload(engine, TaskKey("t", content_version(files.config, files.weights)), files)


@pytest.mark.parametrize("peft_type, p, reasons", [
    ("PREFIX_TUNING", 600, [SERVER, POSITIONS]),
    ("PREFIX_TUNING", 100, [POSITIONS]),
    ("PREFIX_TUNING", 63, [POSITIONS]),
    ("PROMPT_TUNING", 600, [SERVER, POSITIONS]),
    ("PROMPT_TUNING", 70, [POSITIONS]),
    ("PROMPT_TUNING", 10**400, [SERVER, POSITIONS]),  # shown by its length, not echoed twice in full
])
def test_too_many_virtual_tokens_is_one_problem_with_the_limit(engine: Engine, peft_type: str, p: int, reasons: list[str]) -> None:
    with pytest.raises(UploadRejected) as refused:
        _upload(engine, *_peft(engine, peft_type, p))
    assert refused.value.status_code == 422
    [problem] = refused.value.problems
    shown = p if p < 10**12 else "a 401-digit number"
    assert f"'num_virtual_tokens' is {shown}, more than the 62 allowed here" in problem and len(problem) < 600, problem
    assert all(reason in problem for reason in reasons), problem
    assert "num_virtual_tokens <= 62" in problem and "max_length" not in problem, problem


@pytest.mark.parametrize("peft_type, p, config", [
    ("PREFIX_TUNING", 62, {}),  # leaves the least max_length, 2
    ("PROMPT_TUNING", 4, {}),
    ("LORA", 600, {}),  # PEFT's LoRA ignores num_virtual_tokens: it takes no positions
])
def test_virtual_tokens_that_fit_are_served(engine: Engine, peft_type: str, p: int, config: dict) -> None:
    _upload(engine, *_peft(engine, peft_type, p, **config))


def test_a_512_position_backbone_names_the_server_limit_alone(engine: Engine) -> None:
    # What QA saw on a 512-position backbone: 600 virtual tokens gave "'max_length' ... got -88".
    info = dataclasses.replace(engine.backbone.info, max_positions=512)
    cfg, tensors = _peft(engine, "PREFIX_TUNING", 600)
    with pytest.raises(BundleError) as refused:
        parse(*from_peft(cfg, tensors, info, "t"), info, "t")
    assert refused.value.problems == [
        "task 't': 'num_virtual_tokens' is 600, more than the 256 allowed here: this server serves at most 256 virtual "
        "tokens (longer prompts cost more than they have been shown to help); and this bert backbone has 512 "
        "positions, which the virtual tokens share with at least 2 text tokens; train the adapter with "
        "num_virtual_tokens <= 256"]


def test_a_peft_config_without_peft_type_is_named_as_such_not_as_a_missing_fingerprint(engine: Engine) -> None:
    """A PEFT adapter_config.json that lost its peft_type (hand edit, an old exporter) was refused as a
    native bundle without backbone.fingerprint: a message about a key PEFT never writes."""
    cfg, tensors = _peft(engine, "LORA", 0)
    del cfg["peft_type"]
    cfg["base_model_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
    limits = UploadLimits.from_settings(Settings(store=tempfile.gettempdir(), upload_require_fingerprint=True))
    with pytest.raises(UploadRejected) as refused:
        assemble([Part(CONFIG, CONFIG, json.dumps(cfg).encode()), Part(WEIGHTS, WEIGHTS, st_save(tensors))], limits)
    assert len(refused.value.problems) == 1, refused.value.problems
    assert "looks like a Hugging Face PEFT adapter config" in refused.value.problems[0]
    assert "has no 'peft_type'" in refused.value.problems[0] and "fingerprint" not in refused.value.problems[0]
