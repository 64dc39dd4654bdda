"""Shared test machinery: the docs/DESIGN.md §6 rule and random inputs.

gold     = the reference one precision above the inputs (float64 for float32, float32 for float16/bfloat16)
baseline = the reference computed in the inputs' own dtype
rule     : for out, lse and every gradient, with u the unit roundoff of the inputs' dtype,
             rms(kernel - gold) <= 2 * rms(baseline - gold) + 2u * rms(gold)     (the docs/DESIGN.md rule, on RMS)
             max|kernel - gold| <= 4 * max|baseline - gold| + 2u * max|gold|   (no single element far off)
           The floors are one ulp at the tensor's scale: what a kernel's own final rounding costs where the
           baseline happens to round exactly. The 2x rule is taken on the RMS because on small tensors the max
           is one element, and two correct float32 summation orders differ there by 2-3x at random (seen: dv max
           5.3e-6 vs 2.2e-6 with mean errors 1.6e-7 vs 1.4e-7); the max keeps a 4x bound so that one wrong row
           still fails (tests/test_reference.py::test_rule_catches_one_wrong_row). Unwritten elements are caught
           separately: outputs are poisoned with NaN.
"""
from __future__ import annotations

import torch

from scaled_rope import RopeScaling, reference, scaled_rope_attention

UNIT_ROUNDOFF = {
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
    torch.float32: 2.0 ** -24,
    torch.float64: 2.0 ** -53,
}
GOLD_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64,
              torch.float64: torch.float64}


def errors(x: torch.Tensor, gold: torch.Tensor, name: str) -> tuple[float, float]:
    """(RMS, max) of |x - gold| over finite entries; infinities (empty rows' lse) must match exactly, NaN fails."""
    x, gold = x.double(), gold.double()
    assert not torch.isnan(x).any(), f"{name}: NaN in the result (unwritten or invalid elements)"
    inf = torch.isinf(gold)
    assert torch.equal(inf, torch.isinf(x)) and torch.equal(x[inf], gold[inf]), f"{name}: infinities differ"
    if (~inf).sum() == 0:
        return 0.0, 0.0
    diff = (x[~inf] - gold[~inf]).abs()
    return diff.pow(2).mean().sqrt().item(), diff.max().item()


def assert_close_to_gold(name: str, kernel: torch.Tensor, gold: torch.Tensor, baseline: torch.Tensor,
                         dtype: torch.dtype) -> None:
    assert kernel.shape == gold.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(gold.shape)}"
    rms_k, max_k = errors(kernel, gold, name)
    rms_b, max_b = errors(baseline, gold, f"{name} (baseline)")
    finite = gold[torch.isfinite(gold)].double()
    ulp = 2 * UNIT_ROUNDOFF[dtype]
    rms_floor = ulp * (finite.pow(2).mean().sqrt().item() if finite.numel() else 0.0)
    max_floor = ulp * (finite.abs().max().item() if finite.numel() else 0.0)
    assert rms_k <= 2 * rms_b + rms_floor, (
        f"{name}: err (rms) {rms_k:.3e} > 2 * baseline {rms_b:.3e} + floor {rms_floor:.3e} ({dtype})")
    assert max_k <= 4 * max_b + max_floor, (
        f"{name}: err (max) {max_k:.3e} > 4 * baseline {max_b:.3e} + floor {max_floor:.3e} ({dtype})")


SHORT = [1.0 + 0.05 * i for i in range(64)]  # LongRoPE factor sets for tests (up to 64 pairs)
LONG = [1.5 + 0.3 * i for i in range(64)]


def schedules(head_dim: int, rotary_dim: int | None = None, layout: str = "half") -> dict[str, RopeScaling]:
    """One RopeScaling of every kind, with lengths small enough that short tests cross the original length."""
    pairs = (rotary_dim or head_dim) // 2
    common = dict(rotary_dim=rotary_dim, layout=layout)
    return {
        "default": RopeScaling.default(head_dim, **common),
        "linear": RopeScaling.linear(head_dim, 4.0, **common),
        "ntk": RopeScaling.ntk(head_dim, 8.0, **common),
        "dynamic_ntk": RopeScaling.dynamic_ntk(head_dim, 2.0, 16, **common),
        "yarn": RopeScaling.yarn(head_dim, 16.0, 24, **common),
        "llama3": RopeScaling.llama3(head_dim, 8.0, 16, 1.0, 4.0, base=500000.0, **common),
        "longrope": RopeScaling.longrope(head_dim, 16, 256, SHORT[:pairs], LONG[:pairs], n_hat=4, **common),
        "factors": RopeScaling.from_factors(head_dim, LONG[:pairs], attention_factor=1.1, n_hat=3, **common),
        "power_basis": RopeScaling.power_basis(head_dim, 0.5, **common),
        "truncated_basis": RopeScaling.truncated_basis(head_dim, 200.0, **common),
    }


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


def reference_grads(q, k, v, rope, dout, dlse, compute_dtype, **options):
    """dq, dk, dv of the reference computed in compute_dtype (inputs cast to it), for (dout, dlse)."""
    q, k, v = (x.detach().to(compute_dtype).requires_grad_(True) for x in (q, k, v))
    out, lse = reference.attention(q, k, v, rope, compute_dtype=compute_dtype, **options)
    outputs, grads = [out], [dout.to(out.dtype)]
    if dlse is not None:
        outputs.append(lse)
        grads.append(dlse)
    torch.autograd.backward(outputs, grads)
    return q.grad, k.grad, v.grad
