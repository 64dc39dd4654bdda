"""The CUDA attention backward (csrc/flash_bwd_sm90.cu): sm_90a, head_dim 96 or 128, float16/bfloat16, default
positions, no ReRoPE. `cuda_backward_support` says why not for everything else, so that the caller runs the Triton
backward there instead (explicitly: nothing here falls back on its own).

Nothing rotated is kept from the forward. q is rotated into a scratch buffer (the CUDA rotation: every key tile's
CTA reads every query tile, so one pass is cheaper than rotating each read); k is rotated on-chip, one key tile per
CTA, and dk and dq come out of the kernel through the rotation's transpose (`rope_on_chip` tables). For other tables
(or SCALED_ROPE_ROTATION_PASSES=1) k is rotated into scratch too and dq, dk are mapped back by transpose passes.
"""
from __future__ import annotations

import math

import torch

from . import _alloc
from ._cuda import (_DTYPE_CODES, _built_for_sm90a, _stride, attention_support, cuda_rotate, load_extension,
                    rope_kwargs, rope_on_chip)
from ._scale import fold_scale_sign

HEAD_DIMS = (96, 128)
_BLOCK_M = 64  # kFlashBwdBlockM in csrc/flash_bwd.h: the workspaces are padded to whole query tiles of this many rows


def cuda_backward_support(q: torch.Tensor, *, q_positions=None, k_positions=None, rerope_window=None) -> str | None:
    """None when the CUDA backward runs inputs like q with these arguments, else why not."""
    if q_positions is not None or k_positions is not None:
        return "the CUDA backward takes default positions only, not q_positions/k_positions"
    if rerope_window is not None:
        return "the CUDA backward has no ReRoPE (rerope_window)"
    reason = attention_support(q.device, q.dtype, q.shape[-1])  # what the CUDA forward needs, the backward too
    if reason is not None:
        return reason
    if q.shape[-1] not in HEAD_DIMS:
        return f"the CUDA backward is built for head_dim 96 and 128, not head_dim {q.shape[-1]}"
    if not hasattr(load_extension()[0], "flash_bwd"):
        return "scaled_rope._C was built without flash_bwd; reinstall to rebuild it"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return f"the CUDA backward is an sm_90a kernel (compute capability 9.x), not {major}.{minor}"
    if not _built_for_sm90a():
        return "scaled_rope._C was built without sm_90a code (SCALED_ROPE_CUDA_ARCHS must include 90a)"
    return None


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """A (B, N, H, D) view of a fresh (B, H, N, D) buffer (poisoned under SCALED_ROPE_POISON=1)."""
    batch, n, heads, dim = x.shape
    return _alloc.empty((batch, heads, n, dim), x.dtype, x.device).transpose(1, 2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous and every row starts on 16 bytes (what TMA and the kernels'
    16-byte loads need), else a contiguous copy."""
    strides = [s for s, n in zip(x.stride()[:3], x.shape[:3]) if n > 1]
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in strides):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def cuda_flash_backward(q_rot, k_rot, v, out, lse, dout, dlse, *, causal: bool, window: int | None,
                        softmax_scale: float, logn_base: float | None, q_sign: float = 1.0, tables=None):
    """(dq_rot, dk_rot, dv): gradients w.r.t. the rotated q and k and w.r.t. v (csrc/flash_bwd.h).

    q_rot, out, dout (B, Nq, Hq, D); k_rot, v (B, Nk, Hkv, D), D 96 or 128; one dtype (float16 or bfloat16), one
    CUDA device; lse (B, Hq, Nq) float32, natural log, -inf on empty rows (the forward's); dlse the gradient reaching
    lse, same shape, or None. softmax_scale > 0 with its sign q_sign (+1 or -1) folded into q_rot; dq comes back times
    q_sign; window None or >= 1; logn_base None or > 1. Default positions (query i at Nk - Nq + i, key j at j).
    With `tables` (`rope_on_chip`), k_rot is the unrotated k, rotated on-chip, and dq_rot, dk_rot are the gradients
    w.r.t. the unrotated q and k (q_rot being q rotated with the same tables, times q_sign), contiguous; without,
    they come back as (B, N, H, D) views of head-major buffers. dv contiguous, all in the input dtype.
    """
    reason = cuda_backward_support(q_rot)
    if reason is not None:
        raise NotImplementedError(reason)
    batch, nq, heads, dim = q_rot.shape
    nk, kv_heads = k_rot.shape[1], k_rot.shape[2]
    for name, x, shape in (("k_rot", k_rot, (batch, nk, kv_heads, dim)), ("v", v, (batch, nk, kv_heads, dim)),
                           ("out", out, q_rot.shape), ("dout", dout, q_rot.shape)):
        if tuple(x.shape) != tuple(shape) or x.dtype != q_rot.dtype or x.device != q_rot.device:
            raise ValueError(f"{name} must be {q_rot.dtype} of shape {tuple(shape)} on {q_rot.device}, got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads})")
    for name, x in (("lse", lse), ("dlse", dlse)):
        if name == "dlse" and x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (batch, heads, nq) or x.dtype != torch.float32 \
                or x.device != q_rot.device:
            got = f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else repr(x)
            raise ValueError(f"{name} must be float32 of shape {(batch, heads, nq)} on {q_rot.device}, got {got}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0 (fold its sign into q_rot), got {softmax_scale}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if logn_base is not None and not (math.isfinite(logn_base) and logn_base > 1):
        raise ValueError(f"logn_base must be a finite number > 1, got {logn_base}")
    if max(nq, nk) >= 2 ** 30:
        raise ValueError(f"q and k lengths must be < 2**30 for the CUDA backward, got {nq} and {nk}")

    if q_sign not in (1.0, -1.0):
        raise ValueError(f"q_sign must be 1 or -1, got {q_sign}")
    if tables is not None and not rope_on_chip(tables, dim, q_sign):
        raise ValueError(f"tables: rotary_dim {int(tables.rotary_dim)} ({'interleaved' if tables.interleaved else 'half'}"
                         f" layout) is not rotated on-chip for head_dim {dim} (scaled_rope._cuda.rope_on_chip)")
    if tables is None:
        dq_rot, dk_rot = _head_major(q_rot), _head_major(k_rot)
    else:
        dq_rot, dk_rot = (_alloc.empty(x.shape, x.dtype, x.device) for x in (q_rot, k_rot))
    dv = _alloc.empty(v.shape, v.dtype, v.device)
    if batch == 0 or heads == 0:
        return dq_rot, dk_rot, dv
    q_rot, k_rot, v, out, dout = (_rows(x) for x in (q_rot, k_rot, v, out, dout))
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    if dlse is not None and dlse.stride(-1) != 1:
        dlse = dlse.contiguous()
    rows_padded = -(-nq // _BLOCK_M) * _BLOCK_M
    dq_accum = _alloc.empty((batch, heads, rows_padded, dim), torch.float32, q_rot.device)  # zeroed by the kernel
    row_info = _alloc.empty((batch, heads, rows_padded, 4), torch.float32, q_rot.device)
    ext = load_extension()[0]
    device = q_rot.device
    ext.flash_bwd(
        q=q_rot.data_ptr(), k=k_rot.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), dout=dout.data_ptr(),
        lse=lse.data_ptr(), dlse=0 if dlse is None else dlse.data_ptr(), dq=dq_rot.data_ptr(), dk=dk_rot.data_ptr(),
        dv=dv.data_ptr(), dq_accum=dq_accum.data_ptr(), row_info=row_info.data_ptr(),
        batch=batch, seqlen_q=nq, seqlen_k=nk, heads_q=heads, heads_kv=kv_heads, head_dim=dim,
        q_batch_stride=_stride(q_rot, 0), q_row_stride=_stride(q_rot, 1), q_head_stride=_stride(q_rot, 2),
        k_batch_stride=_stride(k_rot, 0), k_row_stride=_stride(k_rot, 1), k_head_stride=_stride(k_rot, 2),
        v_batch_stride=_stride(v, 0), v_row_stride=_stride(v, 1), v_head_stride=_stride(v, 2),
        o_batch_stride=_stride(out, 0), o_row_stride=_stride(out, 1), o_head_stride=_stride(out, 2),
        do_batch_stride=_stride(dout, 0), do_row_stride=_stride(dout, 1), do_head_stride=_stride(dout, 2),
        dq_batch_stride=_stride(dq_rot, 0), dq_row_stride=_stride(dq_rot, 1), dq_head_stride=_stride(dq_rot, 2),
        dk_batch_stride=_stride(dk_rot, 0), dk_row_stride=_stride(dk_rot, 1), dk_head_stride=_stride(dk_rot, 2),
        dv_batch_stride=_stride(dv, 0), dv_row_stride=_stride(dv, 1), dv_head_stride=_stride(dv, 2),
        lse_batch_stride=lse.stride(0), lse_head_stride=lse.stride(1),
        dlse_batch_stride=0 if dlse is None else dlse.stride(0), dlse_head_stride=0 if dlse is None else dlse.stride(1),
        softmax_scale=float(softmax_scale), causal=bool(causal), window=0 if window is None else int(window),
        logn_base=0.0 if logn_base is None else float(logn_base), dtype=_DTYPE_CODES[q_rot.dtype],
        device=device.index if device.index is not None else torch.cuda.current_device(),
        stream=torch.cuda.current_stream(device).cuda_stream,
        **(dict(q_sign=float(q_sign)) if tables is None else rope_kwargs(tables, q_sign)),
    )
    return dq_rot, dk_rot, dv


def cuda_attention_backward(q, k, v, out, lse, dout, dlse, *, q_tables, k_tables, q_positions=None,
                            k_positions=None, causal, window, softmax_scale, rerope_window=None, logn_base):
    """(dq, dk, dv) for the unrotated q (B, Nq, Hq, D), k, v (B, Nk, Hkv, D) (D 96 or 128), given the out and lse
    (natural log, (B, Hq, Nq) float32, -inf on empty rows) that a forward computed with the same arguments, the output
    gradient dout and the lse gradient dlse (or None). q_tables, k_tables: the rotation tables of q and k
    (`scaled_rope.tables.build_tables` with every row's length Nk; None: no rotation); the other arguments as for
    the attention itself (docs/DESIGN.md §3). Raises NotImplementedError with the reason where
    `cuda_backward_support` refuses the inputs (the caller then runs the Triton backward)."""
    reason = cuda_backward_support(q, q_positions=q_positions, k_positions=k_positions, rerope_window=rerope_window)
    if reason is not None:
        raise NotImplementedError(reason)
    batch, nq = q.shape[:2]
    nk = k.shape[1]
    sign, scale = fold_scale_sign(softmax_scale)
    # sign 0 (a vanishing scale, scaled_rope._scale): q zeroed, scale 1 in the kernel, dq zeroed after it
    kernel_sign = sign if sign != 0.0 else 1.0
    if q_tables is not None:
        q_pos = torch.arange(nk - nq, nk, dtype=torch.int32, device=q.device).expand(batch, nq)
        q_rot = cuda_rotate(q, q_pos, q_tables, out=_head_major(q))
    else:
        q_rot = q
    if sign != 1.0:  # the kernel takes scale > 0: the sign rides on q (in place in the scratch, never in q)
        q_rot = q_rot * sign if q_rot is q else q_rot.mul_(sign)
    if q_tables is not None and k_tables is q_tables and rope_on_chip(q_tables, q.shape[-1], kernel_sign):
        # k rotated on-chip; dq and dk come back w.r.t. the unrotated q and k
        dq, dk, dv = cuda_flash_backward(q_rot, k, v, out, lse, dout, dlse, causal=causal, window=window,
                                         softmax_scale=scale, logn_base=logn_base, q_sign=kernel_sign,
                                         tables=q_tables)
        return (dq.zero_() if sign == 0.0 else dq), dk, dv
    k_rot = k if k_tables is None else cuda_rotate(k, torch.arange(nk, dtype=torch.int32, device=q.device).expand(
        batch, nk), k_tables, out=_head_major(k))
    dq_rot, dk_rot, dv = cuda_flash_backward(q_rot, k_rot, v, out, lse, dout, dlse, causal=causal, window=window,
                                             softmax_scale=scale, logn_base=logn_base, q_sign=kernel_sign)
    if sign == 0.0:
        dq_rot.zero_()
    dq = dq_rot if q_tables is None else cuda_rotate(dq_rot, q_pos, q_tables, inverse=True,
                                                     out=_alloc.empty(q.shape, q.dtype, q.device))
    dk = dk_rot if k_tables is None else cuda_rotate(
        dk_rot, torch.arange(nk, dtype=torch.int32, device=q.device).expand(batch, nk), k_tables, inverse=True,
        out=_alloc.empty(k.shape, k.dtype, k.device))
    return dq, dk, dv
