#!/usr/bin/env bash
# The GPU kernels' checks and the decode measurements still open, on one GPU, in one device
# call of under 10 minutes (run from the repo root; carry .whl/ for ml-collections):
#
#   1. the gpu-marked tests of the cuDNN fused attention (tests/test_fused_attention.py), of
#      the GDN decoding step's Pallas kernels, the step from the layer's joined projections
#      included (tests/test_gdn_decode_pallas.py), of the few-row dense product's kernel
#      (tests/test_gemv.py), of the decoding attention's kernels (tests/test_decode_attention.py),
#      of the KL-from-logits kernel (tests/test_kl_logits.py) and the compiled bf16 student's
#      decoding with params joined for decoding (tests/test_joined.py)
#                                                                             -> $OUT/gpu/
#   2. launch/bench_inference.py with the models' defaults: on an H200 the headline file,
#      4k-64k at batch 1 and 16 (289 s at git 743137d); on an H100, whose 80 GB do not pass its
#      memory check at 64k x 16, 16k and 32k                 -> $OUT/bench_inference_<gpu>.*
#   3. with VARIANTS set, launch/probe_decode.py over those variants at ROWS (default 32k
#      batch 1 and 16), e.g. TESTS=0 VARIANTS=defaults_joined,defaults_joined_pdl (Hopper's
#      programmatic dependent launch changed nothing on one H200: probe_decode_h200_pdl.json;
#      nor XLA's exhaustive GEMM tiling, on one H100: probe_decode_h100.json)
#                                                               -> $OUT/probe_decode_<gpu>.json
#
# Each part is bounded by `timeout` and writes its files as it goes, so a part cut short keeps
# what it measured and the next one still runs. The stage-2 step's speed is
# `bash launch/smollm2_gpu.sh stage2` (another call).
set -uo pipefail
OUT=${OUT:-launch/results}
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/carried_wheels.sh" && install_carried_wheels
export PYTHONPATH=$PWD:/tmp/site
# the result files' tag names the GPU that ran them (h100, h200, ...)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9][0-9]*' | head -1 | tr H h)
GPU=${GPU:-gpu}
CONTEXTS=4096,16384,32768,65536
[ "$GPU" = h100 ] && CONTEXTS=16384,32768

# TESTS=0 skips part 1, BENCH=0 part 2; VARIANTS (empty: part 3 skipped) and ROWS pick the
# probe's variants, VARIANT_S bounds each (the exhaustive tiling variant needs about 160 s at
# the default ROWS on one H100; with BENCH=0 part 3 may take up to 540 s)
ROWS=${ROWS:-32768x1,32768x16}
VARIANTS=${VARIANTS:-}
PROBE_S=260
[ "${BENCH:-1}" = 1 ] || PROBE_S=540
VARIANT_S=${VARIANT_S:-70}

if [ "${TESTS:-1}" = 1 ]; then
  timeout 150 python3 launch/run_gpu_tests.py --jobs 12 \
    --select "cudnn or gdn_decode or decode_attention or gemv or kl_logits or joined" \
    --timeout 120 --out-dir "$OUT/gpu" || echo "gpu tests stopped: $?"
fi
if [ "${BENCH:-1}" = 1 ]; then
  timeout 400 python3 launch/bench_inference.py --tag="$GPU" --contexts="$CONTEXTS" \
    --out="$OUT" || echo "bench_inference stopped: $?"
fi
if [ -n "$VARIANTS" ]; then
  timeout "$PROBE_S" python3 launch/probe_decode.py --tag="$GPU" --rows="$ROWS" \
    --variants="$VARIANTS" --budget_s=$((PROBE_S - 30)) --min_variant_s=30 \
    --variant_timeout_s="$VARIANT_S" --out="$OUT" ||
    echo "probe_decode stopped: $?"
fi
ls -lR "$OUT"
