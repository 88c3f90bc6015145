#!/usr/bin/env bash
# SmolLM2-135M zero-shot sweep and phase-1 ablation on one GPU, in device calls of at most
# 10 minutes whose carried files are at most 64 MiB each (run from the repo root).
#
# The 98 MB GGUF travels in two halves, in two ignored folders, then is joined and checked:
#
#   bash launch/smollm2_gpu.sh split      # here: workdirs/gguf_a/, workdirs/gguf_b/ (~50 MB each)
#   bash launch/smollm2_gpu.sh stage      # call 1, carry workdirs/gguf_a: first half to ~/gguf
#   bash launch/smollm2_gpu.sh sweep      # call 2, carry workdirs/gguf_b (and .whl): join, md5,
#                                         # 6 strategies x uniform/ar/ga_s2 at 25% -> $OUT
#   bash launch/smollm2_gpu.sh ablation   # call 3 (same machine): phase-1 ablation -> $OUT
#
# Wheels the device lacks (gguf, accelerate, ml-collections) go in .whl/ (ignored), e.g.
# `pip download --no-deps gguf==0.19.0 accelerate==1.16.0 ml-collections -d .whl`, and are
# installed with --no-deps by `sweep` and `ablation`. Each run is bounded by `timeout` below
# the call limit; the sweep rewrites its result files after every strategy, so a run cut short
# still returns the rows it finished. Compiled programs are cached in $WORK/jax_cache, so the
# ablation call reuses the sweep call's compilations.
set -euo pipefail
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_MD5=a1231443440b107ff29f02bdb38c9d0a
STAGED=${STAGED:-$HOME/gguf}
WORK=${WORK:-/tmp/smollm2}
OUT=${OUT:-launch/results}
LIMIT=${LIMIT:-570}
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache
CONFIG="configs/smollm2_135m.py:$STAGED/$GGUF_NAME"
COMMON=(--workdir="$WORK" --out="$OUT" --config.progress=False
  --config.calibration.gdn.impl="${GDN_IMPL:-chunked}")

join_and_install() {
  if [ ! -f "$STAGED/$GGUF_NAME" ]; then
    cat "$STAGED/$GGUF_NAME.part_a" workdirs/gguf_b/"$GGUF_NAME".part_b >"$STAGED/$GGUF_NAME"
  fi
  echo "$GGUF_MD5  $STAGED/$GGUF_NAME" | md5sum -c -
  if compgen -G ".whl/*.whl" >/dev/null; then python3 -m pip install -q --no-deps .whl/*.whl; fi
}

case "${1:-}" in
  split)
    src=$(python3 -c "import sys; sys.path.insert(0, 'configs'); import smollm2_135m as s; print(s.installed_gguf())")
    mkdir -p workdirs/gguf_a workdirs/gguf_b
    head -c 50000000 "$src" >workdirs/gguf_a/"$GGUF_NAME".part_a
    tail -c +50000001 "$src" >workdirs/gguf_b/"$GGUF_NAME".part_b
    cat workdirs/gguf_a/* workdirs/gguf_b/* | md5sum | grep -q "$GGUF_MD5" && ls -l workdirs/gguf_?/
    ;;
  stage)
    mkdir -p "$STAGED"
    cp workdirs/gguf_a/"$GGUF_NAME".part_a "$STAGED/"
    ls -l "$STAGED"
    ;;
  sweep)
    join_and_install
    timeout "$LIMIT" python3 launch/sweep_zero_shot.py --config="$CONFIG" "${COMMON[@]}" \
      --teacher_name=smollm2_135m
    ;;
  ablation)
    join_and_install
    timeout "$LIMIT" python3 launch/sweep_zero_shot.py --config="$CONFIG" "${COMMON[@]}" \
      --teacher_name=smollm2_135m_phase1_ablation --strategies=align_only,taylor_calibrate \
      --policies=uniform --phase1_ablation
    ;;
  *)
    echo "usage: bash launch/smollm2_gpu.sh split|stage|sweep|ablation" >&2
    exit 2
    ;;
esac
