#!/usr/bin/env bash
# One device-machine call: build, GPU test tier, benchmarks. Logs and JSON go to $OUT (default ./gpu-out).
# Usage: bash tools/gpu_session.sh [tests] [bench-quick|bench] [decode] [model] [rope] [probe-order]
#        [smoke] [sanitize] [sass] [check-bwd] [ncu] [host-profile] [train-profile] [long-shapes] [model-logits]
#        [model-profile] [probe-decode] [ncu-decode]
# Environment: TEST_FILES (paths relative to the repo or absolute; default tests), TEST_WORKERS, TESTS_TIMEOUT,
# BENCH_BUDGET, BENCH_LABEL, BENCH_ONLY, BENCH_MAX_N, LONG_SHAPES_TIMEOUT, PROBE_DECODE_ARGS, PROBE_DECODE_TIMEOUT.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SCALED_ROPE_CUDA_ARCHS="${SCALED_ROPE_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
cd /tmp  # import the installed package, not the checkout
REPO="$OLDPWD"
for step in "$@"; do
  t0=$(date +%s)
  case "$step" in
    tests) files=(); for f in ${TEST_FILES:-tests}; do [[ "$f" = /* ]] && files+=("$f") || files+=("$REPO/$f"); done
      timeout -s INT "${TESTS_TIMEOUT:-420}" python3 -m pytest -n "${TEST_WORKERS:-8}" -v -m gpu -rfE --tb=short --durations=15 --rootdir="$REPO" -p no:cacheprovider "${files[@]}" > "$OUT/tests.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 40 ;;
    bench-quick) python3 "$REPO/bench/bench_attention.py" --quick --out "$OUT" --label "${BENCH_LABEL:-}" 2>&1 | tee "$OUT/bench_attention.log" | tail -n 40 ;;
    bench) python3 "$REPO/bench/bench_attention.py" --out "$OUT" --budget "${BENCH_BUDGET:-330}" --label "${BENCH_LABEL:-}" --only "${BENCH_ONLY:-}" ${BENCH_MAX_N:+--max-n $BENCH_MAX_N} 2>&1 | tee "$OUT/bench_attention${BENCH_ONLY:+-${BENCH_ONLY//,/_}}.log" | tail -n 60 ;;
    decode) python3 "$REPO/bench/bench_decode.py" --out "$OUT" 2>&1 | tee "$OUT/bench_decode.log" | tail -n 30 ;;
    model) python3 "$REPO/bench/bench_model.py" --out "$OUT" 2>&1 | tee "$OUT/bench_model.log" | tail -n 30 ;;
    rope) python3 "$REPO/bench/bench_rope.py" --out "$OUT" 2>&1 | tee "$OUT/bench_rope.log" | tail -n 20 ;;
    probe-order)  # the Triton forward under the default L2 sections, all heads at once, one head at a time
      for heads in default 1000000 1; do
        ( [ "$heads" = default ] || export SCALED_ROPE_L2_SECTION_HEADS=$heads
          echo "== L2 section heads: $heads"; timeout 150 python3 "$REPO/tools/probe_rerope.py" --quick )
      done 2>&1 | tee "$OUT/probe_order.log" | grep -E "==|TF/s|plain:" ;;
    smoke)  # every sm_90a kernel path on the mixed cases; stops the session when one fails (or hangs)
      timeout 120 python3 -m pytest -q -m gpu -k "kernel_paths" --rootdir="$REPO" -p no:cacheprovider \
        "$REPO/tests/test_cuda_attention.py" > "$OUT/smoke.log" 2>&1 || { tail -n 40 "$OUT/smoke.log"; exit 1; }
      tail -n 2 "$OUT/smoke.log" ;;
    sanitize)  # compute-sanitizer memcheck, racecheck, synccheck on small cases of every kernel (tools/sanitize_flash.py)
      for tool in memcheck racecheck synccheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool $tool --print-limit 40 \
          python3 "$REPO/tools/sanitize_flash.py" > "$OUT/sanitize_$tool.log" 2>&1
        echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|all ok|MISMATCH' "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
      done ;;
    sass)  # register use, local memory, wgmma and barrier counts of the attention kernels
      so=$(python3 -c "import scaled_rope._C as m; print(m.__file__)")
      cuobjdump -sass "$so" > "$OUT/sass.txt" 2>&1; python3 "$REPO/tools/sass_summary.py" "$OUT/sass.txt" ;;
    check-bwd) timeout 240 python3 "$REPO/tools/check_flash_bwd.py" 2>&1 | tee "$OUT/check_bwd.log" | tail -n 30 ;;
    ncu)  # where the sm_90a kernel's time goes (LongRoPE, B1 H32 N16k D128)
      timeout 200 ncu --clock-control none -k regex:flash_fwd --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section Occupancy --section LaunchStats --section InstructionStats \
        python3 "$REPO/tools/profile_flash.py" > "$OUT/ncu.txt" 2>&1; grep -E "Duration|Throughput|Stall|Issue|Eligible" "$OUT/ncu.txt" | head -n 40
      timeout 120 ncu --clock-control none -k regex:flash_fwd --launch-skip 1 --launch-count 1 --section WarpStateStats \
        --print-details all python3 "$REPO/tools/profile_flash.py" > "$OUT/ncu_stalls.txt" 2>&1 ;;
    ncu-decode)  # where a B1 decode kernel's time goes (8B heads, ctx 4k: ~28 us against SDPA's 9; decode v6 in NOTES)
      timeout 240 ncu --clock-control none -k regex:_decode_kernel --launch-skip 3 --launch-count 1 --set full \
        --import-source yes -o "$OUT/ncu_decode" python3 "$REPO/tools/probe_decode.py" --shapes 2 \
        --out /tmp/probe-decode-ncu.json > "$OUT/ncu_decode.log" 2>&1
      ncu --import "$OUT/ncu_decode.ncu-rep" --page details --section SpeedOfLight --section WarpStateStats \
        --section LaunchStats --section Occupancy > "$OUT/ncu_decode.txt" 2>&1
      ncu --import "$OUT/ncu_decode.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_decode_source.csv" 2>&1
      grep -E "Duration|Throughput|Stall|Eligible|Registers|Achieved" "$OUT/ncu_decode.txt" | head -n 30 ;;
    train-profile) timeout 240 python3 "$REPO/tools/profile_training_step.py" 2>&1 | grep -v "^\[W" | tee "$OUT/profile_training_step.log" | grep -E "^(==|round)" ;;
    host-profile) timeout 150 python3 "$REPO/tools/host_profile.py" > "$OUT/host_profile.log" 2>&1; grep -E "^==" "$OUT/host_profile.log" ;;
    long-shapes) timeout "${LONG_SHAPES_TIMEOUT:-240}" python3 "$REPO/tools/check_long_shapes.py" 2>&1 | tee "$OUT/long_shapes.log" | tail -n 12 ;;
    model-logits) timeout 240 python3 "$REPO/tools/check_model_logits.py" 2>&1 | tee "$OUT/check_model_logits.log" | grep -v "^\[" ;;
    probe-decode) timeout "${PROBE_DECODE_TIMEOUT:-300}" python3 "$REPO/tools/probe_decode.py" --out "$OUT" ${PROBE_DECODE_ARGS:-} 2>&1 | tee "$OUT/probe_decode.log" | grep -v "^    " ;;
    model-profile) timeout 150 python3 "$REPO/tools/profile_model_decode.py" > "$OUT/profile_model_decode.log" 2>&1; grep -A16 "^==" "$OUT/profile_model_decode.log" | cut -c1-160 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "step $step: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu.txt"
done
