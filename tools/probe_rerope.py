"""GPU probe of the Triton forward: plain causal vs ReRoPE vs Leaky ReRoPE, and head dim 64, in one call.

    python tools/probe_rerope.py                              # autotuned, every case
    python tools/probe_rerope.py --configs "128,64,8,3;64,64,4,3"   # also each forced forward config
    python tools/probe_rerope.py --quick                      # N4k cases only

Per case and variant it prints: end-to-end ms of `scaled_rope_attention(backend="triton")` (do_bench median,
bf16, causal, forward, no grad) and TFLOP/s; host ms per call (enqueue time of 20 calls without a sync: when it
is above the end-to-end time the measurement is bound by the host, not the GPU); GPU ms per call by kernel family
from the profiler (attention forward, rotation prepass, the rest); the chosen forward config and its compiled
registers / spills / shared memory. A development aid: bench/bench_attention.py is the benchmark of record.
"""
import argparse
import os
import sys
import time

import torch
import triton
import triton.testing

from scaled_rope import RopeScaling, scaled_rope_attention
from scaled_rope.triton_kernels import attention as tattn

WINDOW, LEAK = 512, 16.0


def cases(quick: bool):
    """(label, batch, heads, n, dim, variants)"""
    out = [("B1 H32 N4k D128", 1, 32, 4096, 128, ("plain", "rerope", "leaky", "rerope explicit-pos")),
           ("B4 H32 N4k D128", 4, 32, 4096, 128, ("plain",)),
           ("B8 H16 N4k D64", 8, 16, 4096, 64, ("plain", "rerope"))]
    if not quick:
        out.insert(1, ("B1 H32 N16k D128", 1, 32, 16384, 128, ("plain", "rerope", "leaky")))
    return out


def call(variant, q, k, v, rope, pos):
    kwargs = {}
    if variant != "plain":
        kwargs["rerope_window"] = WINDOW
    if variant == "leaky":
        kwargs["rerope_leak"] = LEAK
    if variant.endswith("explicit-pos"):  # runtime tile kinds, both q operands live (the BOTH path)
        kwargs.update(q_positions=pos, k_positions=pos)
    return lambda: scaled_rope_attention(q, k, v, rope, backend="triton", **kwargs)


def host_ms(fn, calls=20):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    return host


def gpu_ms_by_family(fn, calls=5):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    fam = {"attn_fwd": 0.0, "rotate": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if not t or ev.key.startswith("ProfilerStep") or "cudaDeviceSynchronize" in ev.key:
            continue
        if getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        name = "attn_fwd" if "_attn_fwd" in ev.key else "rotate" if "_rotate_kernel" in ev.key else "other"
        fam[name] += t / 1e3 / calls
    return fam


def compiled_info():
    """(BLOCK_M, BLOCK_N, warps, stages) -> 'regs R spills S smem K KB' for every compiled forward kernel."""
    info = {}
    try:
        for caches in tattn._attn_fwd.fn.device_caches.values():
            for kernel in caches[0].values():
                consts = getattr(kernel.src, "constants", {}) or {}
                named = {(k if isinstance(k, str) else tattn._attn_fwd.fn.arg_names[k[0]]): v
                         for k, v in consts.items()}
                md = kernel.metadata
                tag = (named.get("BLOCK_M"), named.get("BLOCK_N"), md.num_warps, md.num_stages,
                       named.get("REROPE"), named.get("HEAD_DIM"), named.get("EXPLICIT"))
                try:
                    info[tag] = f"regs {kernel.n_regs} spills {kernel.n_spills} smem {md.shared // 1024} KB"
                except AttributeError:  # never launched (handles are loaded on the first launch)
                    info[tag] = f"smem {md.shared // 1024} KB"
    except Exception as exc:  # metadata layout differs between triton versions: report, do not fail
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def run(label, batch, heads, n, dim, variants, forced):
    rope = RopeScaling.default(dim)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, n, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    pos = torch.arange(n, device="cuda", dtype=torch.int32).expand(batch, n)
    flops = 4 * batch * heads * n * n * dim / 2
    rows = []
    for variant in variants:
        fn = call(variant, q, k, v, rope, pos)
        try:
            with torch.no_grad():
                t0 = time.time()
                fn()
                torch.cuda.synchronize()
                first = time.time() - t0
                ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
                host = host_ms(fn)
                fam = gpu_ms_by_family(fn)
        except Exception as exc:  # a forced config that does not fit this variant: report and go on
            print(f"{label:18s} {forced or 'autotune':12s} {variant:22s} FAILED {type(exc).__name__}: "
                  f"{str(exc)[:200]}", flush=True)
            continue
        best = tattn._attn_fwd.best_config
        cfg = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages) if best else None
        rows.append((variant, ms, host, fam, cfg))
        print(f"{label:18s} {forced or 'autotune':12s} {variant:22s} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TF/s | "
              f"host {host:6.3f} ms | gpu fwd {fam['attn_fwd']:.3f} rot {fam['rotate']:.3f} other {fam['other']:.3f}"
              f" | cfg {cfg} | first call {first:.1f}s", flush=True)
    plain = [r for r in rows if r[0] == "plain"]
    if plain:
        for variant, ms, _, fam, _ in rows:
            if variant != "plain":
                print(f"{label:18s} {forced or 'autotune':12s} {variant} / plain: end-to-end "
                      f"{plain[0][1] / ms:.2f}, kernels {sum(plain[0][3].values()) / max(sum(fam.values()), 1e-9):.2f}"
                      f" (target >= 0.85)", flush=True)
    del q, k, v
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="", help='forced forward configs "BM,BN,warps,stages;..."')
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          "cuda", torch.version.cuda, flush=True)
    t0 = time.time()
    for forced in [None] + [c for c in args.configs.split(";") if c.strip()]:
        if forced:
            os.environ["SCALED_ROPE_FWD_CONFIG"] = forced.strip()
        else:
            os.environ.pop("SCALED_ROPE_FWD_CONFIG", None)
        tattn._attn_fwd.cache.clear()  # the autotuner's choice per key: re-decide under the forced config
        for label, batch, heads, n, dim, variants in cases(args.quick):
            try:
                run(label, batch, heads, n, dim, variants, forced)
            except Exception as exc:  # one failing case (a config that does not fit) must not end the probe
                print(f"{label} {forced}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                torch.cuda.empty_cache()
    print("compiled forward kernels (BLOCK_M, BLOCK_N, warps, stages, REROPE, HEAD_DIM, EXPLICIT):")
    for tag, text in sorted(compiled_info().items(), key=str):
        print(f"  {tag}: {text}")
    print(f"total {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
