#!/usr/bin/env bash
# An alternating A/B of the models' decoding steps over versions of the code, on one GPU in one
# device call: launch/probe_decode.py with the models' defaults (variant defaults_joined) at
# ROWS, once per version per round, in the order given, for ROUNDS rounds. Alternating spreads
# a machine's drift (clocks, temperature) over every version, where runs one after the other
# would charge it to the last; the tables of docs/benchmarks.md §4 compare the means.
#
# Two steps:
#   here, from the repo root: bash launch/ab_decode.sh trees REV...
#       writes one source tree per git revision to workdirs/ab/<rev> (git archive of the
#       package, launch/*.py, configs, setup.cfg and tests), and prints the device command;
#   on the device machine, from the repo root (carry workdirs/ab and .whl):
#       ROUNDS=2 bash launch/ab_decode.sh run TAG REV...
#       -> $OUT/probe_decode_<gpu>_<TAG>_<rev>[_again|_round<n>].json, one per run
#
# GPU_TESTS (a pytest -k expression) first runs those gpu-marked tests in the last revision's tree
# (launch/run_gpu_tests.py -> $OUT/gpu/, at most GPU_TESTS_S seconds, counted in the budget), so
# that one call both checks a new kernel compiled and times it against the others.
# A run that would start past BUDGET_S seconds into the call is skipped and said so, so that the
# call ends inside its 10 minutes with every file written so far; each run is bounded by
# `timeout` (RUN_S). PROBE_ARGS adds flags to every probe (PROBE_ARGS=--preset=small: a CPU dry
# run). The probe files record the source digest of their tree
# (launch/results_io.commits_with_digest names its commit).
set -uo pipefail
MODE=${1:?usage: bash launch/ab_decode.sh trees REV... | run TAG REV...}
shift
AB=${AB_DIR:-workdirs/ab}  # where the trees go (AB_DIR: elsewhere)

case "$MODE" in
  trees)
    [ $# -ge 1 ] || { echo "give at least one git revision" >&2; exit 2; }
    shas=()
    for rev in "$@"; do
      sha=$(git rev-parse --short "$rev^{commit}") || exit 2
      rm -rf "${AB:?}/$sha" && mkdir -p "$AB/$sha"
      git archive "$sha" taylorcal_jax 'launch/*.py' configs setup.cfg tests | tar -x -C "$AB/$sha"
      echo "$AB/$sha <- $rev"
      shas+=("$sha")
    done
    echo "device command (carry $AB and .whl): ROUNDS=2 bash launch/ab_decode.sh run TAG ${shas[*]}"
    ;;
  run)
    TAG=${1:?give a tag}
    shift
    [ $# -ge 2 ] || { echo "give at least two revisions (trees in $AB)" >&2; exit 2; }
    for rev in "$@"; do
      [ -d "$AB/$rev" ] || { echo "no tree $AB/$rev: run the trees step here first" >&2; exit 2; }
    done
    OUT=$(realpath -m "${OUT:-launch/results}")  # the probes run inside the trees
    mkdir -p "$OUT"
    ROWS=${ROWS:-32768x1,32768x16}
    ROUNDS=${ROUNDS:-2}
    BUDGET_S=${BUDGET_S:-480}
    RUN_S=${RUN_S:-100}
    GPU_TESTS_S=${GPU_TESTS_S:-150}
    export PYTHONUNBUFFERED=1
    source "$(dirname "$0")/carried_wheels.sh" && install_carried_wheels
    GPU=cpu
    if command -v nvidia-smi >/dev/null; then
      GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9]*' | head -1 | tr H h)
      GPU=${GPU:-gpu}
    fi
    if [ -n "${GPU_TESTS:-}" ]; then
      last=${*: -1}
      (cd "$AB/$last" && PYTHONPATH="$PWD:/tmp/site" timeout "$GPU_TESTS_S" \
        python3 launch/run_gpu_tests.py --jobs 12 --select "$GPU_TESTS" \
        --timeout $((GPU_TESTS_S - 15)) --out-dir "$OUT/gpu") | tail -3 ||
        echo "gpu tests in $last stopped: $?"
      echo "gpu tests of $last done at ${SECONDS} s"
    fi
    for round in $(seq 1 "$ROUNDS"); do
      suffix=""
      [ "$round" = 2 ] && suffix=_again
      [ "$round" -gt 2 ] && suffix=_round$round
      for rev in "$@"; do
        name="${GPU}_${TAG}_${rev}${suffix}"
        if [ "$SECONDS" -gt "$BUDGET_S" ]; then
          echo "skipped $name at ${SECONDS} s (BUDGET_S=$BUDGET_S)"
          continue
        fi
        (cd "$AB/$rev" && PYTHONPATH="$PWD:/tmp/site" timeout "$RUN_S" python3 launch/probe_decode.py \
          --tag="$name" --rows="$ROWS" --variants=defaults_joined --budget_s=$((RUN_S - 30)) \
          --min_variant_s=25 --variant_timeout_s=$((RUN_S - 10)) --out="$OUT" ${PROBE_ARGS:-}) |
          tail -2 ||
          echo "probe $name stopped: $?"
        echo "$name done at ${SECONDS} s"
      done
    done
    ls -l "$OUT"
    ;;
  *)
    echo "usage: bash launch/ab_decode.sh trees REV... | run TAG REV..." >&2
    exit 2
    ;;
esac
