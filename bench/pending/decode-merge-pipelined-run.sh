#!/usr/bin/env bash
# One device call for bench/pending/decode-merge-pipelined.patch: the B1 decode kernel in CUDA graphs
# (tools/probe_decode.py, the model shapes at ctx 4k / 32k) on main, then patched, then the GPU tests of the decode
# and the transformers integration with the patch. About 4 minutes on an H100. Logs and JSON under $OUT.
#   device run: bash bench/pending/decode-merge-pipelined-run.sh
set -uo pipefail
REPO=$PWD
export OUT="${OUT:-$PWD/gpu-out}" SCALED_ROPE_AUTOTUNE=0
probe() {  # $1: label, then probe_decode arguments
  local label=$1; shift
  ( cd /tmp && timeout 200 python3 "$REPO/tools/probe_decode.py" --shapes 0,1,2,3,6,7 --out "$OUT/probe-decode-$label.json" "$@" ) \
    2>&1 | grep -v "^\[W" > "$OUT/probe_$label.log"
  grep -E "^B[0-9]|splits [0-9]+: " "$OUT/probe_$label.log" | cut -d";" -f1
}
bash tools/gpu_session.sh 2>&1 | tail -n 2
echo "== main"; probe main
git apply bench/pending/decode-merge-pipelined.patch || exit 1
bash tools/gpu_session.sh 2>&1 | tail -n 1
echo "== merge pipelined (with the split sweep at 1B ctx 32k and 8B ctx 4k: a cheaper merge may want more splits)"
probe pipelined --sweep 1,2
cd /tmp
timeout 150 python3 -m pytest -q -n 8 -m gpu -rfE --tb=short --rootdir="$REPO" -p no:cacheprovider \
  "$REPO/tests/test_kvcache.py" "$REPO/tests/test_transformers_integration.py" > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 12
