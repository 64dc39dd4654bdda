"""Lazy access to the compiled extension scaled_rope._C and the tensor-checking wrappers around it.

Nothing here runs at import: `load_extension()` imports _C on first use and remembers the outcome, so importing
scaled_rope works without _C (CPU-only installs, SCALED_ROPE_SKIP_CUDA=1) and without a GPU.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from . import _alloc
from ._rotation_args import check_rotation_args
from ._scale import fold_scale_sign, signed
from .tables import far_q_with_both_factors

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


# ---- attention (csrc/flash_fwd.cu) ----------------------------------------------------------------------------
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
ATTENTION_HEAD_DIMS = (64, 128)
_KEY_TILE = 64  # kFlashBlockN in csrc/flash_fwd.h: keys per tile of the prepass workspace


def attention_support(q: torch.Tensor, rerope_window: int | None = None) -> str | None:
    """None when the CUDA attention can run inputs like q (every feature, ReRoPE included), else why not."""
    if not q.is_cuda:
        return f"the CUDA attention needs CUDA tensors, got {q.device}"
    if q.dtype not in ATTENTION_DTYPES:
        return f"the CUDA attention takes float16 or bfloat16, not {q.dtype}"
    if q.shape[-1] not in ATTENTION_HEAD_DIMS:
        return f"the CUDA attention is built for head_dim 64 and 128, not head_dim {q.shape[-1]}"
    module, why = load_extension()
    if module is None:
        return why
    if not hasattr(module, "flash_fwd"):
        return "scaled_rope._C was built without flash_fwd; reinstall to rebuild it"
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return "the CUDA attention needs compute capability 8.0 or newer (mma.sync bf16, cp.async)"
    return None


def sm90_kernel_applies(q: torch.Tensor) -> bool:
    """True when the CUDA attention runs q on its sm_90a kernel (csrc/flash_fwd_sm90.cu): head_dim 128, float16 or
    bfloat16, a compute capability 9.x device, an extension built with sm_90a, SCALED_ROPE_FLASH_SM80 not set."""
    forced_sm80 = os.environ.get("SCALED_ROPE_FLASH_SM80", "")[:1] not in ("", "0")
    if q.shape[-1] != 128 or forced_sm80 or attention_support(q) is not None:
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9 and _built_for_sm90a()


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


def _head_major_scratch(x: torch.Tensor) -> torch.Tensor:
    """A (B, N, H, D) view of a fresh (B, H, N, D) buffer: each head's rows are one contiguous block."""
    batch, n, heads, dim = x.shape
    return torch.empty((batch, heads, n, dim), dtype=x.dtype, device=x.device).transpose(1, 2)


def _flash_forward(q, k, v, a: dict, k_far_unrotated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    reason = attention_support(q, a["rerope_window"])
    if reason is not None:
        raise NotImplementedError(reason)
    ext = _require_extension()
    batch, nq, heads, dim = q.shape
    nk, kv_heads = k.shape[1], k.shape[2]
    device = q.device
    out = _alloc.empty((batch, nq, heads, dim), q.dtype, device)
    lse = _alloc.empty((batch, heads, nq), torch.float32, device)
    if batch == 0 or nq == 0 or heads == 0:
        return out, lse

    q_positions, k_positions = a["q_positions"], a["k_positions"]
    rerope = a["rerope_window"] is not None
    if a["q_tables"] is None:
        if rerope:
            raise ValueError("rerope_window needs rotation tables (rope is None)")
        q_rot, k_rot, q_far, k_far = _rows_aligned(q), _rows_aligned(k), None, None
    else:
        rot_q = q_positions if q_positions is not None else \
            torch.arange(nk - nq, nk, dtype=torch.int32, device=device).expand(batch, nq)
        rot_k = k_positions if k_positions is not None else \
            torch.arange(nk, dtype=torch.int32, device=device).expand(batch, nk)
        q_rot = cuda_rotate(q, rot_q, a["q_tables"], out=_head_major_scratch(q))
        k_rot = cuda_rotate(k, rot_k, a["k_tables"], out=_head_major_scratch(k))
        q_far = k_far = None
        if rerope:
            if a["q_far_tables"] is None or a["k_far_tables"] is None:
                raise ValueError("rerope_window needs q_far_tables and k_far_tables")
            # plain ReRoPE: the far k is k itself, the far q takes both attention factors
            far_q_tables = (far_q_with_both_factors(a["q_far_tables"], a["k_far_tables"]) if k_far_unrotated
                            else a["q_far_tables"])
            q_far = cuda_rotate(q, rot_q, far_q_tables, out=_head_major_scratch(q))
            k_far = (_rows_aligned(k) if k_far_unrotated
                     else cuda_rotate(k, rot_k, a["k_far_tables"], out=_head_major_scratch(k)))
    v = _rows_aligned(v)
    # the kernels take softmax_scale > 0 (the sm_90a one takes row maxima of the raw scores)
    sign, scale = fold_scale_sign(a["softmax_scale"])
    q_rot = signed(q_rot, q, sign)
    if q_far is not None:
        q_far = signed(q_far, q, sign)

    qp = None if q_positions is None else q_positions.to(torch.int32).contiguous()
    kp = None if k_positions is None else k_positions.to(torch.int32).contiguous()
    minmax = None
    if kp is not None:
        minmax = torch.empty((batch, (nk + _KEY_TILE - 1) // _KEY_TILE, 2), dtype=torch.int32, device=device)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    logn_base = a["logn_base"]
    ext.flash_fwd(
        q=q_rot.data_ptr(), k=k_rot.data_ptr(), v=v.data_ptr(), q_far=ptr(q_far), k_far=ptr(k_far),
        out=out.data_ptr(), lse=lse.data_ptr(), q_positions=ptr(qp), k_positions=ptr(kp), k_tile_minmax=ptr(minmax),
        batch=batch, seqlen_q=nq, seqlen_k=nk, heads_q=heads, heads_kv=kv_heads, head_dim=dim,
        q_batch_stride=_stride(q_rot, 0), q_row_stride=_stride(q_rot, 1), q_head_stride=_stride(q_rot, 2),
        k_batch_stride=_stride(k_rot, 0), k_row_stride=_stride(k_rot, 1), k_head_stride=_stride(k_rot, 2),
        k_far_batch_stride=0 if k_far is None else _stride(k_far, 0),
        k_far_row_stride=0 if k_far is None else _stride(k_far, 1),
        k_far_head_stride=0 if k_far is None else _stride(k_far, 2),
        v_batch_stride=_stride(v, 0), v_row_stride=_stride(v, 1), v_head_stride=_stride(v, 2),
        o_batch_stride=out.stride(0), o_row_stride=out.stride(1), o_head_stride=out.stride(2),
        lse_batch_stride=lse.stride(0), lse_head_stride=lse.stride(1),
        q_positions_batch_stride=0 if qp is None else qp.stride(0),
        k_positions_batch_stride=0 if kp is None else kp.stride(0),
        softmax_scale=scale, causal=bool(a["causal"]),
        window=0 if a["window"] is None else int(a["window"]),
        rerope_window=int(a["rerope_window"]) if rerope else 0,
        logn_base=0.0 if logn_base is None else float(logn_base),
        dtype=_DTYPE_CODES[q.dtype],
        device=device.index if device.index is not None else torch.cuda.current_device(),
        stream=torch.cuda.current_stream(device).cuda_stream,
    )
    return out, lse


def _triton_backward():
    """scaled_rope.triton_kernels.attention.triton_attention_backward, or None where this install lacks it."""
    try:
        from .triton_kernels import attention as triton_attention_module
    except ImportError:
        return None
    return getattr(triton_attention_module, "triton_attention_backward", None)


class _CudaAttention(torch.autograd.Function):
    """CUDA forward; backward by the Triton kernels (same lse convention), recomputing the rotations."""

    @staticmethod
    def forward(ctx, q, k, v, args, k_far_unrotated):
        out, lse = _flash_forward(q, k, v, args, k_far_unrotated)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        backward = _triton_backward()
        if backward is None:
            raise NotImplementedError(
                "backward of the CUDA attention runs the Triton backward, and "
                "scaled_rope.triton_kernels.attention.triton_attention_backward is not available in this install; "
                "use backend='triton' for training")
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(q, k, v, out, lse, dout.contiguous(), **ctx.args)
        return dq, dk, dv, None, None


def cuda_attention(q, k, v, *, q_tables, k_tables, q_far_tables=None, k_far_tables=None, q_positions=None,
                   k_positions=None, causal, window, softmax_scale, rerope_window, logn_base, k_far_unrotated=False):
    """Scaled-RoPE attention (DESIGN.md section 3) with the CUDA forward (csrc/flash_fwd.cu).

    q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D), unrotated, float16/bfloat16, D in (64, 128), CUDA tensors with a
    contiguous last dim. q and k (and the far pair for ReRoPE) are rotated by the CUDA rotation into scratch buffers,
    then the kernel runs on them. Tables as for `triton_attention` (None: no rotation); positions int (B, N) with
    |p| < 2**30, or None for the default (k = 0..Nk-1, q = the last Nq of those). Returns (out (B, Nq, Hq, D),
    lse (B, Hq, Nq) float32, natural log); empty rows give 0 and -inf. Differentiable in q, k, v through the Triton
    backward. k_far_unrotated=True says that k_far_tables rotate by angle 0 (plain ReRoPE): the kernel then reads k
    itself as the far k, and the far q takes both attention factors. Raises NotImplementedError for other dtypes
    or head dims.
    """
    args = dict(q_tables=q_tables, k_tables=k_tables, q_far_tables=q_far_tables, k_far_tables=k_far_tables,
                q_positions=q_positions, k_positions=k_positions, causal=causal, window=window,
                softmax_scale=softmax_scale, rerope_window=rerope_window, logn_base=logn_base)
    return _CudaAttention.apply(q, k, v, args, bool(k_far_unrotated))
