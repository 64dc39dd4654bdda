"""The decode kernel without the host: time a reused `DecodePlan` and SDPA's default backend on a pre-rotated cache
inside CUDA graphs (what a compiled decode step sees), over the model shapes of issue #11 at B1 ctx 4k / 32k and
the B8 GQA shape, and sweep configs and split counts; also the host time of one plan call (the per-layer cost of
an eager patched model) with a cProfile of it. Writes probe-decode-<date>-<gpu>.json (or --out).

    python tools/probe_decode.py [--out DIR|PATH] [--sweep all|I,J] [--shapes I,J] [--profile]

Plain `bench_decode.py` times with CUDA events around each call: at B1 its kernel rows are host-bound (a plan is
built per call) and time the launcher, not the kernel.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _results import today, write_results  # noqa: E402

SHAPES = [  # (B, ctx, Hq, Hkv, D, model)
    (1, 4096, 32, 8, 64, "llama3.2-1b"), (1, 32768, 32, 8, 64, "llama3.2-1b"),
    (1, 4096, 32, 8, 128, "llama3.1-8b"), (1, 32768, 32, 8, 128, "llama3.1-8b"),
    (1, 4096, 28, 4, 128, "qwen2.5-7b"), (1, 32768, 28, 4, 128, "qwen2.5-7b"),
    (1, 4096, 32, 32, 96, "phi3-mini"), (1, 32768, 32, 32, 96, "phi3-mini"),
    (8, 32768, 32, 8, 128, "gqa-b8"),
]
CONFIGS = [  # (BLOCK_N, num_warps, num_stages, maxnreg)
    (64, 8, 3, 128), (64, 4, 3, None), (64, 4, 4, None), (64, 4, 3, 128), (32, 4, 3, None), (32, 4, 4, None),
    (128, 4, 2, None), (128, 8, 3, None), (64, 8, 4, None),
]
SPLIT_SCALES = (0.5, 1, 2, 4)


def graph_ms(fn) -> float | None:
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=30, return_mode="median")
    except Exception as exc:  # a call that cannot be captured is recorded, not fatal
        print(f"    graph timing failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sweep", default="", help="comma-separated indices into SHAPES to sweep configs x split "
                        "counts on (all: every shape)")
    parser.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default all)")
    parser.add_argument("--profile", action="store_true", help="cProfile of 200 plan calls on the first shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("probe_decode: no CUDA GPU on this machine")
        return 0
    import triton

    from scaled_rope import RopeScaling
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.decode import DecodePlan

    from bench_decode import eager_rotate, host_time_us, longrope, sdpa

    gpu = torch.cuda.get_device_name()
    env = {"gpu": gpu, "sms": torch.cuda.get_device_properties(0).multi_processor_count, "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "dtype": "bf16", "timing": "triton.testing.do_bench_cudagraph, median"}
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    rows, dev, dtype = [], "cuda", torch.bfloat16
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",") if i] or SHAPES
    swept = SHAPES if args.sweep == "all" else [SHAPES[int(i)] for i in args.sweep.split(",") if i]
    for batch, ctx, hq, hkv, dim, model in shapes:
        torch.manual_seed(0)
        rope = longrope(dim)
        k_cache = torch.randn(batch, ctx, hkv, dim, device=dev, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(batch, 1, hq, dim, device=dev, dtype=dtype)
        seqlens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        tables = build_tables(rope, batch, dev, seq_lens=seqlens)
        kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
        shape = f"B{batch} ctx{ctx} H{hq}/{hkv} D{dim} ({model})"
        plan = DecodePlan(q, k_cache, v_cache, seqlens, tables, max_seqlen=ctx)
        k_rot = eager_rotate(k_cache, rope, ctx)()
        base = dict(shape=shape, model=model, batch=batch, ctx=ctx, hq=hq, hkv=hkv, head_dim=dim)
        sdpa_ms = graph_ms(lambda: sdpa(q, k_rot, v_cache))
        ours_ms = graph_ms(lambda: plan(q, k_cache, v_cache))
        rows.append(dict(base, method="sdpa default (prerotated), graph", ms=sdpa_ms,
                         host_us=host_time_us(lambda: sdpa(q, k_rot, v_cache), calls=200)))
        rows.append(dict(base, method="ours plan, graph", ms=ours_ms, num_splits=plan.num_splits,
                         config={k: plan.constexprs.get(k) for k in ("BLOCK_N", "num_warps", "num_stages", "maxnreg")},
                         host_us=host_time_us(lambda: plan(q, k_cache, v_cache), calls=200)))
        os.environ["SCALED_ROPE_JIT_LAUNCH"] = "1"  # the same plan launched through Triton's JIT call every time
        try:
            jit_plan = DecodePlan(q, k_cache, v_cache, seqlens, tables, max_seqlen=ctx)
            jit_us = host_time_us(lambda: jit_plan(q, k_cache, v_cache), calls=200)
        finally:
            del os.environ["SCALED_ROPE_JIT_LAUNCH"]
        rows.append(dict(base, method="ours plan, JIT launch, host only", host_us=jit_us))
        ratio = f"{sdpa_ms / ours_ms:.2f}x" if sdpa_ms and ours_ms else "n/a"
        us = lambda ms: f"{ms * 1e3:.1f}" if ms else "n/a"  # noqa: E731
        print(f"{shape}: sdpa {us(sdpa_ms)} us, ours {us(ours_ms)} us "
              f"({plan.num_splits} splits) = {ratio} sdpa; KV {kv_bytes / 1e6:.0f} MB; host per plan call "
              f"{rows[-2]['host_us']:.1f} us (JIT launch {jit_us:.1f}), sdpa {rows[-3]['host_us']:.1f} us", flush=True)
        if args.profile and len(rows) == 3:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                plan(q, k_cache, v_cache)
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(18)
            print(text.getvalue(), flush=True)
        if (batch, ctx, hq, hkv, dim, model) in swept:
            for block_n, warps, stages, maxnreg in CONFIGS:
                cfg = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
                if maxnreg:
                    cfg["maxnreg"] = maxnreg
                for scale in SPLIT_SCALES:
                    splits = max(1, round(plan.num_splits * scale))
                    if scale != 1 and splits == plan.num_splits:
                        continue
                    try:
                        p = DecodePlan(q, k_cache, v_cache, seqlens, tables, max_seqlen=ctx, num_splits=splits,
                                       config=cfg)
                        ms = graph_ms(lambda: p(q, k_cache, v_cache))
                    except Exception as exc:
                        ms = None
                        print(f"    {cfg} splits {splits}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    rows.append(dict(base, method="sweep", ms=ms, num_splits=splits, config=cfg))
                    if ms:
                        print(f"    {cfg} splits {splits}: {ms * 1e3:.1f} us", flush=True)
        del k_cache, v_cache, k_rot, plan
        torch.cuda.empty_cache()
        path = write_results(args.out, "probe-decode", gpu, {"date": today(), "env": env, "results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
