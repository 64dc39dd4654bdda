"""The public operations as torch.library custom ops, with fake implementations and one registered autograd.

    scaled_rope::attention             (q, k, v, positions, tables, options) -> (out, lse, residual)
    scaled_rope::attention_backward    (dout, dlse, out, lse, residual, <attention's arguments>) -> (dq, dk, dv)
    scaled_rope::attention_with_kvcache  mutates k_cache and v_cache (the append) -> (out, lse)
    scaled_rope::rotate                (x, positions, tables, inverse, ...) -> rotated x; its gradient is the
                                       rotation with the opposite `inverse`

The plan (scaled_rope._plan) is built outside the ops; custom ops take only tensors and plain numbers, so a call's
tables are passed as their tensors and sizes, and the RopeScaling that the reference backend rotates from as a
handle (`RopeScaling.handle`, shared by equal ropes). Each op runs the backend named by its `backend` argument.

Where the ops are used: under torch.compile always; in eager mode only where autograd needs them (a kernel
backend with a gradient to take) or where backward must fail loudly (the KV cache has none). Eager inference calls
the backend directly: a custom op costs about 25 us of host time per call, which a decode step at batch 1 cannot
spare. The reference backend in eager mode is plain PyTorch with its own autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backends
from ._backends import AttentionCall, KVCacheCall, RotationCall
from .scaling import rope_from_handle
from .tables import RotaryTables, TableSet

# ---- the rope handle of the reference backend ---------------------------------------------------------------------
def _rope_handle(rope) -> str:
    """The rope's handle standing for it inside the ops ("" for None); equal ropes share one."""
    return "" if rope is None else rope.handle


def _rope(handle: str):
    return rope_from_handle(handle) if handle else None


# ---- tables as op arguments ----------------------------------------------------------------------------------------
def _table_args(tables: TableSet | None) -> tuple:
    """(turns, turns_unscaled, attention_factor, far_q_turns, far_q_offset, far_k_turns, far_q_both_factor,
    rotary_dim, n_hat, interleaved) of a TableSet (the far tables share near's attention factor)."""
    if tables is None:
        return (None,) * 7 + (0, 0, False)
    near, far_q, far_k, both = tables
    return (near.turns, near.turns_unscaled, near.attention_factor, None if far_q is None else far_q.turns,
            None if far_q is None else far_q.offset, None if far_k is None else far_k.turns,
            None if both is None else both.attention_factor, near.rotary_dim, near.n_hat, near.interleaved)


def _table_set(turns, turns_unscaled, factor, far_q_turns, far_q_offset, far_k_turns, far_q_both_factor,
               rotary_dim, n_hat, interleaved) -> TableSet | None:
    if turns is None:
        return None
    near = RotaryTables(turns, None, turns_unscaled, n_hat, factor, rotary_dim, interleaved)
    if far_q_turns is None:
        return TableSet(near)
    far_q = RotaryTables(far_q_turns, far_q_offset, None, 0, factor, rotary_dim, interleaved)
    far_k = RotaryTables(far_k_turns, None, None, 0, factor, rotary_dim, interleaved)
    both = None if far_q_both_factor is None else far_q._replace(attention_factor=far_q_both_factor)
    return TableSet(near, far_q, far_k, both)


# ---- attention ------------------------------------------------------------------------------------------------------
def _attention_args(call: AttentionCall, backend: str) -> tuple:
    handle = _rope_handle(call.rope) if backend == "reference" else ""
    return (call.q, call.k, call.v, call.q_positions, call.k_positions, *_table_args(call.tables), call.causal,
            call.window, call.rerope_window, call.rerope_leak, call.logn_base, call.softmax_scale, call.q_sign,
            call.kernel_scale, call.xpos_scale_base, handle, backend)


def _attention_call(q, k, v, q_positions, k_positions, turns, turns_unscaled, factor, far_q_turns, far_q_offset,
                    far_k_turns, far_q_both_factor, rotary_dim, n_hat, interleaved, causal, window, rerope_window,
                    rerope_leak, logn_base, softmax_scale, q_sign, kernel_scale, xpos_scale_base, rope,
                    backend) -> AttentionCall:
    tables = _table_set(turns, turns_unscaled, factor, far_q_turns, far_q_offset, far_k_turns, far_q_both_factor,
                        rotary_dim, n_hat, interleaved)
    return AttentionCall(q, k, v, q_positions, k_positions, tables, _rope(rope), causal, window, rerope_window,
                         rerope_leak, logn_base, softmax_scale, q_sign, kernel_scale, xpos_scale_base)


@torch.library.custom_op("scaled_rope::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, q_positions: Optional[Tensor], k_positions: Optional[Tensor],
                  turns: Optional[Tensor], turns_unscaled: Optional[Tensor], attention_factor: Optional[Tensor],
                  far_q_turns: Optional[Tensor], far_q_offset: Optional[Tensor], far_k_turns: Optional[Tensor],
                  far_q_both_factor: Optional[Tensor], rotary_dim: int, n_hat: int, interleaved: bool,
                  causal: bool, window: Optional[int], rerope_window: Optional[int], rerope_leak: Optional[float],
                  logn_base: Optional[float], softmax_scale: float, q_sign: float, kernel_scale: float,
                  xpos_scale_base: Optional[float], rope: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    call = _attention_call(q, k, v, q_positions, k_positions, turns, turns_unscaled, attention_factor, far_q_turns,
                           far_q_offset, far_k_turns, far_q_both_factor, rotary_dim, n_hat, interleaved, causal,
                           window, rerope_window, rerope_leak, logn_base, softmax_scale, q_sign, kernel_scale,
                           xpos_scale_base, rope, backend)
    out, lse, residual = _backends.get(backend).attention_forward(call)
    if residual is None:
        residual = q.new_empty((0,), dtype=torch.float32)
    return out.contiguous(), lse.contiguous(), residual


@_attention_op.register_fake
def _attention_fake(q, k, v, *args):
    batch, nq, heads, _ = q.shape
    residual = _backends.get(args[-1]).residual_shape(q)
    return (q.new_empty(q.shape), q.new_empty((batch, heads, nq), dtype=torch.float32),
            q.new_empty(residual, dtype=torch.float32))


_N_ATTENTION_ARGS = 26  # the arguments of scaled_rope::attention; q, k, v are the first three


@torch.library.custom_op("scaled_rope::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, dlse: Optional[Tensor], out: Tensor, lse: Tensor, residual: Tensor,
                           q: Tensor, k: Tensor, v: Tensor, q_positions: Optional[Tensor],
                           k_positions: Optional[Tensor], turns: Optional[Tensor], turns_unscaled: Optional[Tensor],
                           attention_factor: Optional[Tensor], far_q_turns: Optional[Tensor],
                           far_q_offset: Optional[Tensor], far_k_turns: Optional[Tensor],
                           far_q_both_factor: Optional[Tensor], rotary_dim: int, n_hat: int, interleaved: bool,
                           causal: bool, window: Optional[int], rerope_window: Optional[int],
                           rerope_leak: Optional[float], logn_base: Optional[float], softmax_scale: float,
                           q_sign: float, kernel_scale: float, xpos_scale_base: Optional[float], rope: str,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    call = _attention_call(q, k, v, q_positions, k_positions, turns, turns_unscaled, attention_factor, far_q_turns,
                           far_q_offset, far_k_turns, far_q_both_factor, rotary_dim, n_hat, interleaved, causal,
                           window, rerope_window, rerope_leak, logn_base, softmax_scale, q_sign, kernel_scale,
                           xpos_scale_base, rope, backend)
    grads = _backends.get(backend).attention_backward(call, out, lse, residual, dout, dlse)
    return tuple(g.contiguous() for g in grads)


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, dlse, out, lse, residual, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    tensors = [x if isinstance(x, Tensor) or x is None else None for x in inputs[:12]]
    ctx.save_for_backward(*tensors, *output)
    ctx.scalars = inputs[12:]


def _attention_backward(ctx, dout, dlse, _dresidual):
    *inputs, out, lse, residual = ctx.saved_tensors
    none = (None,) * (_N_ATTENTION_ARGS - 3)
    if dout is None and dlse is None:
        return (None, None, None) + none
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_backward_op(dout, dlse, out, lse, residual, *inputs, *ctx.scalars)
    return (dq, dk, dv) + none


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---- attention over a KV cache --------------------------------------------------------------------------------------
def _kvcache_args(call: KVCacheCall, backend: str) -> tuple:
    handle = _rope_handle(call.rope) if backend == "reference" else ""
    tables = _table_args(call.tables)
    return (call.q, call.k_cache, call.v_cache, call.cache_seqlens, call.k_new, call.v_new, call.block_table,
            *tables[:6], *tables[7:], call.causal, call.window, call.rerope_window, call.rerope_leak,
            call.logn_base, call.softmax_scale, call.xpos_scale_base, handle, backend)


@torch.library.custom_op("scaled_rope::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Optional[Tensor],
                v_new: Optional[Tensor], block_table: Optional[Tensor], turns: Optional[Tensor],
                turns_unscaled: Optional[Tensor], attention_factor: Optional[Tensor], far_q_turns: Optional[Tensor],
                far_q_offset: Optional[Tensor], far_k_turns: Optional[Tensor], rotary_dim: int, n_hat: int,
                interleaved: bool, causal: bool, window: Optional[int], rerope_window: Optional[int],
                rerope_leak: Optional[float], logn_base: Optional[float], softmax_scale: float,
                xpos_scale_base: Optional[float], rope: str, backend: str) -> tuple[Tensor, Tensor]:
    tables = _table_set(turns, turns_unscaled, attention_factor, far_q_turns, far_q_offset, far_k_turns, None,
                        rotary_dim, n_hat, interleaved)
    call = KVCacheCall(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, tables, _rope(rope), causal,
                       window, rerope_window, rerope_leak, logn_base, softmax_scale, xpos_scale_base)
    out, lse = _backends.get(backend).attention_with_kvcache(call)
    return out.contiguous(), lse.contiguous()


@_kvcache_op.register_fake
def _kvcache_fake(q, *args):
    batch, nq, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, nq), dtype=torch.float32)


# ---- the standalone rotation ----------------------------------------------------------------------------------------
def _rotation_args(call: RotationCall, backend: str) -> tuple:
    t = call.tables
    lens = call.seq_lens
    return (call.x, call.positions, None if t is None else t.turns, None if t is None else t.turns_unscaled,
            None if t is None else t.attention_factor, 0 if t is None else t.rotary_dim, 0 if t is None else t.n_hat,
            False if t is None else t.interleaved, call.inverse, lens if isinstance(lens, Tensor) else None,
            None if isinstance(lens, Tensor) else lens, _rope_handle(call.rope) if backend == "reference" else "",
            backend)


@torch.library.custom_op("scaled_rope::rotate", mutates_args=())
def _rotate_op(x: Tensor, positions: Optional[Tensor], turns: Optional[Tensor], turns_unscaled: Optional[Tensor],
               attention_factor: Optional[Tensor], rotary_dim: int, n_hat: int, interleaved: bool, inverse: bool,
               seq_lens: Optional[Tensor], seq_len: Optional[int], rope: str, backend: str) -> Tensor:
    tables = None if turns is None else RotaryTables(turns, None, turns_unscaled, n_hat, attention_factor,
                                                     rotary_dim, interleaved)
    call = RotationCall(x, positions, tables, _rope(rope), seq_lens if seq_lens is not None else seq_len, inverse)
    return _backends.get(backend).rotate(call).contiguous()


@_rotate_op.register_fake
def _rotate_fake(x, *args):
    return x.new_empty(x.shape)


def _rotate_setup(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs[1:5]), inputs[9])
    ctx.scalars = inputs[5:9], inputs[10:]


def _rotate_backward(ctx, grad):
    positions, turns, turns_unscaled, factor, seq_lens = ctx.saved_tensors
    (rotary_dim, n_hat, interleaved, inverse), (seq_len, rope, backend) = ctx.scalars
    dx = _rotate_op(grad.contiguous(), positions, turns, turns_unscaled, factor, rotary_dim, n_hat, interleaved,
                    not inverse, seq_lens, seq_len, rope, backend)
    return (dx,) + (None,) * 12


_rotate_op.register_autograd(_rotate_backward, setup_context=_rotate_setup)


# ---- running a plan -------------------------------------------------------------------------------------------------
def _direct(plan) -> bool:
    """Call the backend directly: eager mode, and no autograd node needed (or the reference's own autograd)."""
    return not torch.compiler.is_compiling() and (not plan.needs_grad or plan.backend == "reference")


def attention(plan) -> tuple[Tensor, Tensor]:
    if _direct(plan):
        return _backends.get(plan.backend).attention_forward(plan.call)[:2]
    out, lse, _ = _attention_op(*_attention_args(plan.call, plan.backend))
    return out, lse


def attention_with_kvcache(plan) -> tuple[Tensor, Tensor]:
    if _direct(plan):
        return _backends.get(plan.backend).attention_with_kvcache(plan.call)
    return _kvcache_op(*_kvcache_args(plan.call, plan.backend))


def rotate(plan) -> Tensor:
    if _direct(plan):
        return _backends.get(plan.backend).rotate(plan.call)
    return _rotate_op(*_rotation_args(plan.call, plan.backend))
