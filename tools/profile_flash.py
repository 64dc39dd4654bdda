"""One CUDA-attention forward at B1 H32 N16k D128 causal bf16 (LongRoPE, or ReRoPE w = 512) for Nsight Compute.

    ncu --clock-control none -k regex:flash_fwd --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        python tools/profile_flash.py [--rerope] [--n 16384]

Runs the forward twice (the first launch warms up and is skipped by --launch-skip 1). Kernel switches as in
tools/time_flash.py (SCALED_ROPE_FLASH_SM80=1) go in the environment.
"""
import argparse

import torch

from scaled_rope import RopeScaling, scaled_rope_attention


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--rerope", action="store_true")
    args = parser.parse_args()
    d = 128
    q, k, v = (torch.randn(1, args.n, args.heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if args.rerope:
        rope, extra = RopeScaling.default(d), dict(rerope_window=512)
    else:
        rope = RopeScaling.longrope(d, 4096, 131072, [1.0 + 0.01 * i for i in range(d // 2)],
                                    [1.5 + 0.1 * i for i in range(d // 2)])
        extra = {}
    for _ in range(2):
        scaled_rope_attention(q, k, v, rope, causal=True, backend="cuda", **extra)
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()
