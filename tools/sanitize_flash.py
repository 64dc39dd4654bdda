"""Small CUDA-attention cases for compute-sanitizer (memcheck, racecheck, synccheck, initcheck): the forward kernels
and, with gradients, the sm_90a backward.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tools/sanitize_flash.py
    compute-sanitizer --tool racecheck python tools/sanitize_flash.py

Every case also checks out and lse (and the gradient cases dq, dk, dv) against the float32 reference (loose bound:
this is a sanitizer run, the tests apply the real rule). Exits 1 on a mismatch. Without caching, memcheck sees every torch allocation exactly,
so a read past the end of q, k, v or the positions is reported.
"""
import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

from scaled_rope import RopeScaling, reference, scaled_rope_attention  # noqa: E402


def run(name, batch, nq, nk, hq, hkv, dim, dtype=torch.bfloat16, rope="default", explicit=False, **kw):
    g = torch.Generator().manual_seed(nq * 131 + nk)
    q = torch.randn(batch, nq, hq, dim, generator=g).to("cuda", dtype)
    k = torch.randn(batch, nk, hkv, dim, generator=g).to("cuda", dtype)
    v = torch.randn(batch, nk, hkv, dim, generator=g).to("cuda", dtype)
    rope = RopeScaling.default(dim) if rope == "default" else rope
    q_pos = k_pos = None
    if explicit:
        k_pos = torch.stack([torch.randperm(nk, generator=g) * 2 for _ in range(batch)]).cuda()
        q_pos = torch.randint(-5, 2 * nk, (batch, nq), generator=g).cuda()
    causal = kw.pop("causal", True)
    window, rerope_window = kw.pop("window", None), kw.pop("rerope_window", None)
    leak, logn = kw.pop("rerope_leak", None), kw.pop("logn_base", None)
    out, lse = scaled_rope_attention(q, k, v, rope, q_positions=q_pos, k_positions=k_pos, causal=causal,
                                     window=window, rerope_window=rerope_window, rerope_leak=leak, logn_base=logn,
                                     return_lse=True, backend="cuda")
    torch.cuda.synchronize()
    ref_out, ref_lse = reference.attention(q, k, v, rope, causal=causal, q_positions=q_pos, k_positions=k_pos,
                                           window=window, rerope_window=rerope_window, rerope_leak=leak,
                                           logn_base=logn)
    err_out = (out.float() - ref_out.float()).abs().max().item() if out.numel() else 0.0
    same_inf = torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    err_lse = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    ok = err_out < 0.05 and err_lse < 0.05 and same_inf and not torch.isnan(out).any()
    print(f"{'ok  ' if ok else 'FAIL'} {name}: out err {err_out:.2e}, lse err {err_lse:.2e}, infinities "
          f"{'match' if same_inf else 'differ'}", flush=True)
    return ok


def run_backward(name, batch, nq, nk, hq, hkv, dim, dtype=torch.bfloat16, **kw):
    """Forward and backward through backend="cuda" with default positions (the sm_90a backward on Hopper)."""
    g = torch.Generator().manual_seed(nq * 17 + nk)
    x = [torch.randn(batch, n, h, dim, generator=g).to("cuda", dtype).requires_grad_(True)
         for n, h in ((nq, hq), (nk, hkv), (nk, hkv))]
    dout = torch.randn(batch, nq, hq, dim, generator=g).to("cuda", dtype)
    rope = RopeScaling.yarn(dim, 4.0, 64)
    scaled_rope_attention(*x, rope, backend="cuda", **kw).backward(dout)
    torch.cuda.synchronize()
    ref = [t.detach().float().requires_grad_(True) for t in x]
    reference.attention(*ref, rope, compute_dtype=torch.float32, **kw)[0].backward(dout.float())
    errs = [((a.grad.float() - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-6)).item()
            for a, b in zip(x, ref)]
    ok = max(errs) < 0.05 and not any(torch.isnan(a.grad).any() for a in x)
    print(f"{'ok  ' if ok else 'FAIL'} backward {name}: relative errors dq {errs[0]:.1e}, dk {errs[1]:.1e}, "
          f"dv {errs[2]:.1e}", flush=True)
    return ok


LONGROPE = RopeScaling.longrope(128, 128, 4096, [1.0 + 0.05 * i for i in range(64)], [1.5 + 0.3 * i for i in range(64)])


def main():
    cases = [
        ("len1", 1, 1, 1, 1, 1, 64),
        ("len17 noncausal fp16", 1, 17, 17, 2, 1, 128, torch.float16, "default", False, dict(causal=False)),
        ("len97x130 gqa", 2, 97, 130, 4, 2, 64),
        ("nq>nk empty rows", 1, 100, 30, 1, 1, 128),
        ("window", 1, 150, 200, 2, 2, 64, torch.bfloat16, "default", False, dict(window=37)),
        ("rerope straddle", 1, 130, 200, 2, 1, 128, torch.bfloat16, "default", False, dict(rerope_window=70)),
        ("leaky + logn", 1, 70, 140, 2, 2, 64, torch.float16, "default", False,
         dict(rerope_window=50, rerope_leak=4.0, logn_base=16.0)),
        ("explicit positions", 2, 77, 150, 2, 1, 128, torch.bfloat16, LONGROPE, True, dict(window=90)),
        ("explicit rerope", 1, 40, 129, 1, 1, 64, torch.bfloat16, "default", True, dict(rerope_window=60)),
        ("no rope", 1, 65, 65, 1, 1, 64, torch.bfloat16, None),
        # head_dim 128 on Hopper: several laps of the sm_90a kernel's K/V stage ring, plain and ReRoPE
        ("ring laps", 1, 300, 900, 2, 1, 128),
        ("ring laps rerope", 1, 300, 900, 2, 1, 128, torch.float16, "default", True, dict(rerope_window=200)),
        # head_dim 96: 128-column tiles whose last 32 columns TMA fills with zeros (sm_90a only)
        ("d96 gqa window", 2, 97, 300, 4, 2, 96, torch.bfloat16, "default", False, dict(window=150)),
        ("d96 explicit rerope", 1, 130, 260, 2, 1, 96, torch.float16, "default", True, dict(rerope_window=70)),
    ]
    backward_cases = [
        ("d128 gqa partial tiles", 2, 97, 130, 4, 2, 128, torch.bfloat16, {}),
        ("d128 nq>nk empty rows", 1, 100, 30, 2, 1, 128, torch.float16, {}),
        ("d96 window logn", 1, 150, 300, 2, 2, 96, torch.bfloat16, dict(window=90, logn_base=16.0)),
        ("d96 noncausal", 1, 70, 200, 2, 1, 96, torch.float16, dict(causal=False)),
    ]
    ok = True
    for case in cases:
        name, batch, nq, nk, hq, hkv, dim, *rest = case
        dtype = rest[0] if len(rest) > 0 else torch.bfloat16
        rope = rest[1] if len(rest) > 1 else "default"
        explicit = rest[2] if len(rest) > 2 else False
        kw = dict(rest[3]) if len(rest) > 3 else {}
        ok &= run(name, batch, nq, nk, hq, hkv, dim, dtype, rope, explicit, **kw)
    for name, batch, nq, nk, hq, hkv, dim, dtype, kw in backward_cases:
        ok &= run_backward(name, batch, nq, nk, hq, hkv, dim, dtype, **kw)
    print("all ok" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
