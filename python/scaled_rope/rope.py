"""`apply_scaled_rope`: the standalone rotation (unfused building block) with reference, Triton and CUDA backends."""
from __future__ import annotations

import torch

from . import reference
from .attention import _check_positions, _check_tensor, _interpreting
from .scaling import RopeScaling
from .tables import build_tables


def _rotate_kernel(backend: str, x, positions, tables, inverse: bool):
    if backend == "triton":
        from .triton_kernels.rope import rotate
    else:
        from ._cuda import cuda_rotate as rotate
    return rotate(x, positions, tables, inverse=inverse)


class _KernelRotation(torch.autograd.Function):
    """Rotation whose gradient is the transposed rotation (same angles, opposite sign of sin)."""

    @staticmethod
    def forward(ctx, x, positions, tables, backend, inverse):
        ctx.save_for_backward(positions)
        ctx.tables, ctx.backend, ctx.inverse = tables, backend, inverse
        return _rotate_kernel(backend, x, positions, tables, inverse)

    @staticmethod
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        return (_rotate_kernel(ctx.backend, grad.contiguous(), positions, ctx.tables, not ctx.inverse),
                None, None, None, None)


def _choose(backend: str, x: torch.Tensor) -> str:
    from ._cuda import load_extension

    can_cuda = x.is_cuda and x.dtype != torch.float64 and load_extension()[0] is not None
    can_triton = x.dtype != torch.float64 and (x.is_cuda or (_interpreting() and x.dtype != torch.bfloat16))
    if can_triton:
        try:
            import triton  # noqa: F401
        except ImportError:
            can_triton = False
    if backend == "auto":
        return "cuda" if can_cuda else "triton" if can_triton else "reference"
    if backend == "cuda" and not can_cuda:
        raise ValueError("backend='cuda' cannot run these inputs: it needs CUDA tensors of float16/bfloat16/"
                         f"float32 and the compiled extension (x is {x.dtype} on {x.device}; "
                         f"extension: {load_extension()[1] or 'loaded'})")
    if backend == "triton" and not can_triton:
        raise ValueError("backend='triton' cannot run these inputs: it needs triton and CUDA tensors of "
                         f"float16/bfloat16/float32 (or TRITON_INTERPRET=1 on CPU), got {x.dtype} on {x.device}")
    if backend not in ("cuda", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'cuda', 'triton' or 'reference', got {backend!r}")
    return backend


def apply_scaled_rope(x: torch.Tensor, rope: RopeScaling, positions: torch.Tensor | None = None, *,
                      seq_lens: torch.Tensor | int | None = None, inverse: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """Rotate x (B, N, H, D) by `rope` at integer positions (B, N) (default 0..N-1); returns x's dtype.

    seq_lens (int or (B,) tensor) picks each row's frequency set for LongRoPE and dynamic NTK (default: the
    schedule's default set). inverse=True applies the transpose (the gradient map). Differentiable.
    """
    _check_tensor("x", x, 4)
    if not isinstance(rope, RopeScaling):
        raise TypeError(f"rope must be a RopeScaling, got {type(rope).__name__}")
    if rope.head_dim != x.shape[-1]:
        raise ValueError(f"rope.head_dim ({rope.head_dim}) does not match the last dim of x ({x.shape[-1]})")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dimension, got strides {x.stride()}")
    batch, n = x.shape[:2]
    _check_positions("positions", positions, batch, n, x.device)
    chosen = _choose(backend, x)
    if chosen == "reference":
        lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else (
            None if seq_lens is None else [seq_lens] * batch)
        return reference.apply_scaled_rope(x, rope, positions, seq_lens=lens, inverse=inverse)
    if positions is None:
        positions = torch.arange(n, device=x.device, dtype=torch.int32).expand(batch, n)
    tables = build_tables(rope, batch, x.device, seq_lens=seq_lens)
    return _KernelRotation.apply(x, positions, tables, chosen, inverse)
