"""Standalone rotation kernels: GB/s of the CUDA and Triton scaled-RoPE rotation against eager PyTorch.

Eager = what models do today: a precomputed cos/sin cache indexed by position, then x * cos + rotate_half(x) * sin.
Bytes = read x + write out + read positions (the tables are a few KB). A plain copy of x shows the ceiling.
Prints the GPU, versions and a markdown table; writes bench/results/rope-<date>-<gpu>.json.

    python bench/bench_rope.py [--dtype bf16] [--out PATH]
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from _results import today, write_results

import torch

SHAPES = [  # (B, N, H, D, layout)
    (1, 16384, 32, 128, "half"),
    (4, 4096, 32, 128, "half"),
    (1, 16384, 32, 128, "interleaved"),
    (1, 16384, 8, 128, "half"),       # GQA k
    (8, 1, 32, 128, "half"),          # decode step
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_rotation(x, positions, rope, max_position):
    """The usual eager pipeline: cos/sin cache in x's dtype (built once), gather by position, rotate_half."""
    inv_freq, factor = rope.frequencies(None)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    if rope.layout == "half":
        angles = torch.cat([angles, angles], dim=-1)
    else:
        angles = angles.repeat_interleave(2, dim=-1)
    cos_cache = (angles.cos() * factor).to(device=x.device, dtype=x.dtype)
    sin_cache = (angles.sin() * factor).to(device=x.device, dtype=x.dtype)

    def rotate_half(t):
        if rope.layout == "half":
            t1, t2 = t.chunk(2, dim=-1)
            return torch.cat([-t2, t1], dim=-1)
        return torch.stack([-t[..., 1::2], t[..., 0::2]], dim=-1).flatten(-2)

    def run():
        cos = cos_cache[positions][:, :, None, :]
        sin = sin_cache[positions][:, :, None, :]
        return x * cos + rotate_half(x) * sin

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON (default bench/results); the file is rope-<date>-<gpu>.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_rope: no CUDA GPU on this machine; the rotation benchmark needs one (tests cover the CPU path)")
        return 0

    import triton
    from triton.testing import do_bench

    from scaled_rope import RopeScaling
    from scaled_rope._cuda import cuda_rotate, load_extension
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.rope import rotate as triton_rotate

    ext, why = load_extension()
    gpu = torch.cuda.get_device_name()
    env = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda_torch": torch.version.cuda,
        "cuda_extension": ext.cuda_version() if ext else None,
        "extension_archs": ext.compiled_archs() if ext else None,
        "python": platform.python_version(), "dtype": args.dtype,
    }
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    if ext is None:
        print(f"CUDA kernel skipped: {why}")
    dtype = DTYPES[args.dtype]
    rows = []
    for batch, seqlen, heads, dim, layout in SHAPES:
        rope = RopeScaling.default(dim, layout=layout)
        x = torch.randn(batch, seqlen, heads, dim, device="cuda", dtype=dtype)
        positions = torch.arange(seqlen, device="cuda", dtype=torch.int32).expand(batch, seqlen)
        tables = build_tables(rope, batch, "cuda")
        out = torch.empty_like(x)
        moved = 2 * x.numel() * x.element_size() + positions.numel() * positions.element_size()
        methods = {
            "copy": lambda: out.copy_(x),
            "eager": eager_rotation(x, positions, rope, seqlen),
            "triton": lambda: triton_rotate(x, positions, tables, out=out),
        }
        if ext is not None:
            methods["cuda"] = lambda: cuda_rotate(x, positions, tables, out=out)
        reference = methods["eager"]().float()
        shape = f"B{batch} N{seqlen} H{heads} D{dim} {layout}"
        for name, fn in methods.items():
            result = fn()
            err = 0.0 if name == "copy" else (result.float() - reference).abs().max().item()
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            rows.append({"shape": shape, "batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": dim,
                         "layout": layout, "method": name, "ms": ms, "gbps": moved / ms / 1e6,
                         "max_abs_diff_vs_eager": err})

    print()
    print("| shape | method | time (us) | GB/s | vs eager | max abs diff vs eager |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        eager = next(r for r in rows if r["shape"] == row["shape"] and r["method"] == "eager")
        print(f"| {row['shape']} | {row['method']} | {row['ms'] * 1e3:.1f} | {row['gbps']:.0f} | "
              f"{eager['ms'] / row['ms']:.2f}x | {row['max_abs_diff_vs_eager']:.2e} |")
    path = write_results(args.out, "rope", gpu, {"date": today(), "env": env,
                                                 "bytes": "read x + write out + read positions", "results": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
