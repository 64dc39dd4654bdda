"""Smoke check of the CUDA backward (csrc/flash_bwd_sm90.cu) on a Hopper GPU, then its time against the Triton
backward.

    python tools/check_flash_bwd.py [--n 16384] [--heads 32] [--kv-heads 32] [--no-timing]

Each case runs the CUDA forward (out, lse), then the CUDA backward with a random dlse, and prints the max |error| of
dq, dk, dv against the float32 reference next to the baseline's (the reference in the inputs' dtype) and the max
|difference| from the Triton backend's gradients (its own forward and backward through autograd, same dout and
dlse); a case is ok when the docs/DESIGN.md §6.1 rule (tests/helpers.py) holds. The last line of that part is "all ok" or
"MISMATCH". Timing: triton.testing.do_bench medians at B1, causal, bf16, head_dim 128, LongRoPE: ours end to end
(rotations, kernel, inverse rotations), our kernel alone (on unrotated q and k: same work), and the Triton backward
(autograd backward of the Triton backend's forward, rotations included); TFLOP/s count the backward as 2.5x the
causal forward's 4 B H N^2 D / 2.
"""
import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import GOLD_DTYPE, assert_close_to_gold, random_inputs, reference_grads  # noqa: E402

from scaled_rope import RopeScaling, scaled_rope_attention  # noqa: E402
from scaled_rope._cuda_backward import cuda_attention_backward, cuda_backward_support, cuda_flash_backward  # noqa: E402
from scaled_rope.tables import build_tables  # noqa: E402


def longrope(original=4096):
    return RopeScaling.longrope(128, original, 131072, [1.0 + 0.05 * i for i in range(64)],
                                [1.5 + 0.3 * i for i in range(64)], n_hat=4)


# label, batch, nq, nk, hq, hkv, dtype, rope, options
CASES = [
    ("causal GQA 4/2, partial tiles", 2, 257, 257, 4, 2, torch.bfloat16, longrope(), dict(causal=True)),
    ("non-causal window 300, Nq < Nk", 1, 97, 1025, 2, 2, torch.float16, RopeScaling.yarn(128, 8.0, 256),
     dict(causal=False, window=300)),
    ("causal log-n, Nq > Nk (empty rows)", 1, 1025, 700, 8, 2, torch.bfloat16, longrope(512),
     dict(causal=True, logn_base=512.0)),
    ("causal 2k MQA 4/1, no rope", 1, 2048, 2048, 4, 1, torch.bfloat16, None, dict(causal=True)),
    ("negative scale, one row", 1, 1, 300, 2, 1, torch.float16, longrope(), dict(causal=True, softmax_scale=-0.1)),
]


def backward_args(q, k, rope, options):
    """cuda_attention_backward's keyword arguments; default positions: q and k share tables of length Nk."""
    tables = None if rope is None else build_tables(rope, q.shape[0], q.device, seq_lens=k.shape[1])
    return dict(q_tables=tables, k_tables=tables, causal=options.get("causal", True), window=options.get("window"),
                logn_base=options.get("logn_base"), softmax_scale=options.get("softmax_scale", q.shape[-1] ** -0.5))


def triton_graph(q, k, v, rope, options):
    """(inputs with grad, out, lse) of the Triton backend's forward, for its backward through autograd."""
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    out, lse = scaled_rope_attention(qg, kg, vg, rope, return_lse=True, backend="triton", **options)
    return (qg, kg, vg), out, lse


def run_case(label, batch, nq, nk, hq, hkv, dtype, rope, options, seed):
    q, k, v = random_inputs(batch, nq, nk, hq, hkv, 128, dtype, device="cuda", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g).to("cuda", dtype)
    dlse = torch.randn(batch, hq, nq, generator=g).to("cuda")
    with torch.no_grad():
        out, lse = scaled_rope_attention(q, k, v, rope, return_lse=True, backend="cuda", **options)
    args = backward_args(q, k, rope, options)
    mine = cuda_attention_backward(q, k, v, out, lse, dout, dlse, **args)
    inputs, t_out, t_lse = triton_graph(q, k, v, rope, options)
    triton_grads = torch.autograd.grad((t_out, t_lse), inputs, (dout, dlse))
    gold = reference_grads(q, k, v, rope, dout, dlse, GOLD_DTYPE[dtype], **options)
    # the 16-bit reference softmaxes rows with no allowed key to NaN; their true gradient is 0
    base = [torch.nan_to_num(g, nan=0.0) for g in reference_grads(q, k, v, rope, dout, dlse, dtype, **options)]
    torch.cuda.synchronize()
    ok = True
    print(f"{label}: B{batch} Nq{nq} Nk{nk} H{hq}/{hkv} {str(dtype).removeprefix('torch.')}")
    for name, x, gx, bx, tx in zip(("dq", "dk", "dv"), mine, gold, base, triton_grads):
        err = (x.double() - gx.double()).abs().max().item()
        err_base = (bx.double() - gx.double()).abs().max().item()
        diff_triton = (x.double() - tx.double()).abs().max().item()
        try:
            assert_close_to_gold(name, x, gx, bx, dtype)
            verdict = "ok"
        except AssertionError as exc:
            verdict, ok = f"FAIL ({exc})", False
        print(f"  {name}: max err {err:.3e} (baseline {err_base:.3e}), max |ours - triton| {diff_triton:.3e}  "
              f"{verdict}")
    return ok


def timing(n, heads, kv_heads):
    b, d = 1, 128
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, n, heads, d, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(b, n, kv_heads, d, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    dout = torch.randn(b, n, heads, d, generator=g).to("cuda", torch.bfloat16)
    rope = longrope()
    options = dict(causal=True)
    with torch.no_grad():
        out, lse = scaled_rope_attention(q, k, v, rope, return_lse=True, backend="cuda", **options)
    args = backward_args(q, k, rope, options)
    flops = 2.5 * 4 * b * heads * n * n * d / 2
    runs = {
        "cuda backward (end to end)": lambda: cuda_attention_backward(q, k, v, out, lse, dout, None, **args),
        "cuda backward kernel only": lambda: cuda_flash_backward(
            q, k, v, out, lse, dout, None, causal=True, window=None, softmax_scale=args["softmax_scale"],
            logn_base=None),
    }
    inputs, t_out, _ = triton_graph(q, k, v, rope, options)
    runs["triton backward (autograd)"] = lambda: torch.autograd.grad(t_out, inputs, dout, retain_graph=True)
    print(f"\ntiming: B{b} N{n} H{heads}/{kv_heads} D{d} causal bf16, LongRoPE (do_bench median)")
    for label, fn in runs.items():
        ms = triton.testing.do_bench(fn, return_mode="median")
        print(f"  {label:30s} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    reason = cuda_backward_support(torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16))
    if reason is not None:
        print(f"the CUDA backward cannot run here: {reason}")
        sys.exit(1)
    results = [run_case(*case, seed=i) for i, case in enumerate(CASES)]
    print("all ok" if all(results) else "MISMATCH", flush=True)
    if not args.no_timing:
        timing(args.n, args.heads, args.kv_heads)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
