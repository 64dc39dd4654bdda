"""The CUDA launcher: lazy access to the compiled extension scaled_rope._C and the calls into it.

Nothing here runs at import: `load_extension()` imports _C on first use and remembers the outcome, so importing
scaled_rope works without _C (CPU-only installs, SCALED_ROPE_SKIP_CUDA=1) and without a GPU. The launchers take
tensors already checked by the plan (scaled_rope._plan) and turn them into the pointers, sizes and strides of the
binding (csrc/binding.cpp); of the package they import only the leaf modules _env and _alloc.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from . import _alloc, _env

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


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _row_stride(t: torch.Tensor) -> int:
    """Stride between batch rows of a (B or 1, ...) operand: 0 when one row serves every batch row."""
    return t.stride(0) if t.shape[0] > 1 else 0


# ---- rotation (csrc/rope.cu) ----------------------------------------------------------------------------------
def rotation_support(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the CUDA rotation can run tensors of this device and dtype, else why not."""
    if device.type != "cuda":
        return f"the CUDA rotation needs CUDA tensors, got {device}"
    if dtype not in _DTYPE_CODES:
        return f"the CUDA rotation takes float16, bfloat16 or float32, not {dtype}"
    return load_extension()[1]


def cuda_rotate(x: torch.Tensor, positions: torch.Tensor, tables, inverse: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x (B, N, H, D) on the GPU with the CUDA kernel; same contract as triton_kernels.rope.rotate (x a CUDA
    tensor of float16/bfloat16/float32 with a contiguous last dim, positions int32/int64 (B or 1, N), table rows B
    or 1 with contiguous last dims, attention factors float32; `out` may be x)."""
    ext = _require_extension()
    if not x.is_cuda:  # the kernel would read host memory
        raise ValueError(f"x must be a CUDA tensor for the CUDA rotation, got device {x.device}")
    o = _alloc.empty(x.shape, x.dtype, x.device) if out is None else out
    if x.numel() == 0:
        return o
    batch, seqlen, heads, head_dim = x.shape
    ext.rotate(
        x=x.data_ptr(), out=o.data_ptr(), positions=positions.data_ptr(), turns=tables.turns.data_ptr(),
        offset=_ptr(tables.offset), turns_unscaled=_ptr(tables.turns_unscaled if tables.n_hat > 0 else None),
        factor=tables.attention_factor.data_ptr(),
        batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim, rotary_dim=int(tables.rotary_dim),
        n_hat=int(tables.n_hat), interleaved=bool(tables.interleaved), inverse=bool(inverse),
        dtype=_DTYPE_CODES[x.dtype], positions_int32=positions.dtype == torch.int32,
        stride_xb=x.stride(0), stride_xn=x.stride(1), stride_xh=x.stride(2),
        stride_ob=o.stride(0), stride_on=o.stride(1), stride_oh=o.stride(2),
        stride_pb=_row_stride(positions), stride_pn=positions.stride(1),
        stride_tb=_row_stride(tables.turns), stride_offb=0 if tables.offset is None else _row_stride(tables.offset),
        stride_fb=_row_stride(tables.attention_factor),
        device=_device_index(x.device), stream=torch.cuda.current_stream(x.device).cuda_stream,
    )
    return o


def rope_on_chip(tables, head_dim: int, sign: float = 1.0) -> bool:
    """Whether the sm_90a attention kernels rotate with these tables on-chip (csrc/rope_device.cuh,
    rope_on_chip_layout): rotary_dim a multiple of 8 interleaved, or 64, 96 or 128 in the half layout, at most
    head_dim; softmax_scale's sign +1 or -1 (0, a vanishing scale, zeroes q: the pass does it);
    SCALED_ROPE_ROTATION_PASSES unset."""
    if tables is None or sign not in (1.0, -1.0) or _env.rotation_passes():
        return False
    rotary_dim = int(tables.rotary_dim)
    if not 0 < rotary_dim <= head_dim:
        return False
    return rotary_dim % 8 == 0 if tables.interleaved else rotary_dim in (64, 96, 128)


def rope_kwargs(tables, sign: float) -> dict:
    """The binding's `rope` (10 integers: csrc/binding.cpp, rope_tables) for on-chip rotation with `tables`, and
    q_sign."""
    offset = tables.offset
    rope = [tables.turns.data_ptr(), _ptr(offset), _ptr(tables.turns_unscaled if tables.n_hat > 0 else None),
            tables.attention_factor.data_ptr(), int(tables.rotary_dim), int(tables.n_hat), int(bool(tables.interleaved)),
            _row_stride(tables.turns), 0 if offset is None else _row_stride(offset),
            _row_stride(tables.attention_factor)]
    return dict(rope=rope, q_sign=float(sign))


# ---- attention (csrc/flash_fwd.cu) ----------------------------------------------------------------------------
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
ATTENTION_HEAD_DIMS = (64, 96, 128)
SM90_ONLY_HEAD_DIMS = (96,)  # the sm_80 kernel has no tiles for these
_KEY_TILE = 64  # kFlashBlockN in csrc/flash_fwd.h: keys per tile of the prepass workspace


def attention_support(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the CUDA attention can run inputs of this device, dtype and head dim (every feature, ReRoPE
    included), else why not."""
    if device.type != "cuda":
        return f"the CUDA attention needs CUDA tensors, got {device}"
    if dtype not in ATTENTION_DTYPES:
        return f"the CUDA attention takes float16 or bfloat16, not {dtype}"
    if head_dim not in ATTENTION_HEAD_DIMS:
        return f"the CUDA attention is built for head_dim 64, 96 and 128, not head_dim {head_dim}"
    module, why = load_extension()
    if module is None:
        return why
    if not hasattr(module, "flash_fwd"):
        return "scaled_rope._C was built without flash_fwd; reinstall to rebuild it"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "the CUDA attention needs compute capability 8.0 or newer (mma.sync bf16, cp.async)"
    if head_dim in SM90_ONLY_HEAD_DIMS and not _sm90_runs(device):
        return (f"the CUDA attention runs head_dim {head_dim} on its sm_90a kernel only (a compute capability 9.x "
                f"device, an extension built with sm_90a, SCALED_ROPE_FLASH_SM80 unset)")
    return None


def sm90_kernel_applies(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """True when the CUDA attention runs such inputs on its sm_90a kernel (csrc/flash_fwd_sm90.cu): head_dim 64, 96
    or 128, float16 or bfloat16, a compute capability 9.x device, an extension built with sm_90a,
    SCALED_ROPE_FLASH_SM80 not set."""
    return attention_support(device, dtype, head_dim) is None and _sm90_runs(device)


def _sm90_runs(device: torch.device) -> bool:
    """Whether the sm_90a kernels run on this device (the extension loaded, head_dim and dtype aside)."""
    return (not _env.flash_sm80() and torch.cuda.get_device_capability(device)[0] == 9 and _built_for_sm90a())


@lru_cache(maxsize=None)
def _built_for_sm90a() -> bool:
    module, _ = load_extension()
    archs = module.compiled_archs().lower().replace(",", ";").split(";")
    return any(arch.strip().removeprefix("sm_").removesuffix("+ptx") == "90a" for arch in archs)


def _rows_aligned(x: torch.Tensor) -> torch.Tensor:
    """x itself when every row starts on 16 bytes (cp.async), else a contiguous copy."""
    strides = [s for s, n in zip(x.stride()[:3], x.shape[:3]) if n > 1]
    if x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in strides):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _stride(x: torch.Tensor, dim: int) -> int:
    return x.stride(dim) if x.shape[dim] > 1 else 0


def head_major_scratch(x: torch.Tensor) -> torch.Tensor:
    """A (B, N, H, D) view of a fresh (B, H, N, D) buffer: each head's rows are one contiguous block."""
    batch, n, heads, dim = x.shape
    return torch.empty((batch, heads, n, dim), dtype=x.dtype, device=x.device).transpose(1, 2)


def flash_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh out (B, Nq, Hq, D) in q's dtype and lse (B, Hq, Nq) float32 for `flash_forward`."""
    batch, nq, heads, dim = q.shape
    return (_alloc.empty((batch, nq, heads, dim), q.dtype, q.device),
            _alloc.empty((batch, heads, nq), torch.float32, q.device))


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_far: torch.Tensor | None,
                  k_far: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, *,
                  q_positions: torch.Tensor | None, k_positions: torch.Tensor | None, causal: bool,
                  window: int | None, rerope_window: int | None, logn_base: float | None,
                  softmax_scale: float, q_tables=None, q_sign: float = 1.0) -> None:
    """The fused attention over rotated operands into out and lse (`flash_outputs`): q (B, Nq, Hq, D), k
    (B, Nk, Hkv, D) and, for ReRoPE, q_far and k_far already rotated (softmax_scale's sign folded into q and q_far,
    softmax_scale > 0; rows aligned: `_rows_aligned`, `head_major_scratch`); v as given. Positions int (B, N)
    with |p| < 2**30, or None for the default (k = 0..Nk-1, q = the last Nq of those). With q_tables (where
    `rope_on_chip` holds and the sm_90a kernel runs; no ReRoPE) q comes unrotated and the kernel rotates it with
    them at the query positions, times q_sign."""
    ext = _require_extension()
    batch, nq, heads, dim = q.shape
    nk, kv_heads = k.shape[1], k.shape[2]
    device = q.device
    v = _rows_aligned(v)
    qp = None if q_positions is None else q_positions.to(torch.int32).contiguous()
    kp = None if k_positions is None else k_positions.to(torch.int32).contiguous()
    minmax = None
    if kp is not None:
        minmax = torch.empty((batch, (nk + _KEY_TILE - 1) // _KEY_TILE, 2), dtype=torch.int32, device=device)
    ext.flash_fwd(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), q_far=_ptr(q_far), k_far=_ptr(k_far),
        out=out.data_ptr(), lse=lse.data_ptr(), q_positions=_ptr(qp), k_positions=_ptr(kp),
        k_tile_minmax=_ptr(minmax),
        batch=batch, seqlen_q=nq, seqlen_k=nk, heads_q=heads, heads_kv=kv_heads, head_dim=dim,
        q_batch_stride=_stride(q, 0), q_row_stride=_stride(q, 1), q_head_stride=_stride(q, 2),
        k_batch_stride=_stride(k, 0), k_row_stride=_stride(k, 1), k_head_stride=_stride(k, 2),
        k_far_batch_stride=0 if k_far is None else _stride(k_far, 0),
        k_far_row_stride=0 if k_far is None else _stride(k_far, 1),
        k_far_head_stride=0 if k_far is None else _stride(k_far, 2),
        v_batch_stride=_stride(v, 0), v_row_stride=_stride(v, 1), v_head_stride=_stride(v, 2),
        o_batch_stride=out.stride(0), o_row_stride=out.stride(1), o_head_stride=out.stride(2),
        lse_batch_stride=lse.stride(0), lse_head_stride=lse.stride(1),
        q_positions_batch_stride=0 if qp is None else qp.stride(0),
        k_positions_batch_stride=0 if kp is None else kp.stride(0),
        softmax_scale=softmax_scale, causal=bool(causal),
        window=0 if window is None else int(window),
        rerope_window=0 if rerope_window is None else int(rerope_window),
        logn_base=0.0 if logn_base is None else float(logn_base),
        dtype=_DTYPE_CODES[q.dtype], device=_device_index(device),
        stream=torch.cuda.current_stream(device).cuda_stream,
        **({} if q_tables is None else rope_kwargs(q_tables, q_sign)),
    )
