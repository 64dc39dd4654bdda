"""Quick forward timing of the CUDA attention next to the Triton backend and SDPA (no rope), one GPU.

    python tools/time_flash.py [--n 16384] [--heads 32] [--dim 128]

Prints TFLOP/s (4*B*H*N*N*D, half for causal; rope not counted) from triton.testing.do_bench medians for
LongRoPE and ReRoPE (w = 512) causal bf16, end to end (tables, rotation prepass, kernel), and the share of the
CUDA time spent in the rotation prepass. On compute capability 9.x the `cuda` rows are the sm_90a kernel (head_dim
128) and `cuda-sm80` the sm_80 kernel on the same device (SCALED_ROPE_FLASH_SM80=1). Not the project benchmark
(bench/), a probe for kernel work. Ends with our CUDA LongRoPE forward and SDPA without rope (default backend,
cuDNN, flash) timed in interleaved rounds.
"""
import argparse
import os

import torch
import triton

from scaled_rope import RopeScaling, scaled_rope_attention
from scaled_rope._cuda import cuda_rotate
from scaled_rope.attention import kernel_tables


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--interleaved-only", action="store_true", help="only the interleaved rounds against SDPA")
    parser.add_argument("--rep", type=float, default=100.0, help="do_bench milliseconds per timing (interleaved)")
    args = parser.parse_args()
    b, n, h, d = args.batch, args.n, args.heads, args.dim
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * n * n * d / 2
    longrope = RopeScaling.longrope(d, 4096, 131072, [1.0 + 0.01 * i for i in range(d // 2)],
                                    [1.5 + 0.1 * i for i in range(d // 2)])
    cases = {"longrope": (longrope, {}), "rerope": (RopeScaling.default(d), dict(rerope_window=512))}
    # (label, backend, environment): switches read on every call
    variants = [("cuda", "cuda", {}), ("triton", "triton", {})]
    if torch.cuda.get_device_capability()[0] == 9:
        variants[1:1] = [("cuda-sm80", "cuda", {"SCALED_ROPE_FLASH_SM80": "1"})]
    rows = []
    if args.interleaved_only:
        cases = {}
    for name, (rope, extra) in cases.items():
        reference_out = None
        for label, backend, switches in variants:
            os.environ.update(switches)
            try:
                out = scaled_rope_attention(q, k, v, rope, causal=True, backend=backend, **extra)
                if reference_out is None:
                    reference_out = scaled_rope_attention(q, k, v, rope, causal=True, backend="triton", **extra)
                diff = (out.float() - reference_out.float()).abs().max().item()
                print(f"{name:9s} {label:22s} max |out - triton out| = {diff:.3e}", flush=True)
                ms = triton.testing.do_bench(
                    lambda: scaled_rope_attention(q, k, v, rope, causal=True, backend=backend, **extra))
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{name} {label}: {type(exc).__name__}: {exc}", flush=True)
                continue
            finally:
                for switch in switches:
                    os.environ.pop(switch, None)
            rows.append((name, label, ms, flops / ms * 1e-9))
            print(f"{name:9s} {label:22s} {ms:8.3f} ms {flops / ms * 1e-9:7.1f} TFLOP/s", flush=True)
        tables = kernel_tables(rope, q, k, q_positions=None, k_positions=None,
                               rerope_window=extra.get("rerope_window"), rerope_leak=None)
        pos = torch.arange(n, device="cuda", dtype=torch.int32).expand(b, n)
        jobs = [(q, tables[0]), (k, tables[1])] + ([(q, tables[2]), (k, tables[3])] if extra else [])
        ms_rot = triton.testing.do_bench(lambda: [cuda_rotate(x, pos, t, out=torch.empty_like(x)) for x, t in jobs])
        print(f"{name:9s} rotation prepass alone {ms_rot:.3f} ms", flush=True)
    print("\n| case | backend | ms | TFLOP/s |\n|---|---|---|---|")
    for name, backend, ms_, tf in rows:
        print(f"| {name} | {backend} | {ms_:.3f} | {tf:.1f} |")
    interleaved(q, k, v, longrope, flops, args.rep)


def interleaved(q, k, v, rope, flops, rep, rounds=3):
    """Our CUDA LongRoPE and ReRoPE (w = 512) forwards against SDPA without rope (its default backend, and cuDNN and
    flash chosen explicitly), in interleaved rounds so that no row gains from its place in the order; `rep`
    milliseconds of repeats per timing (long ones time the GPU in its steady clock state)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run():
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return run

    default = RopeScaling.default(q.shape[-1])
    contenders = [("ours (cuda) longrope", lambda: scaled_rope_attention(q, k, v, rope, causal=True, backend="cuda")),
                  ("ours (cuda) rerope", lambda: scaled_rope_attention(q, k, v, default, causal=True, backend="cuda",
                                                                       rerope_window=512)),
                  ("SDPA default, no rope", sdpa(None)), ("SDPA cuDNN, no rope", sdpa(SDPBackend.CUDNN_ATTENTION)),
                  ("SDPA flash, no rope", sdpa(SDPBackend.FLASH_ATTENTION))]
    times = {label: [] for label, _ in contenders}
    for r in range(rounds):
        for label, fn in contenders:
            ms = triton.testing.do_bench(fn, rep=rep, return_mode="median")
            times[label].append(ms)
            print(f"round {r}: {label:24s} {ms:8.3f} ms {flops / ms * 1e-9:7.1f} TFLOP/s", flush=True)
    print("\n| contender (interleaved) | median ms | TFLOP/s |\n|---|---|---|")
    for label, values in times.items():
        ms = sorted(values)[len(values) // 2]
        print(f"| {label} | {ms:.3f} | {flops / ms * 1e-9:.1f} |")


if __name__ == "__main__":
    main()
