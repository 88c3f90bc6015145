#!/usr/bin/env bash
# One device call for the GPU-side figures of issues 2 and 5 (run from the repo root):
#   1. pretrain the GPU teacher (configs/gpu_teacher.py) and evaluate it,
#   2. the zero-shot sweep on it (strategies x policies at 25% kept),
#   3. the Qwen2.5-1.5B-shaped full-initialisation timing,
#   4. statistics-collection peak memory vs context length.
# Each step has its own time limit so that a slow one cannot starve the rest; results and one
# combined log go to $OUT (device tool) or ./gpu_out.
#
#   bash launch/gpu_quality_run.sh            # full
#   SMOKE=1 bash launch/gpu_quality_run.sh    # seconds-long dry run of the same steps on a CPU
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
WORK=${WORK:-/tmp/taylorcal_gpu}
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  CFG=configs/gpu_teacher.py:smoke; SWEEP_ARGS="--policies=uniform"; INIT_ARGS="--small"
  MEM_ARGS="--small --noexecute --lengths=64,128"; WORK=$WORK-smoke
else
  CFG=configs/gpu_teacher.py; SWEEP_ARGS="--config.calibration.gdn.impl=${SWEEP_IMPL:-chunked}"
  INIT_ARGS="--repeats=1 --gdn_impl=${INIT_IMPL:-chunked}"
  MEM_ARGS="--layers=4 --dense_max_t=4096 --lengths=1024,4096,16384"
fi
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${secs}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$secs" "$@" >>"$LOG" 2>&1
  echo "=== $name exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}
step teacher "${T_TEACHER:-230}" python3 -m taylorcal_jax.main --config=$CFG --workdir="$WORK"
cp "$WORK/teacher/pretrain_info.json" "$OUT/gpu_teacher_info.json" 2>/dev/null
cp "$WORK/metrics.jsonl" "$OUT/gpu_teacher_metrics.jsonl" 2>/dev/null
[ "${SKIP_SWEEP:-0}" = 1 ] && exit 0
step sweep "${T_SWEEP:-230}" python3 launch/sweep_zero_shot.py --config=$CFG --workdir="$WORK" \
  --teacher_name=gpu_teacher --out="$OUT" $SWEEP_ARGS
step init_time "${T_INIT:-80}" python3 launch/bench_init_time.py --out="$OUT" $INIT_ARGS
[ "${SKIP_MEM:-0}" = 1 ] || step stats_memory "${T_MEM:-50}" python3 launch/bench_stats_memory.py --out="$OUT" $MEM_ARGS
tail -n 5 "$LOG"
