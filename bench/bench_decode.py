"""Decode over an unrotated KV cache: GB/s of KV read (K + V bytes of the used cache), one query token.

Ours rotates cached keys on-chip (LongRoPE factors per row, plain and Leaky ReRoPE), against, in the same run:
  sdpa default (prerotated)  SDPA with its default backend on a cache rotated once at write time (what
                    transformers runs; its keys are stale once LongRoPE switches sets or the dynamic NTK base moves)
  sdpa flash (prerotated)    the same with SDPA's flash backend forced; the ratio column is against the faster one
  rerotate+sdpa     eager rotation of the whole cache every step, then SDPA: what exactness costs today
"ours api" is the public call (argument checks, cached tables, append kernel for the new token, decode kernel,
merge, device-side length assertion; no host sync); "ours kernel" is the launcher on prebuilt tables. Prints versions and a markdown table; writes
decode-<date>-<gpu>.json to bench/results (or --out, a directory or a .json path).

    python bench/bench_decode.py [--out DIR|PATH] [--quick] [--sweep] [--shapes I,J]

--sweep also times the kernel over SWEEP_CONFIGS x (default splits, twice that) on the shapes marked for it, and
Leaky ReRoPE over a few configs on the GQA shape (tuning; a few minutes more). --shapes: indices into SHAPES.
The copy ceiling (a device-to-device copy, bytes read + written) is measured in the same run.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from _results import today, write_results

import torch

SHAPES = [  # (B, ctx, Hq, Hkv, D)
    (8, 32768, 32, 32, 128),
    (1, 131072, 32, 32, 128),
    (8, 32768, 32, 8, 128),   # GQA, Llama-3.1-8B's heads
    (1, 131072, 32, 8, 128),
    (1, 32768, 32, 8, 64),    # Llama-3.2-1B's heads
]
SWEEP_SHAPES = {(1, 131072, 32, 32, 128), (8, 32768, 32, 8, 128), (1, 32768, 32, 8, 64)}
SWEEP_CONFIGS = [  # (BLOCK_N, num_warps, num_stages, maxnreg)
    (32, 4, 3, None), (32, 4, 4, None), (32, 8, 3, None), (32, 8, 4, None), (64, 4, 3, None), (64, 8, 2, None),
    (64, 8, 3, None), (64, 8, 4, None), (64, 8, 3, 128), (64, 8, 4, 128), (32, 8, 3, 128), (128, 8, 2, None),
    (128, 8, 3, None),
]
LEAKY_SWEEP = [(32, 4, 3, None), (32, 8, 3, None), (64, 8, 2, None), (64, 8, 3, None), (64, 8, 3, 168)]
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


def sdpa(q, k, v, backend="default"):
    """q (B, 1, Hq, D); k, v (B, N, Hkv, D) -> (B, 1, Hq, D) via SDPA (default backend, or flash forced)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    gqa = q.shape[2] != k.shape[2]
    if backend == "default":
        return torch.nn.functional.scaled_dot_product_attention(*args, enable_gqa=gqa).transpose(1, 2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(*args, enable_gqa=gqa).transpose(1, 2)


def copy_ceiling(do_bench) -> float:
    """TB/s of a 4 GiB device-to-device copy, bytes read + written."""
    src = torch.empty(2 ** 31, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 ** 32 / ms / 1e9


def host_time_us(fn, calls: int = 50) -> float:
    """Host time per call: wall time of `calls` back-to-back calls without a synchronisation (the launches queue
    up on the GPU), after the queue has drained. Where it exceeds the GPU time, the call is host-bound."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def sweep_configs(configs, shape, n_splits_default, run):
    """Time `run(num_splits, config)` for each config and split count; rows for the JSON."""
    rows = []
    for block_n, warps, stages, maxnreg in configs:
        for n_splits in (n_splits_default, 2 * n_splits_default):
            cfg = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
            if maxnreg:
                cfg["maxnreg"] = maxnreg
            try:
                entry = {"ms": run(n_splits, cfg)}
            except Exception as exc:
                entry = {"ms": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append({"shape": shape, "num_splits": n_splits, "maxnreg": maxnreg, **cfg, **entry})
            print(f"  sweep {shape} {cfg} splits {n_splits}: {entry.get('ms')}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="directory or .json path (default bench/results)")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel configs (about a minute a shape)")
    parser.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default all)")
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
    env["copy_tbps"] = copy_ceiling(do_bench)
    print(f"copy ceiling: {env['copy_tbps']:.2f} TB/s (device-to-device, read + write)")
    dtype, dev = torch.bfloat16, "cuda"
    rows, sweep = [], []
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",") if i] or (SHAPES[:1] if args.quick else SHAPES)
    for batch, ctx, hq, hkv, dim in shapes:
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
        # the kernels alone on prebuilt tables: plain RoPE against Leaky ReRoPE (far keys on their own j-table)
        default, leaky = RopeScaling.default(dim), dict(rerope_window=512, rerope_leak=16.0)
        near = build_tables(default, batch, dev, seq_lens=seqlens)
        q_far = build_tables(default, batch, dev, seq_lens=seqlens, far="q", **leaky)
        k_far = build_tables(default, batch, dev, seq_lens=seqlens, far="k", **leaky)
        methods["ours kernel plain rope"] = lambda: decode_attention(q, k_cache, v_cache, seqlens, near)
        methods["ours kernel leaky-rerope w512 k16"] = lambda: decode_attention(
            q, k_cache, v_cache, seqlens, near, q_far_tables=q_far, k_far_tables=k_far, **leaky)
        k_rot = eager_rotate(k_cache, rope, ctx)()
        q_rot = eager_rotate(q, rope, ctx, start=ctx - 1)
        methods["sdpa default (prerotated)"] = lambda: sdpa(q, k_rot, v_cache)
        methods["sdpa flash (prerotated)"] = lambda: sdpa(q, k_rot, v_cache, "flash")
        rerotate = eager_rotate(k_cache, rope, ctx)
        methods["rerotate+sdpa"] = lambda: sdpa(q_rot(), rerotate(), v_cache)
        try:  # ours against SDPA on the eagerly rotated cache (bf16 cos/sin: expect ~1e-2)
            ours = decode_attention(q, k_cache, v_cache, seqlens, tables)[0].float()
            diff = (ours - sdpa(q_rot(), k_rot, v_cache).float()).abs().max().item()
        except Exception as exc:
            diff = float("nan")
            print(f"check failed: {type(exc).__name__}: {exc}")

        shape = f"B{batch} ctx{ctx} H{hq}/{hkv} D{dim}"
        print(f"{shape}: {splits} splits by default", flush=True)
        for name, fn in methods.items():
            entry = {"shape": shape, "batch": batch, "ctx": ctx, "hq": hq, "hkv": hkv, "head_dim": dim,
                     "method": name, "num_splits": splits if name.startswith("ours") else None}
            try:
                fn()
                torch.cuda.synchronize()
                ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
                entry.update(ms=ms, tbps=kv_bytes / ms / 1e9, host_us=host_time_us(fn))
            except Exception as exc:  # a peer that cannot run here is recorded, not fatal
                entry.update(ms=None, tbps=None, error=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(entry)
        rows.append({"shape": shape, "method": "check: max|ours - sdpa(rotated)|", "value": diff})
        if args.sweep and (batch, ctx, hq, hkv, dim) in SWEEP_SHAPES:
            def plain(n_splits, cfg):
                return do_bench(lambda: decode_attention(q, k_cache, v_cache, seqlens, tables, num_splits=n_splits,
                                                         config=cfg), warmup=5, rep=25, return_mode="median")
            sweep += [dict(r, method="longrope") for r in sweep_configs(SWEEP_CONFIGS, shape, splits, plain)]
            if hkv < hq and batch > 1:
                def leaky_run(n_splits, cfg):
                    return do_bench(lambda: decode_attention(q, k_cache, v_cache, seqlens, near, q_far_tables=q_far,
                                                             k_far_tables=k_far, num_splits=n_splits, config=cfg,
                                                             **leaky), warmup=5, rep=25, return_mode="median")
                sweep += [dict(r, method="leaky-rerope") for r in sweep_configs(LEAKY_SWEEP, shape, splits, leaky_run)]
        methods.clear()  # drop this shape's tensors before the next one is allocated
        torch.cuda.empty_cache()
        path = write_results(args.out, "decode", gpu, {"date": today(), "env": env, "results": rows, "sweep": sweep,
                                                       "bytes": "K + V bytes of the used cache"})  # kept if cut short

    print()
    print("| shape | method | time (us) | host (us/call) | KV TB/s | of copy | method time / ours api |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if "value" in row:
            print(f"| {row['shape']} | {row['method']} | {row['value']:.2e} | | | | |")
            continue
        ours = next(r for r in rows if r["shape"] == row["shape"] and r["method"] == "ours api longrope")
        if row["ms"] is None:
            print(f"| {row['shape']} | {row['method']} | n/a | | n/a | | {row['error']} |")
            continue
        ratio = f"{row['ms'] / ours['ms']:.2f}x" if ours["ms"] else "n/a"
        print(f"| {row['shape']} | {row['method']} | {row['ms'] * 1e3:.0f} | {row['host_us']:.0f} | {row['tbps']:.2f} | "
              f"{row['tbps'] / env['copy_tbps']:.0%} | {ratio} |")
    if sweep:
        print("\n| shape | method | BLOCK_N | warps | stages | maxnreg | splits | us |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for row in sorted(sweep, key=lambda r: (r["shape"], r["method"], r["ms"] or 1e9)):
            ms = f"{row['ms'] * 1e3:.0f}" if row["ms"] else row.get("error", "n/a")
            print(f"| {row['shape']} | {row['method']} | {row['BLOCK_N']} | {row['num_warps']} | {row['num_stages']} | "
                  f"{row['maxnreg']} | {row['num_splits']} | {ms} |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
