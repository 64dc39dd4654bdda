#!/usr/bin/env bash
# One device-machine call for the CUDA flash forward: build, GPU tests of every kernel path, compute-sanitizer,
# timings. Logs go to $OUT (default ./gpu-out); a summary is printed.
# Usage: bash tools/flash_gpu_check.sh [build] [tests] [sanitize] [time] [profile]   (default: the first four)
# Kernel paths on an H100/H200 (head_dim 128): default = sm_90a with 3 K/V stages;
# SCALED_ROPE_FLASH_SM90_STAGES_2=1 = 2 stages; SCALED_ROPE_FLASH_SM80=1 = the sm_80 kernel. head_dim 64 runs sm_80.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
REPO="$PWD"
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests sanitize time)
for step in "${steps[@]}"; do
  t0=$(date +%s)
  case "$step" in
    build)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
      SCALED_ROPE_CUDA_ARCHS="${SCALED_ROPE_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}" \
        python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 || {
          echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
      python3 -c "import scaled_rope._C as c; print('built', c.compiled_archs(), 'cuda', c.cuda_version())" ;;
    tests)
      cd /tmp || exit 1
      for path in sm90 sm90-2stage sm80; do
        env_args=()
        [ "$path" = sm90-2stage ] && env_args=(SCALED_ROPE_FLASH_SM90_STAGES_2=1)
        [ "$path" = sm80 ] && env_args=(SCALED_ROPE_FLASH_SM80=1)
        env "${env_args[@]}" timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -m gpu -rfE --tb=short -p no:cacheprovider \
          --rootdir="$REPO" "$REPO/tests/test_cuda_attention.py" > "$OUT/tests_$path.log" 2>&1
        echo "tests ($path): $(grep -E 'passed|failed|error' "$OUT/tests_$path.log" | tail -1)"
        grep -E "^(FAILED|ERROR)" "$OUT/tests_$path.log" | head -8
      done
      cd "$REPO" || exit 1 ;;
    sanitize)
      for path in sm90 sm80; do
        env_args=()
        [ "$path" = sm80 ] && env_args=(SCALED_ROPE_FLASH_SM80=1)
        env "${env_args[@]}" PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-150}" compute-sanitizer --tool memcheck \
          --print-limit 40 python3 tools/sanitize_flash.py > "$OUT/sanitize_$path.log" 2>&1
        echo "memcheck ($path): $(grep -E 'ERROR SUMMARY|all ok|MISMATCH' "$OUT/sanitize_$path.log" | tr '\n' ' ')"
        head -60 "$OUT/sanitize_$path.log" > "$OUT/sanitize_${path}_head60.log"
      done ;;
    time)
      timeout 240 python3 tools/time_flash.py > "$OUT/time_flash.log" 2>&1
      tail -16 "$OUT/time_flash.log" ;;
    profile)
      for case in longrope rerope; do
        flag=(); [ "$case" = rerope ] && flag=(--rerope)
        timeout 240 ncu --clock-control none -k regex:flash_fwd --launch-skip 1 --launch-count 1 \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
          --section SchedulerStats --section LaunchStats python3 tools/profile_flash.py "${flag[@]}" \
          > "$OUT/ncu_$case.txt" 2>&1
        echo "ncu ($case): $(grep -E 'Duration|Compute \(SM\) Throughput|L2 Cache Throughput' "$OUT/ncu_$case.txt" \
          | tr -s ' ' | tr '\n' ';')"
      done ;;
    *) echo "unknown step $step" ;;
  esac
  echo "step $step: $(( $(date +%s) - t0 )) s"
done
