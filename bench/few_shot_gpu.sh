#!/usr/bin/env bash
# The few-shot grid (issue 7's benchmark: five tasks x five seeds, every method, all of each
# test.csv, all of each train.csv as PET's unlabelled set) on one GPU machine.
#
#   bash bench/few_shot_gpu.sh                                   # after bench/gpu_carry.py assemble
#   DONE=bench/results/few_shot_gpu bash bench/few_shot_gpu.sh   # only what the earlier runs lack
#
# The grid is cut into independent jobs, one per (task, seed) and method family (the MiniLM + LM
# methods, SetFit, zero-shot), run $JOBS at a time on the one GPU, seed by seed; each job writes its
# rows as it goes, so a job stopped at the deadline keeps what it finished, and every 20 s the rows
# and logs so far are copied to $OUT/jobs.tar.gz. Then `bench/few_shot.py --summarize` merges every
# job's rows into one table with the targets ($OUT/few_shot_gpu.json, $OUT/summary.txt).
#
# Env: OUT (default bench/results/few_shot_gpu), DEADLINE_S (seconds from the start after which no
# job runs on; default 420), JOBS (default 8), DEVICE (default cuda), TASKS, SEEDS, DONE (a folder
# of earlier job JSONs: a job runs only the methods whose rows are not there), ADAPTSERVE_CARRY_STAGE,
# STUDENT_MAX_STEPS (a cap on PET's student steps; default none: 3 epochs of train.csv at batch 32
# are 150-840 steps), and for smoke runs only MAX_TEST / UNLABELLED / LM_STEPS (default: all rows,
# 8 steps).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-bench/results/few_shot_gpu}
DEADLINE_S=${DEADLINE_S:-420}
JOBS=${JOBS:-8}
DEVICE=${DEVICE:-cuda}
TASKS=${TASKS:-agnews,subj,mr,sst2,cr}  # the largest first: the pool packs better
SEEDS=${SEEDS:-13,21,42,87,100}
STAGE=${ADAPTSERVE_CARRY_STAGE:-/tmp/adaptserve-carry}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/few_shot_gpu.XXXX)
mkdir -p "$OUT"
if [ -d "$STAGE/wheels" ]; then  # gguf, setfit, datasets, ...: the GPU machine reaches no package index
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/wheels/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
if [ -d "$STAGE/pylib" ]; then export PYTHONPATH="$STAGE/pylib:${PYTHONPATH:-}"; fi
export PYTHONPATH=".:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export ADAPTSERVE_CACHE_DIR=${ADAPTSERVE_CACHE_DIR:-/tmp/adaptserve-cache}
LM=${LM_PATH:-$STAGE/lm/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA_ROOT:-$STAGE/data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
# Convert the GGUF once, before the jobs that share the cache start.
$PY -c "from pathlib import Path; from service.engine.gguf import convert_gguf; print('lm cache', convert_gguf(Path('$LM')))" \
  || { echo "GGUF conversion failed"; exit 1; }

COMMON=(--device "$DEVICE" --no-progress --threads 2 --eval-batch 128 --unlabelled "${UNLABELLED:-0}"
        --student-batch 32 --student-epochs 3 --lm-steps "${LM_STEPS:-8}" --lm-path "$LM" --data-root "$DATA")
[ -n "${MAX_TEST:-}" ] && COMMON+=(--max-test "$MAX_TEST")
[ -n "${STUDENT_MAX_STEPS:-}" ] && COMMON+=(--student-max-steps "$STUDENT_MAX_STEPS")
[ "${DEVICE%%:*}" = cuda ] && COMMON+=(--tf32)  # fp32 weights and sums; TF32 tensor-core products
jobs_file="$WORK/jobs"
: > "$jobs_file"
IFS=, read -ra tasks <<< "$TASKS"
IFS=, read -ra seeds <<< "$SEEDS"
# Seed by seed, every method of a seed together: a deadline cuts whole seeds, never one method.
for s in "${seeds[@]}"; do
  for t in "${tasks[@]}"; do echo "lm $t $s head,lora,prompt,prompt-demos,pet" >> "$jobs_file"; done
  for t in "${tasks[@]}"; do echo "setfit $t $s setfit" >> "$jobs_file"; done
  if [ "$s" = "${seeds[0]}" ]; then
    for t in "${tasks[@]}"; do echo "zs $t $s zs-prompt,zs-desc" >> "$jobs_file"; done
  fi
done
if [ -n "${DONE:-}" ]; then  # resume: drop the jobs whose every method already has its row in a JSON under $DONE
  $PY - "$jobs_file" "$DONE" <<'PY' || exit 1
import json, pathlib, sys
jobs, done = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
have = {(r["task"], r["seed"], r["method"]) for f in done.rglob("*.json") for r in json.loads(f.read_text()).get("rows", [])}
keep = []
for line in jobs.read_text().splitlines():
    kind, task, seed, methods = line.split()
    key_seed = None if kind == "zs" else int(seed)  # zero-shot rows carry no seed
    missing = [m for m in methods.split(",") if (task, key_seed, m) not in have]
    if missing:  # only what is missing (pet trains its pattern-1 teacher, the `prompt` row, itself)
        keep.append(f"{kind} {task} {seed} {','.join(missing)}")
print(f"resume: {len(keep)} of {len(jobs.read_text().splitlines())} jobs left after {done}")
jobs.write_text("".join(k + "\n" for k in keep))
PY
fi
# agnews' LM jobs first, whatever their seed: they are the longest (the longest texts, four labels
# and so four demonstrations per prompt, the most unlabelled rows), and started last they would be
# the ones the deadline cuts.
{ grep "^lm agnews " "$jobs_file"; grep -v "^lm agnews " "$jobs_file"; } > "$jobs_file.ordered"
mv "$jobs_file.ordered" "$jobs_file"
echo "$(wc -l < "$jobs_file") jobs, $JOBS at a time, deadline ${DEADLINE_S}s"

run_job() {  # kind task seed methods
  local left=$(( T0 + DEADLINE_S - $(date +%s) ))
  if [ "$left" -lt 15 ]; then echo "skipped (deadline): $*"; return 0; fi
  local name="$1_$2_$3"
  timeout -s INT "$left" $PY bench/few_shot.py "${COMMON[@]}" --tasks "$2" --seeds "$3" --methods "$4" \
    --out "$WORK/$name.json" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$(date +%H:%M:%S) rc $rc $name ($(( $(date +%s) - T0 ))s)"
}
export -f run_job
export T0 DEADLINE_S PY WORK
export COMMON_STR="${COMMON[*]}"
# bash cannot export arrays: rebuild COMMON inside each job from the string (no spaces in its values)
snapshot() {  # every job's rows and log so far, into $OUT (what comes back if the call is cut short)
  tar -czf "$WORK.tar.gz" -C "$WORK" . 2>/dev/null && mv -f "$WORK.tar.gz" "$OUT/jobs.tar.gz"
}
( while sleep 20; do snapshot; done ) &
SNAP=$!
xargs -P "$JOBS" -L 1 bash -c 'COMMON=($COMMON_STR); run_job "$@"' _ < "$jobs_file"
kill $SNAP 2>/dev/null

shopt -s nullglob
results=("$WORK"/*.json)
rc=0
if [ ${#results[@]} -gt 0 ]; then
  $PY bench/few_shot.py --summarize "${results[@]}" --out "$OUT/few_shot_gpu.json" > "$OUT/summary.txt" 2>&1 || rc=1
  cat "$OUT/summary.txt"
else
  echo "no job wrote results"; rc=1
fi
grep -l "Traceback" "$WORK"/*.log 2>/dev/null | while read -r f; do echo "== $f"; tail -5 "$f"; done
snapshot
echo "total $(( $(date +%s) - T0 ))s"
exit $rc
