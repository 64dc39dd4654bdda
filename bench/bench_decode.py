"""Decode over an unrotated KV cache: GB/s of KV read (K + V bytes of the used cache), one query token.

Ours rotates cached keys on-chip (LongRoPE factors per row, plain and Leaky ReRoPE), against, in the same run:
  sdpa-prerotated   SDPA (flash) on a cache rotated once at write time: today's ceiling, but its keys are stale
                    once LongRoPE switches sets or the dynamic NTK base moves
  rerotate+sdpa     eager rotation of the whole cache every step, then SDPA: what exactness costs today
"ours api" is the public call (argument checks, cached tables, append kernel for the new token, decode kernel,
merge, device-side length assertion; no host sync); "ours kernel" is the launcher on prebuilt tables. Prints versions and a markdown table; writes
decode-<date>-<gpu>.json to bench/results (or --out, a directory or a .json path).

    python bench/bench_decode.py [--out DIR|PATH] [--quick] [--sweep]

--sweep also times the kernel over BLOCK_N x num_warps x num_stages x maxnreg x num_splits on the first two
shapes (tuning; about 2 minutes more).
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from _results import today, write_results

import torch

SHAPES = [  # (B, ctx, Hq, Hkv, D)
    (8, 32768, 32, 32, 128),
    (1, 131072, 32, 32, 128),
    (8, 32768, 32, 8, 128),  # GQA
]
ORIGINAL, MAXIMUM = 4096, 131072


def longrope(dim):
    pairs = dim // 2
    short = [1.0 + 0.2 * i / pairs for i in range(pairs)]
    long_ = [1.0 + 40.0 * (i / pairs) ** 2 for i in range(pairs)]  # Phi-3-like spread
    from scaled_rope import RopeScaling

    return RopeScaling.longrope(dim, ORIGINAL, MAXIMUM, short, long_)


def eager_rotate(x, rope, length, start=0):
    """HF-style rotation of x (B, N, H, D) at positions start.. with the set of `length`; cos/sin in x's dtype."""
    inv_freq, factor = rope.frequencies(length)
    angles = torch.arange(start, start + x.shape[1], dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos = (angles.cos() * factor).to(device=x.device, dtype=x.dtype)[None, :, None, :]
    sin = (angles.sin() * factor).to(device=x.device, dtype=x.dtype)[None, :, None, :]

    def run():
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    return run


def sdpa_flash(q, k, v):
    """q (B, 1, Hq, D); k, v (B, N, Hkv, D) -> (B, 1, Hq, D) via SDPA's flash backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[2] // k.shape[2]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=group > 1)
    return out.transpose(1, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="directory or .json path (default bench/results)")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel configs (about a minute a shape)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode: no CUDA GPU on this machine; the decode benchmark needs one")
        return 0

    import triton
    from triton.testing import do_bench

    from scaled_rope import RopeScaling
    from scaled_rope.kvcache import scaled_rope_attention_with_kvcache
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.decode import choose_num_splits, decode_attention

    gpu = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    env = {"gpu": gpu, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "dtype": "bf16"}
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    dtype, dev = torch.bfloat16, "cuda"
    rows, sweep = [], []
    for batch, ctx, hq, hkv, dim in SHAPES[:1] if args.quick else SHAPES:
        torch.manual_seed(0)
        rope = longrope(dim)
        k_cache = torch.randn(batch, ctx, hkv, dim, device=dev, dtype=dtype)
        v_cache = torch.randn(batch, ctx, hkv, dim, device=dev, dtype=dtype)
        q = torch.randn(batch, 1, hq, dim, device=dev, dtype=dtype)
        k_new = k_cache[:, ctx - 1:].clone()
        v_new = v_cache[:, ctx - 1:].clone()
        cached = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
        seqlens = cached + 1
        kv_bytes = 2 * batch * ctx * hkv * dim * k_cache.element_size()
        tables = build_tables(rope, batch, dev, seq_lens=seqlens)
        splits = choose_num_splits(batch * hkv, ctx, sms)

        def api(**kw):
            return lambda: scaled_rope_attention_with_kvcache(q, k_cache, v_cache, rope, cache_seqlens=cached,
                                                              k_new=k_new, v_new=v_new, **kw)

        methods = {
            "ours api longrope": api(),
            "ours kernel longrope": lambda: decode_attention(q, k_cache, v_cache, seqlens, tables),
            "ours api rerope w512": lambda: scaled_rope_attention_with_kvcache(
                q, k_cache, v_cache, RopeScaling.default(dim), cache_seqlens=cached, k_new=k_new, v_new=v_new,
                rerope_window=512),
            "ours api leaky-rerope w512 k16": lambda: scaled_rope_attention_with_kvcache(
                q, k_cache, v_cache, RopeScaling.default(dim), cache_seqlens=cached, k_new=k_new, v_new=v_new,
                rerope_window=512, rerope_leak=16.0),
        }
        k_rot = eager_rotate(k_cache, rope, ctx)()
        q_rot = eager_rotate(q, rope, ctx, start=ctx - 1)
        methods["sdpa-prerotated"] = lambda: sdpa_flash(q, k_rot, v_cache)
        rerotate = eager_rotate(k_cache, rope, ctx)
        methods["rerotate+sdpa"] = lambda: sdpa_flash(q_rot(), rerotate(), v_cache)
        try:  # ours against SDPA on the eagerly rotated cache (bf16 cos/sin: expect ~1e-2)
            ours = decode_attention(q, k_cache, v_cache, seqlens, tables)[0].float()
            diff = (ours - sdpa_flash(q_rot(), k_rot, v_cache).float()).abs().max().item()
        except Exception as exc:
            diff = float("nan")
            print(f"check failed: {type(exc).__name__}: {exc}")

        shape = f"B{batch} ctx{ctx} H{hq}/{hkv} D{dim}"
        for name, fn in methods.items():
            entry = {"shape": shape, "batch": batch, "ctx": ctx, "hq": hq, "hkv": hkv, "head_dim": dim,
                     "method": name, "num_splits": splits if name.startswith("ours") else None}
            try:
                fn()
                torch.cuda.synchronize()
                ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
                entry.update(ms=ms, tbps=kv_bytes / ms / 1e9)
            except Exception as exc:  # a peer that cannot run here is recorded, not fatal
                entry.update(ms=None, tbps=None, error=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(entry)
        rows.append({"shape": shape, "method": "check: max|ours - sdpa(rotated)|", "value": diff})
        if args.sweep and (batch, ctx, hq, hkv, dim) in SHAPES[:2]:
            for block_n in (32, 64):
                for warps in (4, 8):
                    for stages in (2, 3):
                        for maxnreg in (None, 128):
                            for n_splits in (splits, 2 * splits):
                                cfg = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
                                if maxnreg:
                                    cfg["maxnreg"] = maxnreg
                                try:
                                    ms = do_bench(lambda: decode_attention(q, k_cache, v_cache, seqlens, tables,
                                                                           num_splits=n_splits, config=cfg),
                                                  warmup=5, rep=25, return_mode="median")
                                    entry = {"ms": ms, "tbps": kv_bytes / ms / 1e9}
                                except Exception as exc:
                                    entry = {"ms": None, "tbps": None,
                                             "error": f"{type(exc).__name__}: {exc}"[:200]}
                                sweep.append({"shape": shape, "num_splits": n_splits, "maxnreg": maxnreg, **cfg,
                                              **entry})
        methods.clear()  # drop this shape's tensors before the next one is allocated
        torch.cuda.empty_cache()

    print()
    print("| shape | method | time (us) | KV TB/s | ours-api / method |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        if "value" in row:
            print(f"| {row['shape']} | {row['method']} | {row['value']:.2e} | | |")
            continue
        ours = next(r for r in rows if r["shape"] == row["shape"] and r["method"] == "ours api longrope")
        if row["ms"] is None:
            print(f"| {row['shape']} | {row['method']} | n/a | n/a | {row['error']} |")
            continue
        ratio = f"{ours['ms'] / row['ms']:.2f}x" if ours["ms"] else "n/a"
        print(f"| {row['shape']} | {row['method']} | {row['ms'] * 1e3:.0f} | {row['tbps']:.2f} | {ratio} |")
    if sweep:
        print("\n| shape | BLOCK_N | warps | stages | maxnreg | splits | KV TB/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in sorted(sweep, key=lambda r: (r["shape"], -(r["tbps"] or 0))):
            tbps = f"{row['tbps']:.2f}" if row["tbps"] else row.get("error", "n/a")
            print(f"| {row['shape']} | {row['BLOCK_N']} | {row['num_warps']} | {row['num_stages']} | "
                  f"{row['maxnreg']} | {row['num_splits']} | {tbps} |")
    path = write_results(args.out, "decode", gpu, {"date": today(), "env": env, "bytes": "K + V bytes of the used cache",
                                                   "results": rows, "sweep": sweep})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
