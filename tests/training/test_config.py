"""TrainConfig's per-method defaults: a method's own epochs and rate unless the run names them."""
from __future__ import annotations

import pytest

from training.config import DEFAULT_EPOCHS, DEFAULT_LR, METHODS, ConfigError, TrainConfig
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
