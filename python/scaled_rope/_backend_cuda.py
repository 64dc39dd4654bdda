"""The CUDA backend: the hand-written forward (csrc/flash_fwd.cu) and rotation (csrc/rope.cu) through the
launcher scaled_rope._cuda; its attention backward is the sm_90a backward (csrc/flash_bwd_sm90.cu, through
scaled_rope._cuda_backward) where that runs the inputs, else the Triton backward fed the CUDA forward's out and
lse."""
from __future__ import annotations

import torch

from . import _cuda
from ._backend_triton import TritonBackend, backward
from ._backends import AttentionCall, Backend, RotationCall
from ._scale import signed


def _q_on_chip(call: AttentionCall) -> bool:
    """Whether the forward kernel rotates q on-chip (the sm_90a kernel, no ReRoPE, tables it takes)."""
    q = call.q
    return (call.tables is not None and call.rerope_window is None
            and _cuda.rope_on_chip(call.tables.near, q.shape[-1], call.q_sign)
            and _cuda.sm90_kernel_applies(q.device, q.dtype, q.shape[-1]))


def _operands(call: AttentionCall):
    """The forward's operands (q, k, q far, k far): rotated, with softmax_scale's sign folded into q and q far,
    except q where `_q_on_chip` (the kernel rotates and signs it). Plain ReRoPE reads k itself as the far k, with
    both attention factors on the far q."""
    q, k = call.q, call.k
    t = call.tables
    if t is None:
        q_rot, k_rot, q_far, k_far = _cuda._rows_aligned(q), _cuda._rows_aligned(k), None, None
    elif _q_on_chip(call):
        rot_k = call.k_positions if call.k_positions is not None else \
            torch.arange(k.shape[1], dtype=torch.int32, device=q.device).expand(k.shape[0], k.shape[1])
        k_rot = _cuda.cuda_rotate(k, rot_k, t.near, out=_cuda.head_major_scratch(k))
        return _cuda._rows_aligned(q), k_rot, None, None
    else:
        batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
        rot_q = call.q_positions if call.q_positions is not None else \
            torch.arange(nk - nq, nk, dtype=torch.int32, device=q.device).expand(batch, nq)
        rot_k = call.k_positions if call.k_positions is not None else \
            torch.arange(nk, dtype=torch.int32, device=q.device).expand(batch, nk)
        q_rot = _cuda.cuda_rotate(q, rot_q, t.near, out=_cuda.head_major_scratch(q))
        k_rot = _cuda.cuda_rotate(k, rot_k, t.near, out=_cuda.head_major_scratch(k))
        q_far = k_far = None
        if call.rerope_window is not None:
            plain = t.far_q_both is not None
            q_far = _cuda.cuda_rotate(q, rot_q, t.far_q_both if plain else t.far_q, out=_cuda.head_major_scratch(q))
            k_far = _cuda._rows_aligned(k) if plain else \
                _cuda.cuda_rotate(k, rot_k, t.far_k, out=_cuda.head_major_scratch(k))
    q_rot = signed(q_rot, q, call.q_sign)
    if q_far is not None:
        q_far = signed(q_far, q, call.q_sign)
    return q_rot, k_rot, q_far, k_far


class CudaBackend(Backend):
    name = "cuda"

    def attention_support(self, device, dtype, head_dim):
        return _cuda.attention_support(device, dtype, head_dim)

    def attention_forward(self, call: AttentionCall):
        q = call.q
        out, lse = _cuda.flash_outputs(q)
        if q.shape[0] and q.shape[1] and q.shape[2]:
            q_rot, k_rot, q_far, k_far = _operands(call)
            on_chip = _q_on_chip(call)
            _cuda.flash_forward(q_rot, k_rot, call.v, q_far, k_far, out, lse, q_positions=call.q_positions,
                                k_positions=call.k_positions, causal=call.causal, window=call.window,
                                rerope_window=call.rerope_window, logn_base=call.logn_base,
                                softmax_scale=call.kernel_scale, q_tables=call.tables.near if on_chip else None,
                                q_sign=call.q_sign)
        return out, lse, None

    def attention_backward(self, call: AttentionCall, out, lse, residual, dout, dlse):
        from ._cuda_backward import cuda_attention_backward, cuda_backward_support

        if cuda_backward_support(call.q, q_positions=call.q_positions, k_positions=call.k_positions,
                                 rerope_window=call.rerope_window) is None:
            near = None if call.tables is None else call.tables.near
            return cuda_attention_backward(call.q, call.k, call.v, out, lse, dout, dlse, q_tables=near,
                                           k_tables=near, causal=call.causal, window=call.window,
                                           softmax_scale=call.softmax_scale, logn_base=call.logn_base)
        # what the sm_90a backward does not run yet (explicit positions, ReRoPE, other head dims, other GPUs):
        # the Triton backward on this forward's out and lse
        reason = TritonBackend().attention_support(call.q.device, call.q.dtype, call.q.shape[-1])
        if reason is not None:
            raise NotImplementedError(f"the CUDA backend's backward runs the Triton kernels, which cannot run these "
                                      f"inputs: {reason}")
        from .triton_kernels.attention import lse2_from_natural

        return backward(call, out, lse2_from_natural(lse), dout, dlse)

    def rotation_support(self, device, dtype):
        return _cuda.rotation_support(device, dtype)

    def rotate(self, call: RotationCall):
        return _cuda.cuda_rotate(call.x, call.positions, call.tables, inverse=call.inverse)
