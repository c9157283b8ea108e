"""Training task weights for adaptserve from labelled files.

    from training import TrainConfig, LoraConfig, load_splits, train, save_to_store
    splits = load_splits("train.csv", "dev.csv", "test.csv")
    result = train(splits, TrainConfig(method="lora", lora=LoraConfig(r=8)), name="sst2")
    version = save_to_store(result, "adapters_store")

Modules: data.py (reading files), metrics.py, report.py (tables), config.py (`TrainConfig`),
weights.py (fresh weights via each method's `init`), trainer.py (the loop), exits.py (early-exit
classifiers, confidence predictors, calibration), full.py (the full
fine-tuning baseline), publish.py (local store / HTTP), evaluate.py (scoring through the serving
path), cli.py (`adaptserve train` / `adaptserve evaluate`); prompting.py (template + verbalizer
tasks), demos.py (the demonstration pool), pet.py (PET), zeroshot.py (zero-shot tasks),
fewshot_cli.py (`adaptserve pet` / `adaptserve zeroshot`); docs/few_shot.md.

Names are imported lazily so that `import training.data` stays free of torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "training.data",
    "LabelledData": "training.data",
    "Splits": "training.data",
    "load_splits": "training.data",
    "read_train": "training.data",
    "read_eval": "training.data",
    "data_hash": "training.data",
    "Metrics": "training.metrics",
    "compute_metrics": "training.metrics",
    "TrainConfig": "training.config",
    "LoraConfig": "training.config",
    "AdapterConfig": "training.config",
    "PrefixConfig": "training.config",
    "PromptConfig": "training.config",
    "ConfigError": "training.config",
    "DEFAULT_LR": "training.config",
    "METHODS": "training.config",
    "train": "training.trainer",
    "TrainResult": "training.trainer",
    "EpochRecord": "training.trainer",
    "save_to_store": "training.publish",
    "save_full_result": "training.publish",
    "publish_http": "training.publish",
    "PublishError": "training.publish",
    "evaluate_served": "training.evaluate",
    "evaluate_task": "training.evaluate",
    "load_published": "training.evaluate",
    "PromptSpec": "training.prompting",
    "VerbalizerError": "training.prompting",
    "parse_verbalizer": "training.prompting",
    "Pattern": "training.pet",
    "PetConfig": "training.pet",
    "load_patterns": "training.pet",
    "run_pet": "training.pet",
    "save_pet": "training.pet",
    "prompt_task": "training.zeroshot",
    "description_task": "training.zeroshot",
    "save_zeroshot": "training.zeroshot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
