"""The Triton backend: fused attention (forward and backward), KV-cache decode and the rotation, on CUDA tensors
(CPU tensors under TRITON_INTERPRET=1). Imports triton on first use only."""
from __future__ import annotations

import torch

from . import _env
from ._alloc import kept
from ._backend_reference import capacity, check_lengths
from ._backends import AttentionCall, Backend, KVCacheCall, RotationCall
from .tables import factor_rows, xpos_rates

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _device_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _env.triton_interpret():
        if dtype == torch.bfloat16:
            return "the Triton interpreter computes bfloat16 wrongly; use float16 or float32 on CPU"
        return None
    return f"the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()  # the plan admits any stride only for a last dim of 1


def _xpos_rate(call, per_pair: bool):
    """xPos's rates for the kernels (`xpos_rates`: per column, or per rotation pair), None without xPos."""
    if call.xpos_scale_base is None:
        return None
    near = call.tables.near
    return xpos_rates(call.q.shape[-1], near.rotary_dim, near.interleaved, call.xpos_scale_base, call.q.device,
                      per_pair=per_pair)


def launch_args(call: AttentionCall):
    """The kernels' LaunchArgs of a call (the CUDA backend's backward uses them too)."""
    from .triton_kernels.attention import LaunchArgs

    t = call.tables
    return LaunchArgs.build(
        None if t is None else t.near, None if t is None else t.far_q, None if t is None else t.far_k,
        None if t is None else t.far_q_both, nk=call.k.shape[1],
        explicit=call.q_positions is not None or call.k_positions is not None, causal=call.causal,
        window=call.window, rerope_window=call.rerope_window, q_sign=call.q_sign, sm_scale=call.kernel_scale,
        logn_base=call.logn_base, xpos_rate=_xpos_rate(call, per_pair=False))


def _positions(call: AttentionCall):
    """(q positions, k positions) as tensors: the call's, or the default (k = 0..Nk-1, q = the last Nq)."""
    from .triton_kernels.attention import default_positions

    batch, nq = call.q.shape[:2]
    nk = call.k.shape[1]
    q_pos = call.q_positions if call.q_positions is not None else default_positions(batch, nk - nq, nq,
                                                                                     call.q.device)
    k_pos = call.k_positions if call.k_positions is not None else default_positions(batch, 0, nk, call.q.device)
    return q_pos, k_pos


def backward(call: AttentionCall, out, lse2, dout, dlse):
    """(dq, dk, dv) from the out and log2-domain lse (B, Hq, Nq, 2) of a forward with these arguments."""
    from .triton_kernels import attention as kernels

    q, k, v = (_last_dim_contiguous(x) for x in (call.q, call.k, call.v))
    return kernels.backward(_last_dim_contiguous(dout), dlse, q, k, v, out, lse2, *_positions(call),
                            launch_args(call))


_STATUS: dict = {}


def _status_flag(device: torch.device) -> torch.Tensor:
    """Per-device int32 flag, 1 until a kernel meets a row outside the cache (then 0 for good: the assertion on
    it has failed and CUDA's context with it)."""
    return kept(_STATUS, device, device, lambda: torch.ones(1, dtype=torch.int32, device=device), 64)


class TritonBackend(Backend):
    name = "triton"
    xpos_modes = {"attention": ("default",), "kvcache": ("default",)}

    def attention_support(self, device, dtype, head_dim):
        reason = _device_reason(device, dtype)
        if reason is None and head_dim > MAX_HEAD_DIM:
            reason = f"the Triton attention takes head_dim <= {MAX_HEAD_DIM}, not head_dim {head_dim}"
        return reason

    def residual_shape(self, q):
        batch, nq, heads = q.shape[:3]
        return (batch, heads, nq, 2)

    def attention_forward(self, call: AttentionCall):
        from .triton_kernels import attention as kernels

        q, k, v = (_last_dim_contiguous(x) for x in (call.q, call.k, call.v))
        return kernels.forward(q, k, v, *_positions(call), launch_args(call))

    def attention_backward(self, call: AttentionCall, out, lse, residual, dout, dlse):
        return backward(call, out, residual, dout, dlse)

    def kvcache_support(self, device, dtype, head_dim):
        return _device_reason(device, dtype)

    def attention_with_kvcache(self, call: KVCacheCall):
        """Lengths are checked on the host for CPU tensors (free there); on CUDA the kernels check each row on
        the device (no synchronisation) and a device-side assertion reports a violation."""
        from .triton_kernels.decode import append_to_cache, decode_attention

        q = call.q
        n_new = 0 if call.k_new is None else call.k_new.shape[1]
        on_device = q.device.type == "cuda"
        max_seqlen = None if on_device else check_lengths(call.cache_seqlens, n_new,
                                                          capacity(call.k_cache, call.block_table))
        status = _status_flag(q.device) if on_device else None
        t = call.tables
        if call.k_new is not None:
            append_to_cache(call.k_cache, call.v_cache, call.k_new, call.v_new, call.cache_seqlens,
                            call.block_table, status=status)
        out, lse = decode_attention(
            q, call.k_cache, call.v_cache, call.cache_seqlens, None if t is None else factor_rows(t.near, q.shape[0]),
            n_new=n_new, status=status, block_table=call.block_table, q_far_tables=None if t is None else t.far_q,
            k_far_tables=None if t is None else t.far_k, causal=call.causal, window=call.window,
            softmax_scale=call.softmax_scale, rerope_window=call.rerope_window, rerope_leak=call.rerope_leak,
            logn_base=call.logn_base, max_seqlen=max_seqlen, xpos_rate=_xpos_rate(call, per_pair=True))
        if status is not None:
            torch._assert_async(status, "scaled_rope_attention_with_kvcache: cache_seqlens + Nnew outside "
                                        "0..capacity (or a page id outside the cache)")
        return out, lse

    def rotation_support(self, device, dtype):
        return _device_reason(device, dtype)

    def rotate(self, call: RotationCall):
        from .triton_kernels.rope import rotate

        return rotate(call.x, call.positions, call.tables, inverse=call.inverse)
