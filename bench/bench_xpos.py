"""xPos against plain LongRoPE (issue #16's target: at least 90% of plain), forward and forward + backward.

Llama-3.1-8B's heads (GQA 32/8, D128), bf16, causal, at B1 N16k and B4 N4k, LongRoPE (Phi-3-like factors). Rows:
  plain auto     `scaled_rope_attention` without xPos, backend "auto" (the CUDA kernels on Hopper)
  plain triton   the same on the Triton backend (the kernels xPos runs on)
  xpos           `xpos_scale_base=512` (backend "auto", which takes Triton: the CUDA backend has no xPos kernel)
Medians of triton.testing.do_bench. Prints versions and a table; writes xpos-<date>-<gpu>.json to bench/results
(or --out, a directory or a .json path).

    python bench/bench_xpos.py [--out DIR|PATH]
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from _results import today, write_results

import torch

SHAPES = [(1, 16384), (4, 4096)]  # (B, N) with 32 query / 8 KV heads of 128
SCALE_BASE = 512.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="directory or .json path (default bench/results)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_xpos: no CUDA GPU on this machine; this benchmark needs one")
        return 0
    import triton
    from triton.testing import do_bench

    from scaled_rope import RopeScaling, scaled_rope_attention

    gpu = torch.cuda.get_device_name()
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "dtype": "bf16", "xpos_scale_base": SCALE_BASE}
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    pairs = 64
    rope = RopeScaling.longrope(128, 4096, 131072, [1.0 + 0.2 * i / pairs for i in range(pairs)],
                                [1.0 + 40.0 * (i / pairs) ** 2 for i in range(pairs)])
    variants = {"plain auto": dict(backend="auto"), "plain triton": dict(backend="triton"),
                "xpos": dict(backend="auto", xpos_scale_base=SCALE_BASE)}
    rows = []
    for batch, n in SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, n, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (32, 8, 8))
        dout = torch.randn_like(q)
        for name, kwargs in variants.items():
            def forward(kwargs=kwargs):
                return scaled_rope_attention(q, k, v, rope, **kwargs)

            with torch.no_grad():
                fwd = do_bench(forward, warmup=25, rep=200, return_mode="median")
            both = do_bench(lambda: forward().backward(dout), warmup=10, rep=200, grad_to_none=[q, k, v],
                            return_mode="median")
            rows.append(dict(shape=f"B{batch} N{n} H32/8 D128", batch=batch, n=n, variant=name, fwd_ms=fwd,
                             fwd_bwd_ms=both))
            print(f"B{batch} N{n} {name}: forward {fwd:.3f} ms, forward + backward {both:.3f} ms", flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
    print("\n| shape | variant | fwd ms | fwd+bwd ms | plain auto / this, fwd | fwd+bwd |\n|---|---|---:|---:|---:|---:|")
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["variant"] == "plain auto")
        print(f"| {row['shape']} | {row['variant']} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | "
              f"{base['fwd_ms'] / row['fwd_ms']:.2f} | {base['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f} |")
    path = write_results(args.out, "xpos", gpu, {"date": today(), "env": env, "results": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
