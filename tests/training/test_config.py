"""TrainConfig's per-method defaults: a method's own epochs and rate unless the run names them."""
from __future__ import annotations

import pytest

from training.config import DEFAULT_EPOCHS, DEFAULT_LR, METHODS, ConfigError, LoraConfig, TrainConfig
from training.cli import build_train_parser, config_from_args


@pytest.mark.parametrize("method", METHODS)
def test_unset_epochs_and_lr_take_the_methods_defaults(method):
    cfg = TrainConfig(method=method).check()
    assert (cfg.num_epochs, cfg.learning_rate) == (DEFAULT_EPOCHS[method], DEFAULT_LR[method])
    assert cfg.hyperparameters()["epochs"] == DEFAULT_EPOCHS[method]


def test_explicit_epochs_win_and_are_checked():
    assert TrainConfig(method="lora", epochs=2).num_epochs == 2
    with pytest.raises(ConfigError, match="--epochs must be an integer >= 1"):
        TrainConfig(method="lora", epochs=0).check()


def test_cli_without_epochs_uses_the_methods_default(tmp_path):
    args = build_train_parser().parse_args(
        ["--task", "t", "--method", "full", "--data", "x.csv", "--dev", "d.csv", "--store", str(tmp_path)])
    assert config_from_args(args).num_epochs == DEFAULT_EPOCHS["full"]


@pytest.mark.parametrize("field,value", [
    ("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("nan")), ("warmup_ratio", float("-inf")),
    ("max_grad_norm", float("inf")), ("dropout", float("nan")), ("ema", float("nan")), ("exit_max_drop", float("inf")),
    ("exit_confidence", float("nan")),
])
def test_non_finite_numbers_are_refused(field, value):
    """inf passes "> 0" (and trains NaN weights); every float option must be a finite number."""
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} must be a finite number, got {value!r}"):
        TrainConfig(method="lora", **{field: value}).check()


def test_lora_on_the_ffn_gate_is_a_target_where_the_backbone_has_one():
    # qa-llm: decoder.py serves LoRA on all seven linears of a gated FFN block, but the trainer
    # refused ffn_gate (its list was the encoders' six).
    config = TrainConfig(method="lora", lora=LoraConfig(targets=("query", "ffn_gate"))).check()
    config.check_backbone(512, False, "decoder", 32, ("query", "key", "value", "attn_out", "ffn_in", "ffn_out", "ffn_gate"))
    with pytest.raises(ConfigError, match="--lora-targets ffn_gate: this backbone has no such linear"):
        config.check_backbone(512, False, "encoder", 32, ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"))
    with pytest.raises(ConfigError, match="--lora-targets must name sites among query,.*,ffn_gate"):
        TrainConfig(method="lora", lora=LoraConfig(targets=("gate",))).check()


def test_a_prefix_is_refused_on_a_causal_lm():
    config = TrainConfig(method="prefix").check()
    config.check_backbone(512, False, "encoder")
    with pytest.raises(ConfigError, match="prefix tuning is not supported on causal-LM backbones"):
        config.check_backbone(512, False, "decoder")
    TrainConfig(method="lora").check().check_backbone(512, False, "decoder")


@pytest.mark.parametrize("device", ["banana", "cpu:x", "", "cuda:-1"])
def test_an_unknown_device_is_a_value_error(device):
    from service.engine.backbone import resolve_device

    with pytest.raises(ValueError, match=f"unknown device {device!r}: use auto, cpu, cuda or cuda:N"):
        resolve_device(device)
