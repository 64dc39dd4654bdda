#!/usr/bin/env bash
# One device call for bench/pending/flash-fwd-persistent.patch: the forward of main's kernel (v7) and of the patched
# persistent kernel (consumers rotating q: the default; the producer warps rotating: SCALED_ROPE_FLASH_Q_ROTATORS=1;
# one CTA per tile: SCALED_ROPE_FLASH_CTAS=1000000), each run with cuDNN beside it as the common anchor, then the
# GPU tests of the patched build. About 8 minutes on an H100 (builds take ~15 s). Logs under $OUT.
#   device run: bash bench/pending/flash-fwd-persistent-run.sh
set -uo pipefail
REPO=$PWD
export OUT="${OUT:-$PWD/gpu-out}" SCALED_ROPE_AUTOTUNE=0
P="$REPO/tools/profile_training_step.py"
ab() {  # $1: label, $2: backends
  ( cd /tmp
    timeout 100 python3 "$P" --models llama3.1-8b,phi3-mini,llama3.2-1b --batch 4 --n 4096 --backends "$2" --forward \
      --steps 3 --rounds 2
    timeout 60 python3 "$P" --models llama3.1-8b,phi3-mini --batch 1 --n 16384 --backends "$2" --forward --steps 3 \
      --rounds 2 ) 2>&1 | grep -v "^\[W" > "$OUT/ab_fwd_$1.log"
  grep -E "^(==|round)|flash_fwd|cudnn" "$OUT/ab_fwd_$1.log" | cut -c1-110
}
bash tools/gpu_session.sh 2>&1 | tail -n 2
ab main cuda
git apply bench/pending/flash-fwd-persistent.patch || exit 1
bash tools/gpu_session.sh 2>&1 | tail -n 1
cd /tmp
timeout 150 python3 -m pytest -q -x -m gpu -k "kernel_paths or persistent" --rootdir="$REPO" -p no:cacheprovider \
  "$REPO/tests/test_cuda_attention.py" > "$OUT/smoke.log" 2>&1 || { tail -n 40 "$OUT/smoke.log"; exit 1; }
tail -n 1 "$OUT/smoke.log"
cd "$REPO"
ab persistent "cuda,cuda:SCALED_ROPE_FLASH_Q_ROTATORS=1,cuda:SCALED_ROPE_FLASH_CTAS=1000000"
cd /tmp
timeout -s INT 200 python3 -m pytest -n 12 -q -m gpu -rfE --tb=short --rootdir="$REPO" \
  -p no:cacheprovider "$REPO/tests/test_cuda_attention.py" "$REPO/tests/test_cuda_backward.py" > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 20
