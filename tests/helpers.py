"""Shared test machinery: the DESIGN.md section 5 rule and random inputs.

gold     = the reference one precision above the inputs (float64 for float32, float32 for float16/bfloat16)
baseline = the reference computed in the inputs' own dtype
rule     : err(kernel) <= 2 * err(baseline) + floor, err = max |x - gold|, floor = one ulp of the inputs' dtype
           at the scale of gold (2 * unit roundoff * max |gold|), for out, lse and every gradient. One ulp is what a
           kernel's own final rounding costs where the baseline happens to round exactly.
"""
from __future__ import annotations

import torch

from scaled_rope import reference, scaled_rope_attention

UNIT_ROUNDOFF = {
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
    torch.float32: 2.0 ** -24,
    torch.float64: 2.0 ** -53,
}
GOLD_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64,
              torch.float64: torch.float64}


def max_error(x: torch.Tensor, gold: torch.Tensor, name: str) -> float:
    """max |x - gold|; infinities (empty rows' lse) must match exactly, NaN always fails."""
    x, gold = x.double(), gold.double()
    assert not torch.isnan(x).any(), f"{name}: NaN in the result (unwritten or invalid elements)"
    inf = torch.isinf(gold)
    assert torch.equal(inf, torch.isinf(x)) and torch.equal(x[inf], gold[inf]), f"{name}: infinities differ"
    if (~inf).sum() == 0:
        return 0.0
    return (x[~inf] - gold[~inf]).abs().max().item()


def assert_close_to_gold(name: str, kernel: torch.Tensor, gold: torch.Tensor, baseline: torch.Tensor,
                         dtype: torch.dtype) -> None:
    assert kernel.shape == gold.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(gold.shape)}"
    err_kernel = max_error(kernel, gold, name)
    err_baseline = max_error(baseline, gold, f"{name} (baseline)")
    finite = gold[torch.isfinite(gold)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    floor = 2 * UNIT_ROUNDOFF[dtype] * max(scale, 1e-30)
    assert err_kernel <= 2 * err_baseline + floor, (
        f"{name}: err {err_kernel:.3e} > 2 * baseline {err_baseline:.3e} + floor {floor:.3e} ({dtype})")


def random_inputs(batch, nq, nk, hq, hkv, dim, dtype, device="cpu", seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return make(batch, nq, hq, dim), make(batch, nk, hkv, dim), make(batch, nk, hkv, dim)


def _reference_with_grads(q, k, v, rope, dout, compute_dtype, **kwargs):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out, lse = reference.attention(q, k, v, rope, compute_dtype=compute_dtype, **kwargs)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def compare_attention(q, k, v, rope, *, backend: str, grads: bool = True, seed: int = 0, **kwargs) -> None:
    """Run `scaled_rope_attention` with `backend` and check out, lse (and dq, dk, dv) against the reference."""
    dtype = q.dtype
    gold_dtype = GOLD_DTYPE[dtype]
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=generator).to(q.device)
    gold = _reference_with_grads(q.to(gold_dtype), k.to(gold_dtype), v.to(gold_dtype), rope, dout.to(gold_dtype),
                                 gold_dtype, **kwargs)
    base = _reference_with_grads(q, k, v, rope, dout.to(dtype), dtype, **kwargs)
    qk = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    out, lse = scaled_rope_attention(*qk, rope, return_lse=True, backend=backend, **kwargs)
    names = ["out", "lse"]
    results = [out.detach(), lse.detach()]
    if grads:
        out.backward(dout.to(dtype))
        names += ["dq", "dk", "dv"]
        results += [x.grad for x in qk]
    for i, name in enumerate(names):
        assert_close_to_gold(name, results[i], gold[i], base[i], dtype)
