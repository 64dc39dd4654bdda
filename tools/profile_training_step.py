"""Where a forward + backward of attention goes, ours against SDPA cuDNN without rope: torch.profiler over a few
steps at a real model's attention shape (bench_attention's "models" cases), GPU time per step by kernel.

    python tools/profile_training_step.py [--models phi3-mini,llama3.1-8b] [--batch 1] [--n 16384] [--steps 5]
                                          [--backends cuda,triton] [--forward]

Then, for each model, the backends timed in alternating rounds (A B A B ...) with do_bench medians, so that an
order effect between two calls shows up as a difference between rounds, not between backends. A backend may carry
environment switches for its calls, e.g. --backends cuda,cuda:SCALED_ROPE_L2_SECTION_HEADS=1 (an A/B of one
switch in one process). --forward times the forward alone.
"""
import argparse
import os
import sys
from unittest import mock
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_attention import model_ropes, sdpa  # noqa: E402

from scaled_rope import scaled_rope_attention  # noqa: E402


def inputs(batch, n, hq, hkv, dim, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(batch, n, h, dim, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = make(hq).requires_grad_(True), make(hkv).requires_grad_(True), make(hkv).requires_grad_(True)
    return q, k, v, make(hq)


def finish(out, dout, forward_only: bool):
    if not forward_only:
        out.backward(dout)


def with_env(env: dict, step):
    """step run with the environment switches env set (restored afterwards)."""
    def run():
        with mock.patch.dict(os.environ, env):
            step()
    return run


def kernel_times(step, steps: int) -> dict:
    """Kernel name -> GPU microseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time / steps
    return dict(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="phi3-mini,llama3.1-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forward", action="store_true", help="time the forward alone")
    args = parser.parse_args()
    direction = "fwd" if args.forward else "fwd+bwd"
    from triton.testing import do_bench

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    ropes = model_ropes()
    for model in args.models.split(","):
        hq, hkv, dim, rope = ropes[model]
        q, k, v, dout = inputs(args.batch, args.n, hq, hkv, dim)
        steps = {}
        for spec in args.backends.split(","):
            backend, *switches = spec.split(":")
            env = dict(item.split("=", 1) for item in switches)
            steps[f"ours ({spec})"] = with_env(env, lambda b=backend: finish(
                scaled_rope_attention(q, k, v, rope, backend=b), dout, args.forward))
        steps["SDPA cuDNN (no rope)"] = lambda: finish(sdpa(q, k, v, "cudnn"), dout, args.forward)
        for name, step in steps.items():
            times = kernel_times(step, args.steps)
            total = sum(times.values())
            print(f"== {model} B{args.batch} N{args.n} {direction}, {name}: {total / 1e3:.3f} ms of kernels per step",
                  flush=True)
            for kernel, us in sorted(times.items(), key=lambda kv: -kv[1])[:12]:
                print(f"   {us:9.1f} us  {kernel[:110]}")
        for r in range(args.rounds):
            line = "  ".join(f"{name} {do_bench(step, warmup=25, rep=100, return_mode='median'):.3f}"
                             for name, step in steps.items())
            print(f"round {r}: {line} ms", flush=True)


if __name__ == "__main__":
    main()
