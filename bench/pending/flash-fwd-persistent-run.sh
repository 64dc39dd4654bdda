#!/usr/bin/env bash
# One device call for bench/pending/flash-fwd-persistent.patch, once applied (git apply, then commit): build, a smoke
# of every forward path with few CTAs (a hang or a wrong tile stops here), the forward A/B of the persistent launch
# against one CTA per tile (SCALED_ROPE_FLASH_CTAS=1000000: the same kernel, so the A/B isolates persistence), and
# the GPU tests of the CUDA attention and backward. About 8 minutes on an H100. Logs under $OUT.
#   device run: bash bench/pending/flash-fwd-persistent-run.sh
set -uo pipefail
REPO=$PWD
export OUT="${OUT:-$PWD/gpu-out}" SCALED_ROPE_AUTOTUNE=0
bash tools/gpu_session.sh 2>&1 | tail -n 4
cd /tmp
timeout 150 python3 -m pytest -q -x -m gpu -k "kernel_paths or persistent" --rootdir="$REPO" -p no:cacheprovider \
  "$REPO/tests/test_cuda_attention.py" > "$OUT/smoke.log" 2>&1 || { tail -n 40 "$OUT/smoke.log"; exit 1; }
tail -n 2 "$OUT/smoke.log"
P="$REPO/tools/profile_training_step.py"
B="cuda,cuda:SCALED_ROPE_FLASH_CTAS=1000000"
( timeout 110 python3 "$P" --models llama3.1-8b,phi3-mini,llama3.2-1b,qwen2.5-7b --batch 4 --n 4096 --backends $B \
    --forward --steps 3 --rounds 2
  timeout 80 python3 "$P" --models llama3.1-8b,llama3.2-1b --batch 1 --n 16384 --backends $B --forward --steps 3 \
    --rounds 2
) 2>&1 | grep -v "^\[W" > "$OUT/ab_fwd.log"
grep -E "^(==|round)|flash_fwd|cudnn|rotate" "$OUT/ab_fwd.log" | cut -c1-120
timeout -s INT 230 python3 -m pytest -n 12 -v -m gpu -rfE --tb=short --durations=10 --rootdir="$REPO" \
  -p no:cacheprovider "$REPO/tests/test_cuda_attention.py" "$REPO/tests/test_cuda_backward.py" > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 30
