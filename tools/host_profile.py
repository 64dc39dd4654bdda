"""Host (CPU) cost of one `scaled_rope_attention` call on the GPU: enqueue time per call without a sync, GPU time
per call, and a cProfile of the Python side, at B1 H32 N4k D128 causal bf16 (plain, ReRoPE, Leaky, explicit
positions). When the host time per call is above the GPU time, benchmarks of this size measure the host.

    python tools/host_profile.py [--calls 200] [--top 25]
"""
import argparse
import cProfile
import pstats
import time

import torch

from scaled_rope import RopeScaling, scaled_rope_attention


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    b, h, n, d = 1, 32, 4096, 128
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = torch.arange(n, device="cuda", dtype=torch.int32)[None]
    rope = RopeScaling.default(d)
    variants = {"plain": {}, "rerope": dict(rerope_window=512), "leaky": dict(rerope_window=512, rerope_leak=16.0),
                "explicit": dict(rerope_window=512, q_positions=pos, k_positions=pos)}
    for name, extra in variants.items():
        call = lambda: scaled_rope_attention(q, k, v, rope, backend="triton", **extra)  # noqa: E731
        with torch.no_grad():
            for _ in range(10):
                call()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            host = (time.perf_counter() - start) / args.calls * 1e6
            torch.cuda.synchronize()
            total = (time.perf_counter() - start) / args.calls * 1e6
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.calls):
                call()
            profile.disable()
            torch.cuda.synchronize()
        print(f"== {name}: host {host:.0f} us per call (no sync), host + drain {total:.0f} us per call", flush=True)
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
