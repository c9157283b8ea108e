#!/usr/bin/env bash
# Rebuild the demo task shipped in adapters_store/: SST-2 sentiment, LoRA (r=8 on query,value) +
# a mean-pooled head on the bundled all-MiniLM-L6-v2, trained on ../shared/data/sst2.
# One epoch: on a 2-core CPU it takes ~15 min and reaches ~0.83 dev accuracy; more epochs help little.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/sst2}
exec "${ADAPTSERVE:-.venv/bin/adaptserve}" train --task sst2-sentiment \
  --data "$DATA/train.csv" --dev "$DATA/dev.csv" --test "$DATA/test.csv" \
  --method lora --lora-r 8 --lora-targets query,value --pooling mean \
  --epochs 1 --lr 5e-4 --seed 13 --max-length 128 \
  --store "${STORE:-adapters_store}" --no-progress "$@"
