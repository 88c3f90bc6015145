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
# With the GGUF already at $STAGED (default ~/smollm2), everything in one call of ~8 minutes:
#
#   bash launch/smollm2_gpu.sh stage_release <release checkout>   # here: -> workdirs/refrel
#   bash launch/smollm2_gpu.sh all        # call, carry workdirs/refrel (and .whl): the sweep
#       (7 strategies x uniform/ar/ga_s2 at 25%, and taylor_calibrate with the output gate
#       joined by other phase-1 parts on uniform/ar) -> $OUT/zero_shot_smollm2_135m.*; then the
#       reference release's init on its keep sets (launch/reference_release.py run, rows
#       `reference_release` added to that file). The phase-1 ablation is `ablation`.
#   POLICIES=ar,ga_s2 bash launch/smollm2_gpu.sh release   # carry workdirs/refrel (and .whl):
#       only the release's rows for POLICIES, added to a copy of the committed
#       launch/results/zero_shot_smollm2_135m.json in $OUT (same text, seeds and keep sets);
#       on one H200 the join, the teacher's conversion and the ar row took under 300 s
#       (2026-12-05), so one policy per call of LIMIT=300 is safe
#   bash launch/smollm2_gpu.sh recovery   # after `stage`, carry workdirs/gguf_b (and .whl): the
#       recovery experiment (launch/recovery.py) for INITS (default copy,taylor_calibrate,
#       zero_gate) on DOCS documents (default 4000), LAYER_TOKENS of stage 1 and KL_TOKENS of
#       stage 2 (defaults 1M and 8M; STAGE1=false: stage 2 alone)
#       -> $OUT/recovery_${TAG:-smollm2_135m}.*; at these
#       budgets two inits fit one call on an H100 (recovery_smollm2_135m_h100_9m_all4), so the four go in two
#       back-to-back calls with their own INITS and TAG, joined afterwards (here) by
#       `python3 launch/recovery.py --merge=<a>.json,<b>.json --tag=...`; the text is read
#       from the machine's site-packages, so both calls must run on the same machine
#   bash launch/smollm2_gpu.sh stage2     # (.whl; no GGUF: random weights of the same shape
#       do the same work): the stage-2 throughput sweep of launch/bench_stage2.py, batch
#       BATCHES (default 8,32; 32 x 2048 fits an H200, not an H100: BATCHES=8,24 there) x the
#       GDN projections joined / separate, remat off, KL chunk 2048, cuDNN attention
#       -> $OUT/bench_stage2_${TAG:-projections}.*
#
# `stage_release` copies the release's checkout (the Taylor-Calibrate repository with our
# changes for a Llama teacher; its code stays out of this repository) into the ignored folder
# workdirs/refrel, with RELEASE_NOTES.json (its commit and changed files) and CHANGES.patch.
# On the device the release runs with torch, CUDA and triton there and flash-linear-attention
# from .whl/; the JAX processes that share the GPU with it take a fixed share of its memory.
#
# Wheels the device lacks (gguf, accelerate, ml-collections) go in .whl/ (ignored), e.g.
# `pip download --no-deps gguf==0.19.0 accelerate==1.16.0 ml-collections -d .whl`, and are
# installed by `launch/carried_wheels.sh` into /tmp/site, which is put on PYTHONPATH (so they
# stay out of the site-packages that the SmolLM2 configs read as text). Each run is bounded by
# `timeout` below the call limit; the sweep rewrites its result files after every strategy, so a
# run cut short still returns the rows it finished. Compiled programs are cached in
# $WORK/jax_cache, so the ablation call reuses the sweep call's compilations.
set -euo pipefail
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_MD5=a1231443440b107ff29f02bdb38c9d0a
STAGED=${STAGED:-$HOME/smollm2}
WORK=${WORK:-/tmp/smollm2}
OUT=${OUT:-launch/results}
LIMIT=${LIMIT:-570}
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache
CONFIG="configs/smollm2_135m.py:$STAGED/$GGUF_NAME"
COMMON=(--workdir="$WORK" --out="$OUT" --config.progress=False
  --config.calibration.gdn.impl="${GDN_IMPL:-chunked}")

# shellcheck source=launch/carried_wheels.sh
source launch/carried_wheels.sh
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

join_and_install() {
  if [ ! -f "$STAGED/$GGUF_NAME" ]; then
    cat "$STAGED/$GGUF_NAME.part_a" workdirs/gguf_b/"$GGUF_NAME".part_b >"$STAGED/$GGUF_NAME"
  fi
  echo "$GGUF_MD5  $STAGED/$GGUF_NAME" | md5sum -c -
  install_carried_wheels
}

ablation() {
  timeout "$1" python3 launch/sweep_zero_shot.py --config="$CONFIG" "${COMMON[@]}" \
    --teacher_name=smollm2_135m_phase1_ablation --strategies=align_only,taylor_calibrate \
    --policies=uniform --ablation_policies=uniform,ar --phase1_ablation
}

release_rows() {  # $1 seconds, $2 policies: the release's rows added to $OUT's sweep file
  timeout "$1" python3 launch/reference_release.py run --config="$CONFIG" \
    --workdir="$WORK" --release_code=workdirs/refrel --config.progress=False \
    --config.calibration.gdn.impl="${GDN_IMPL:-chunked}" --policies="$2" \
    --sweep_json="$OUT/zero_shot_smollm2_135m.json" || echo "release rows stopped: $?"
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
    ablation "$LIMIT"
    ;;
  stage_release)
    src=${2:?usage: bash launch/smollm2_gpu.sh stage_release <release checkout>}
    rm -rf workdirs/refrel && mkdir -p workdirs/refrel
    git -C "$src" ls-files -co --exclude-standard | grep -v '^results/' |
      (cd "$src" && xargs cp --parents -t "$OLDPWD/workdirs/refrel")
    git -C "$src" diff HEAD >workdirs/refrel/CHANGES.patch
    python3 - "$src" <<'PY'
import json, subprocess, sys
git = lambda *a: subprocess.run(["git", "-C", sys.argv[1], *a], capture_output=True, text=True, check=True).stdout
notes = {"repository": "github.com/FutureMLS-Lab/Taylor-Calibrate",
         "head": git("log", "-1", "--format=%H %s").strip(),
         "changed": git("status", "--short").splitlines(), "changes_patch": "CHANGES.patch"}
json.dump(notes, open("workdirs/refrel/RELEASE_NOTES.json", "w"), indent=1)
PY
    du -sh workdirs/refrel
    ;;
  all)
    join_and_install
    timeout "${SWEEP_LIMIT:-330}" python3 launch/sweep_zero_shot.py --config="$CONFIG" \
      "${COMMON[@]}" --teacher_name=smollm2_135m --ablation_policies=uniform,ar \
      --phase1_variants=write_gate+output_gate,decay+output_gate,decay+write_gate+output_gate \
      || echo "sweep stopped: $?"
    release_rows "$((LIMIT - SECONDS))" uniform,ar,ga_s2
    ls -l "$OUT"
    ;;
  stage2)
    install_carried_wheels
    timeout "$LIMIT" python3 launch/bench_stage2.py --tag="${TAG:-projections}" --random_smollm2 \
      --batch_sizes="${BATCHES:-8,32}" --remat=false --chunk_sizes=2048 --attention_impls=cudnn \
      --gdn_fused_projections=true,false --budget_s="$((LIMIT - 90))" --out="$OUT"
    ;;
  recovery)
    join_and_install
    timeout "$LIMIT" python3 launch/recovery.py --config="$CONFIG" --workdir="$WORK/recovery" \
      --tag="${TAG:-smollm2_135m}" --config.progress=False --out="$OUT" \
      --inits="${INITS:-copy,taylor_calibrate,zero_gate}" \
      --config.data.max_documents="${DOCS:-4000}" \
      --config.distill.layers.train_tokens="${LAYER_TOKENS:-1000000}" \
      --config.distill.kl.train_tokens="${KL_TOKENS:-8000000}" --stage1="${STAGE1:-true}" \
      || echo "recovery stopped: $?"
    ls -l "$OUT"
    ;;
  release)
    join_and_install
    cp launch/results/zero_shot_smollm2_135m.json "$OUT/"
    release_rows "$LIMIT" "${POLICIES:-ar,ga_s2}"
    ls -l "$OUT"
    ;;
  *)
    echo "usage: bash launch/smollm2_gpu.sh split|stage|sweep|ablation|stage_release|all|release|recovery|stage2" >&2
    exit 2
    ;;
esac
