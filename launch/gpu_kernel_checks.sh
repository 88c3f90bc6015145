#!/usr/bin/env bash
# The kernels that have run only on the CPU (interpret mode) so far, on one GPU, in one device
# call of under 10 minutes (run from the repo root; carry .whl/ for ml-collections):
#
#   1. their gpu-marked tests: cuDNN's fused attention against the blocked path
#      (tests/test_fused_attention.py) and the GDN decoding step's Pallas kernel against XLA's
#      form (tests/test_gdn_decode_pallas.py)                                  -> $OUT/gpu/
#   2. launch/probe_decode.py with its default variants: the GDN step alone (XLA and six launch
#      configurations), then the Qwen2.5-1.5B-shaped decode steps with XLA's or the Pallas GDN
#      step, each with XLA's or cuBLAS's weight products            -> $OUT/probe_decode_h200.json
#   3. launch/profile_steps.py: the student's decode steps at 16k, batch 1 and 16, with the
#      Pallas GDN step, every top kernel named by the model operations it computes
#                                                     -> $OUT/profile_steps_h200_gdn_step.{json,md}
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

timeout 120 python3 launch/run_gpu_tests.py --select "cudnn or gdn_decode" --jobs 4 \
  --timeout 110 --out-dir "$OUT/gpu" || echo "gpu tests stopped: $?"
timeout 290 python3 launch/probe_decode.py --tag=h200 --budget_s=270 --out="$OUT" ||
  echo "probe_decode stopped: $?"
timeout 140 python3 launch/profile_steps.py --tag=h200_gdn_step --targets=decode_student \
  --context=16384 --batch=1,16 --decode_attention=pallas --gdn_decode=pallas --budget_s=110 \
  --out="$OUT" || echo "profile_steps stopped: $?"
ls -l "$OUT" "$OUT/gpu"
