"""Lazy access to the compiled extension scaled_rope._C and the tensor-checking wrappers around it.

Nothing here runs at import: `load_extension()` imports _C on first use and remembers the outcome, so importing
scaled_rope works without _C (CPU-only installs, SCALED_ROPE_SKIP_CUDA=1) and without a GPU.
"""
from __future__ import annotations

import torch

from ._rotation_args import check_rotation_args

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_extension: tuple[object | None, str | None] | None = None


def load_extension():
    """(module, None) when scaled_rope._C imports, else (None, why not)."""
    global _extension
    if _extension is None:
        try:
            from . import _C
            _extension = (_C, None)
        except ImportError as exc:
            _extension = (None, f"scaled_rope._C is not available ({exc}); reinstall with nvcc on PATH to build it")
    return _extension


def _require_extension():
    module, why = load_extension()
    if module is None:
        raise RuntimeError(why)
    return module


def cuda_rotate(x: torch.Tensor, positions: torch.Tensor, tables, inverse: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x (B, N, H, D) on the GPU with the CUDA kernel; same contract as triton_kernels.rope.rotate."""
    ext = _require_extension()
    if isinstance(x, torch.Tensor) and not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor for the CUDA rotation, got device {x.device}")
    a = check_rotation_args(x, positions, tables, out)
    if x.numel() == 0:
        return a.out
    o = a.out
    batch, seqlen, heads, head_dim = x.shape
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    ext.rotate(
        x=x.data_ptr(), out=o.data_ptr(), positions=a.positions.data_ptr(), turns=a.turns.data_ptr(),
        offset=ptr(a.offset), turns_unscaled=ptr(a.turns_unscaled), factor=a.factor.data_ptr(),
        batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim, rotary_dim=a.rotary_dim, n_hat=a.n_hat,
        interleaved=a.interleaved, inverse=bool(inverse), dtype=_DTYPE_CODES[x.dtype],
        positions_int32=a.positions.dtype == torch.int32,
        stride_xb=x.stride(0), stride_xn=x.stride(1), stride_xh=x.stride(2),
        stride_ob=o.stride(0), stride_on=o.stride(1), stride_oh=o.stride(2),
        stride_pb=a.stride_pb, stride_pn=a.positions.stride(1),
        stride_tb=a.stride_tb, stride_offb=a.stride_offb, stride_fb=a.stride_fb,
        device=x.device.index if x.device.index is not None else torch.cuda.current_device(),
        stream=torch.cuda.current_stream(x.device).cuda_stream,
    )
    return o
