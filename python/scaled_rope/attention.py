"""`scaled_rope_attention`: the public entry point, argument checks and backend choice."""
from __future__ import annotations

import math
import os
from functools import partial

import torch

from . import reference
from .scaling import RopeScaling

BACKENDS = ("auto", "cuda", "triton", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- validation ---------------------------------------------------------------------------------------------
def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_input(name: str, x) -> None:
    """A 4-d float tensor with a contiguous last dimension (q, k, v and the KV caches)."""
    _check_tensor(name, x, 4)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}")


def _check_positions(name: str, pos, batch: int, length: int, device: torch.device) -> None:
    if pos is None:
        return
    _check_tensor(name, pos, 2)
    if pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32 or int64 tensor, got {pos.dtype}")
    if tuple(pos.shape) != (batch, length):
        raise ValueError(f"{name} must have shape {(batch, length)}, got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but q is on {device}")


def _optional_positive_int(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def validate(q, k, v, rope, *, causal, q_positions, k_positions, window, softmax_scale, rerope_window,
             rerope_leak, logn_base, backend) -> None:
    """Raise TypeError/ValueError naming the argument for anything the contract does not define."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_input(name, x)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, nq, hq, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"k must be (B={batch}, Nk, Hkv, D={dim}), got {tuple(k.shape)}")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[2]})")
    _check_rope(rope, dim)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_positions("q_positions", q_positions, batch, nq, q.device)
    _check_positions("k_positions", k_positions, batch, k.shape[1], q.device)
    validate_options(rope, window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                     rerope_leak=rerope_leak, logn_base=logn_base, backend=backend, backends=BACKENDS)


def _check_rope(rope, dim: int) -> None:
    if rope is None:
        return
    if not isinstance(rope, RopeScaling):
        raise TypeError(f"rope must be a RopeScaling or None, got {type(rope).__name__}")
    if rope.head_dim != dim:
        raise ValueError(f"rope.head_dim ({rope.head_dim}) does not match the head dim of q ({dim})")


def validate_options(rope, *, window, softmax_scale, rerope_window, rerope_leak, logn_base, backend,
                     backends) -> None:
    """Checks shared by every entry point for the scalar options of DESIGN.md section 3."""
    _optional_positive_int("window", window)
    _optional_positive_int("rerope_window", rerope_window)
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if rerope_leak is not None:
        if rerope_window is None:
            raise ValueError("rerope_leak needs rerope_window")
        if not (isinstance(rerope_leak, (int, float)) and math.isfinite(rerope_leak) and rerope_leak >= 1):
            raise ValueError(f"rerope_leak must be a finite number >= 1 or None, got {rerope_leak!r}")
    if rerope_window is not None:
        if rope is None:
            raise ValueError("rerope_window needs a rope (rope=None means no rotation at all)")
        if rope.n_hat:
            raise ValueError("rerope_window cannot be combined with n_hat > 0 (rope.n_hat)")
    if logn_base is not None and not (isinstance(logn_base, (int, float)) and math.isfinite(logn_base)
                                      and logn_base > 1):
        raise ValueError(f"logn_base must be a finite number > 1 or None, got {logn_base!r}")
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")


# ---- backend choice -----------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_reason(q: torch.Tensor) -> str | None:
    """None when the Triton backend can run these inputs, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if q.dtype == torch.float64:
        return "the Triton kernels take float16, bfloat16 or float32, not float64"
    if q.is_cuda:
        return None
    if q.device.type == "cpu" and _interpreting():
        if q.dtype == torch.bfloat16:
            return "the Triton interpreter computes bfloat16 wrongly; use float16 or float32 on CPU"
        return None
    return f"the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {q.device}"


def _cuda_reason(q: torch.Tensor, rerope_window) -> str | None:
    from . import _cuda

    if not q.is_cuda:
        return f"the CUDA backend needs CUDA tensors, got {q.device}"
    support = getattr(_cuda, "attention_support", None)
    if support is None:
        return "the CUDA attention kernel is not built into this package yet"
    return support(q, rerope_window)


def _auto_order(q: torch.Tensor, needs_grad: bool) -> tuple[str, str]:
    """Fastest first, by measurement (bench/results/attention-2026-11-22-*-{longrope,leaky-rerope}.json, H100, bf16
    causal forward): where the sm_90a CUDA kernel runs the inputs its forward beats Triton's at every measured shape
    (LongRoPE B1 H32 N16k D128: 550 vs 493 TFLOP/s, B4 N4k 1.34 vs 1.40 ms; ReRoPE N4k-128k 0.93-0.97x of its time).
    Triton goes first elsewhere (head_dim 64 runs the sm_80 kernel: 210 vs 338 TFLOP/s at B8 H16 N4k) and when a
    gradient is needed (the CUDA backend's backward is Triton's; that pairing has not been benchmarked)."""
    from ._cuda import sm90_kernel_applies

    if not needs_grad and q.is_cuda and sm90_kernel_applies(q):
        return ("cuda", "triton")
    return ("triton", "cuda")


def explain_backend(q: torch.Tensor, rerope_window: int | None = None,
                    needs_grad: bool = False) -> tuple[str, dict[str, str]]:
    """The backend `backend="auto"` would use for these inputs (needs_grad: a gradient will be taken), and why each
    faster one was passed over."""
    reasons: dict[str, str] = {}
    for name in _auto_order(q, needs_grad):
        reason = _cuda_reason(q, rerope_window) if name == "cuda" else _triton_reason(q)
        if reason is None:
            return name, reasons
        reasons[name] = reason
    return "reference", reasons


class BackendUnsupported(NotImplementedError, ValueError):
    """An explicitly requested backend cannot run these inputs (catchable as either exception type)."""


def _resolve(backend: str, q: torch.Tensor, rerope_window, needs_grad: bool) -> str:
    if backend == "auto":
        return explain_backend(q, rerope_window, needs_grad)[0]
    if backend == "reference":
        return backend
    reason = _cuda_reason(q, rerope_window) if backend == "cuda" else _triton_reason(q)
    if reason is not None:
        raise BackendUnsupported(f"backend={backend!r} cannot run these inputs: {reason}")
    return backend


_KERNEL_TABLES: dict = {}


def kernel_tables(rope, q, k, *, q_positions, k_positions, rerope_window, rerope_leak):
    """Rotation tables for q and k (and the far pair for ReRoPE), each row at its own length. With default
    positions they depend on the arguments alone and are built once (a few dozen small launches saved per
    call); they are shared between calls and read-only."""
    if rope is None:
        return None, None, None, None
    if k_positions is not None:
        return _kernel_tables(rope, q, k, k_positions, rerope_window, rerope_leak)
    key = (rope, q.shape[0], str(q.device), k.shape[1], rerope_window, rerope_leak)
    found = _KERNEL_TABLES.get(key)
    if found is None:
        found = _kernel_tables(rope, q, k, None, rerope_window, rerope_leak)
        # nothing is kept from a CUDA-graph capture (it records the kernels that fill a tensor without running them)
        if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
            if len(_KERNEL_TABLES) >= 256:
                _KERNEL_TABLES.clear()
            _KERNEL_TABLES[key] = found
    return found


def _kernel_tables(rope, q, k, k_positions, rerope_window, rerope_leak):
    from .tables import build_tables, cached_tables

    batch = q.shape[0]
    if k_positions is None:  # every row has length Nk
        make = partial(build_tables, rope, batch, q.device, seq_lens=k.shape[1])
    else:  # a row's length is its largest key position + 1; only length-dependent schedules need it
        seq_lens = k_positions.max(dim=1).values + 1 if rope.length_dependent and k.shape[1] else None
        make = partial(cached_tables, rope, batch, q.device, seq_lens=seq_lens)
    q_tables = make()
    q_far = k_far = None
    if rerope_window is not None:
        q_far = make(far="q", rerope_window=rerope_window, rerope_leak=rerope_leak)
        k_far = make(far="k", rerope_window=rerope_window, rerope_leak=rerope_leak)
    return q_tables, q_tables, q_far, k_far


# ---- public API ---------------------------------------------------------------------------------------------
def scaled_rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeScaling | None, *,
                          causal: bool = True, q_positions: torch.Tensor | None = None,
                          k_positions: torch.Tensor | None = None, window: int | None = None,
                          softmax_scale: float | None = None, rerope_window: int | None = None,
                          rerope_leak: float | None = None, logn_base: float | None = None,
                          return_lse: bool = False, backend: str = "auto"):
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
    LongRoPE's short/long set and the dynamic NTK base follow each row's length (largest k position + 1).
    Rows with no allowed key give 0 and lse = -inf. backend: "auto" (fastest that runs the inputs: cuda -> triton
    for a forward without gradient that the sm_90a kernel runs, i.e. head_dim 128 on a Hopper GPU; triton -> cuda
    otherwise; then reference), "cuda", "triton" or "reference"; `explain_backend` says which "auto" picks.
    """
    validate(q, k, v, rope, causal=causal, q_positions=q_positions, k_positions=k_positions, window=window,
             softmax_scale=softmax_scale, rerope_window=rerope_window, rerope_leak=rerope_leak,
             logn_base=logn_base, backend=backend)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chosen = _resolve(backend, q, rerope_window, needs_grad)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    options = dict(causal=causal, window=window, softmax_scale=float(softmax_scale), rerope_window=rerope_window,
                   logn_base=logn_base)
    if chosen == "reference":
        out, lse = reference.attention(q, k, v, rope, q_positions=q_positions, k_positions=k_positions,
                                       rerope_leak=rerope_leak, **options)
    else:
        q_tables, k_tables, q_far, k_far = kernel_tables(rope, q, k, q_positions=q_positions,
                                                         k_positions=k_positions, rerope_window=rerope_window,
                                                         rerope_leak=rerope_leak)
        tables = dict(q_tables=q_tables, k_tables=k_tables, q_far_tables=q_far, k_far_tables=k_far,
                      q_positions=q_positions, k_positions=k_positions)
        # plain ReRoPE's far k rotates by angle 0: the kernels read k itself as the far k
        k_far_unrotated = rerope_window is not None and rerope_leak is None
        if chosen == "triton":
            from .triton_kernels.attention import triton_attention

            out, lse = triton_attention(q, k, v, **tables, **options, k_far_unrotated=k_far_unrotated)
        else:
            from ._cuda import cuda_attention

            out, lse = cuda_attention(q, k, v, **tables, **options, k_far_unrotated=k_far_unrotated)
    return (out, lse) if return_lse else out
