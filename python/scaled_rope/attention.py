"""`scaled_rope_attention`: the public entry point of fused attention, and `explain_backend`."""
from __future__ import annotations

import torch

from . import _backends, _ops
from ._plan import attention_plan
from .scaling import RopeScaling


def explain_backend(q: torch.Tensor, rerope_window: int | None = None, needs_grad: bool = False, *,
                    xpos_scale_base: float | None = None,
                    explicit_positions: bool = False) -> tuple[str, dict[str, str]]:
    """The backend `backend="auto"` would use for inputs like q (needs_grad: a gradient will be taken; with
    xpos_scale_base, and q_positions or k_positions given when explicit_positions), and why each faster one was
    passed over. Every backend runs ReRoPE, so rerope_window does not change the choice."""
    xpos = None if xpos_scale_base is None else ("explicit" if explicit_positions else "default")
    choice = _backends.choose("attention", "auto", q.device, q.dtype, q.shape[-1], needs_grad, xpos)
    return choice.backend, dict(choice.passed_over)


def scaled_rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeScaling | None, *,
                          causal: bool = True, q_positions: torch.Tensor | None = None,
                          k_positions: torch.Tensor | None = None, window: int | None = None,
                          softmax_scale: float | None = None, rerope_window: int | None = None,
                          rerope_leak: float | None = None, logn_base: float | None = None,
                          xpos_scale_base: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Attention with scaled rotary embeddings applied inside the kernel.

    Shapes (flash-attn layout; any strides with a contiguous last dim)::

        q: (B, Nq, Hq, D)   k, v: (B, Nk, Hkv, D)   Hq a multiple of Hkv (GQA/MQA)
        out: (B, Nq, Hq, D)  lse: (B, Hq, Nq) float32 (with return_lse=True)

    q and k arrive unrotated; `rope` (a RopeScaling, or None for no rotation) rotates them on-chip. Positions
    default to k = 0..Nk-1 and q = Nk-Nq..Nk-1 (bottom-right aligned: the last query sees every key)::

        causal, Nq=2, Nk=5:   q0 (pos 3) sees k0..k3     q1 (pos 4) sees k0..k4

    Key Q is allowed for query P when P - Q >= 0 (causal) and P - Q < window (window set). With rerope_window w,
    pairs with P - Q >= w use the far rotation (q at w, k at 0; with rerope_leak kappa, q at
    P/kappa + w(1-1/kappa) and k at Q/kappa). logn_base scales logits by max(1, ln(P+1)/ln(logn_base)).
    xpos_scale_base B (xPos; >= 32, torchscale uses 512; causal only, no ReRoPE) weights the term of rotation pair
    i in the logit by zeta_i ** ((P - Q) / B), zeta_i = (2i + 0.4 R) / (1.4 R) with R the rotary dim: a decay that
    depends on the distance only, so no centre position enters and results do not change with how a sequence is
    split into calls (docs/DESIGN.md §3.9). Fused in the Triton backend (default positions) and the reference.
    LongRoPE's short/long set and the dynamic NTK base follow each row's length, its largest key position + 1
    (a row whose keys all sit at negative positions counts as length 0: the short set, the base schedule).
    Positions may be negative (int32 or int64, |p| < 2**30). Rows with no allowed key give 0 and lse = -inf.
    Differentiable in q, k, v through out and lse, with every backend.

    backend: "auto" (fastest that runs the inputs: cuda -> triton where the sm_90a kernels run them, i.e. head_dim
    96 or 128 on a Hopper GPU, with or without a gradient; triton -> cuda otherwise; then reference, which is where
    xPos with explicit positions runs), "cuda",
    "triton" or "reference"; `explain_backend` says which "auto" picks. An explicit backend that cannot run the
    inputs raises BackendUnsupported (a NotImplementedError and a ValueError) naming why.
    torch.compile(fullgraph=True) traces the call without a graph break (custom op scaled_rope::attention).
    """
    plan = attention_plan(q, k, v, rope, causal=causal, q_positions=q_positions, k_positions=k_positions,
                          window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                          rerope_leak=rerope_leak, logn_base=logn_base, backend=backend,
                          xpos_scale_base=xpos_scale_base)
    out, lse = _ops.attention(plan)
    return (out, lse) if return_lse else out
