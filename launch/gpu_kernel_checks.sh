#!/usr/bin/env bash
# The GPU kernels' checks and the decode measurements still open, on one GPU, in one device
# call of under 10 minutes (run from the repo root; carry .whl/ for ml-collections):
#
#   1. the gpu-marked tests of the cuDNN fused attention (tests/test_fused_attention.py), of
#      the GDN decoding step's Pallas kernel (tests/test_gdn_decode_pallas.py; both passed on
#      one H100, launch/results/gpu_tests_h100_cudnn_gdn_step.json) and of the few-row dense
#      product's kernel (tests/test_gemv.py)                                  -> $OUT/gpu/
#   2. launch/probe_decode.py: the Qwen2.5-1.5B-shaped decode steps under the models' defaults
#      with the params as stored and joined for decoding (models/joined.py), at 32k batch 1
#      and 16 (measured on one H100: launch/results/probe_decode_h100_joined.json)
#                                                               -> $OUT/probe_decode_<gpu>.json
#   3. launch/bench_inference.py at the contexts of the decode-ratio targets, 32k and 64k
#      (batch 1 and 16), with the models' defaults       -> $OUT/bench_inference_<gpu>_32k_64k.*
#
# Each part is bounded by `timeout` and writes its files as it goes, so a part cut short keeps
# what it measured and the next one still runs. The stage-2 speed of the cuDNN attention is
# `bash launch/smollm2_gpu.sh stage2` (another call).
set -uo pipefail
OUT=${OUT:-launch/results}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site
# the result files' tag names the GPU that ran them (h100, h200, ...)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9][0-9]*' | head -1 | tr H h)
GPU=${GPU:-gpu}
CONTEXTS=32768,65536  # an H100's 80 GB do not pass bench_inference's memory check at 64k x 16
[ "$GPU" = h100 ] && CONTEXTS=32768

# TESTS=0 skips part 1; VARIANTS and ROWS pick the probe's variants and rows
ROWS=${ROWS:-32768x1,32768x16}
VARIANTS=${VARIANTS:-defaults_stored,defaults_joined}

if [ "${TESTS:-1}" = 1 ]; then
  timeout 120 python3 launch/run_gpu_tests.py --select "cudnn or gdn_decode or gemv" --jobs 4 \
    --timeout 100 --out-dir "$OUT/gpu" || echo "gpu tests stopped: $?"
fi
timeout 260 python3 launch/probe_decode.py --tag="$GPU" --rows="$ROWS" \
  --variants="$VARIANTS" \
  --budget_s=230 --min_variant_s=30 --variant_timeout_s=70 --out="$OUT" ||
  echo "probe_decode stopped: $?"
timeout 200 python3 launch/bench_inference.py --tag="${GPU}_32k_64k" --contexts="$CONTEXTS" \
  --out="$OUT" || echo "bench_inference stopped: $?"
ls -lR "$OUT"
