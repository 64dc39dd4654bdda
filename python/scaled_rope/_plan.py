"""The plan of a call: its arguments checked once, the backend chosen (with the reason), softmax_scale folded, the
position mode and the rotation tables, built by one function per entry point.

Everything here is plain Python over tensor metadata and hashable values, so that torch.compile traces it without
a graph break: the backend choice and the tables that depend only on hashable values are constants of the graph
(scaled_rope._backends.choose, scaled_rope.tables), and tables that depend on a device tensor are tensor ops.
The head dim and the ReRoPE window pass through operator.index, which under torch.compile(dynamic=True) turns a
symbolic size into a constant (a guard) that those can take.
Every unsupported argument raises a TypeError or ValueError that names it (docs/DESIGN.md §2.4).
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch

from . import _backends
from ._backends import AttentionCall, KVCacheCall, RotationCall
from ._scale import fold_scale_sign
from .scaling import RopeScaling
from .tables import rope_facts, table_set

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_LENGTH = 2 ** 30  # positions and their differences are int32 in the kernels


class AttentionPlan(NamedTuple):
    backend: str
    passed_over: dict  # faster backends "auto" did not take, and why
    needs_grad: bool
    call: AttentionCall


class KVCachePlan(NamedTuple):
    backend: str
    passed_over: dict
    needs_grad: bool
    call: KVCacheCall


class RotationPlan(NamedTuple):
    backend: str
    passed_over: dict
    needs_grad: bool
    call: RotationCall


# ---- checks ---------------------------------------------------------------------------------------------------
def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_input(name: str, x) -> None:
    """A 4-d float tensor with a contiguous last dimension (q, k, v, x and the KV caches)."""
    _check_tensor(name, x, 4)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}")


def _check_qkv(q, k, v, key_length: str) -> None:
    """q (B, Nq, Hq, D), k and v (B, <key_length>, Hkv, D): inputs of one dtype and device, Hq a multiple of Hkv."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_input(name, x)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, _, hq, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"k must be (B={batch}, {key_length}, Hkv, D={dim}), got {tuple(k.shape)}")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[2]})")


def _check_positions(name: str, pos, batch: int, length: int, device: torch.device) -> None:
    if pos is None:
        return
    _check_tensor(name, pos, 2)
    if pos.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be an int32 or int64 tensor, got {pos.dtype}")
    if pos.shape[0] != batch or pos.shape[1] != length:
        raise ValueError(f"{name} must have shape {(batch, length)}, got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but q is on {device}")


def _check_index(name: str, x, ndim: int, shape_text: str, batch: int, device: torch.device) -> None:
    """An int32 or int64 tensor of ndim dims with one row per batch row, on q's device."""
    _check_tensor(name, x, ndim)
    if x.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be an int32 or int64 tensor, got {x.dtype}")
    if x.shape[0] != batch:
        raise ValueError(f"{name} must have shape {shape_text}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")


def _check_rope(rope, dim: int, name: str = "q") -> None:
    if rope is None:
        return
    if not isinstance(rope, RopeScaling):
        raise TypeError(f"rope must be a RopeScaling or None, got {type(rope).__name__}")
    head_dim = rope_facts(rope).head_dim
    if head_dim != dim:
        raise ValueError(f"rope.head_dim ({head_dim}) does not match the head dim of {name} ({dim})")


def _optional_positive_int(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _check_options(rope, *, causal, window, softmax_scale, rerope_window, rerope_leak, logn_base, backend) -> None:
    """Checks shared by the attention entry points for the scalar options of docs/DESIGN.md §3."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _optional_positive_int("window", window)
    _optional_positive_int("rerope_window", rerope_window)
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if rerope_leak is not None:
        if rerope_window is None:
            raise ValueError("rerope_leak needs rerope_window")
        # below 1 the far side grows (inverse Leaky ReRoPE: train with it, infer with plain RoPE)
        if not (isinstance(rerope_leak, (int, float)) and not isinstance(rerope_leak, bool)
                and math.isfinite(rerope_leak) and rerope_leak > 0):
            raise ValueError(f"rerope_leak must be a finite number > 0 or None, got {rerope_leak!r}")
    if rerope_window is not None:
        if rope is None:
            raise ValueError("rerope_window needs a rope (rope=None means no rotation at all)")
        if rope_facts(rope).n_hat:
            raise ValueError("rerope_window cannot be combined with n_hat > 0 (rope.n_hat)")
    if logn_base is not None and not (isinstance(logn_base, (int, float)) and math.isfinite(logn_base)
                                      and logn_base > 1):
        raise ValueError(f"logn_base must be a finite number > 1 or None, got {logn_base!r}")
    _check_backend(backend)


XPOS_MIN_SCALE_BASE = 32.0


def _check_xpos(xpos_scale_base, rope, causal, rerope_window) -> None:
    """xPos (docs/DESIGN.md §3.9): a finite scale base >= 32, so that the kernels' per-tile factors stay within
    ~2^7 of 1 (torchscale's default is 512); a rope, causal attention and no ReRoPE (reference.check_xpos)."""
    if xpos_scale_base is None:
        return
    if isinstance(xpos_scale_base, bool) or not isinstance(xpos_scale_base, (int, float)) or \
            not math.isfinite(xpos_scale_base) or xpos_scale_base < XPOS_MIN_SCALE_BASE:
        raise ValueError(f"xpos_scale_base must be a finite number >= {XPOS_MIN_SCALE_BASE:g} or None, got "
                         f"{xpos_scale_base!r}")
    from .reference import check_xpos

    check_xpos(rope, causal, rerope_window)


def _check_backend(backend) -> None:
    if backend not in _backends.NAMES:
        raise ValueError(f"backend must be one of {_backends.NAMES}, got {backend!r}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _tables(rope, choice: _backends.Choice, device: torch.device, lengths, *, added: int = 0, rerope_window=None,
            rerope_leak=None):
    """The kernels' tables (None without a rope, and for the reference, which rotates from the rope itself).
    lengths() gives each row's length; it is asked only for a length-dependent schedule."""
    if rope is None or not choice.needs_tables:
        return None
    return table_set(rope, device, lengths=lengths() if rope_facts(rope).length_dependent else None, added=added,
                     rerope_window=rerope_window, rerope_leak=None if rerope_leak is None else float(rerope_leak))


# ---- attention --------------------------------------------------------------------------------------------------
def attention_plan(q, k, v, rope, *, causal, q_positions, k_positions, window, softmax_scale, rerope_window,
                   rerope_leak, logn_base, backend, xpos_scale_base=None) -> AttentionPlan:
    _check_qkv(q, k, v, "Nk")
    batch, nq, hq, dim = q.shape
    nk = k.shape[1]
    if nq >= MAX_LENGTH or nk >= MAX_LENGTH:
        raise ValueError(f"q and k lengths must be < 2**30, got {nq} and {nk}")
    if batch * hq * -(-max(nq, nk) // 16) >= 2 ** 31:  # programs of a 1-D grid (tiles of >= 16 rows)
        raise ValueError(f"batch * heads * ceil(length / 16) must be < 2**31, got batch {batch}, heads {hq}, "
                         f"lengths {nq} and {nk}")
    _check_rope(rope, dim)
    _check_positions("q_positions", q_positions, batch, nq, q.device)
    _check_positions("k_positions", k_positions, batch, nk, q.device)
    _check_options(rope, causal=causal, window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                   rerope_leak=rerope_leak, logn_base=logn_base, backend=backend)
    _check_xpos(xpos_scale_base, rope, causal, rerope_window)

    needs_grad = _needs_grad(q, k, v)
    xpos = None if xpos_scale_base is None else \
        ("default" if q_positions is None and k_positions is None else "explicit")
    choice = _backends.resolve("attention", backend, q.device, q.dtype, operator.index(dim), needs_grad, xpos)
    rerope_window = None if rerope_window is None else operator.index(rerope_window)
    scale = dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    q_sign, kernel_scale = fold_scale_sign(scale)
    # a row's length (for LongRoPE's set and the dynamic NTK base) is its largest key position + 1
    tables = _tables(rope, choice, q.device,
                     lambda: nk if k_positions is None or nk == 0 else k_positions.amax(dim=1) + 1,
                     rerope_window=rerope_window, rerope_leak=rerope_leak)
    call = AttentionCall(q, k, v, q_positions, k_positions, tables, rope, causal, window, rerope_window,
                         None if rerope_leak is None else float(rerope_leak),
                         None if logn_base is None else float(logn_base), scale, q_sign, kernel_scale,
                         None if xpos_scale_base is None else float(xpos_scale_base))
    return AttentionPlan(choice.backend, choice.passed_over, needs_grad, call)


# ---- attention over a KV cache ------------------------------------------------------------------------------------
def kvcache_plan(q, k_cache, v_cache, rope, *, cache_seqlens, k_new, v_new, block_table, causal, window,
                 softmax_scale, rerope_window, rerope_leak, logn_base, backend, xpos_scale_base=None) -> KVCachePlan:
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_input(name, x)
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    batch, _, n_heads, dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    n_kv = k_cache.shape[2]
    if k_cache.shape[3] != dim:
        raise ValueError(f"k_cache head dim ({k_cache.shape[3]}) does not match q's ({dim})")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"q heads ({n_heads}) must be a multiple of k_cache heads ({n_kv})")
    _check_rope(rope, dim)
    _check_index("cache_seqlens", cache_seqlens, 1, f"({batch},)", batch, q.device)
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            _check_tensor(name, x, 4)
            if x.shape[0] != batch or x.shape[2] != n_kv or x.shape[3] != dim:
                raise ValueError(f"{name} must be (B={batch}, Nnew, Hkv={n_kv}, D={dim}), got {tuple(x.shape)}")
            if x.dtype != q.dtype or x.device != q.device:
                raise ValueError(f"{name} must have q's dtype and device, got {x.dtype} on {x.device}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"k_new and v_new must have the same shape, got {tuple(k_new.shape)} and "
                             f"{tuple(v_new.shape)}")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache must be (B={batch}, N, Hkv, D) without block_table, got "
                             f"{tuple(k_cache.shape)}")
    else:
        _check_index("block_table", block_table, 2, f"(B={batch}, max_pages)", batch, q.device)
        page_size = k_cache.shape[1]
        if not 16 <= page_size <= 256 or page_size & (page_size - 1):
            raise ValueError(f"the page size (k_cache.shape[1] with block_table) must be a power of two in 16..256, "
                             f"got {page_size}")
    _check_options(rope, causal=causal, window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                   rerope_leak=rerope_leak, logn_base=logn_base, backend=backend)
    _check_xpos(xpos_scale_base, rope, causal, rerope_window)

    needs_grad = _needs_grad(q, k_cache, v_cache, k_new, v_new)
    choice = _backends.resolve("kvcache", backend, q.device, q.dtype, operator.index(dim), needs_grad,
                               None if xpos_scale_base is None else "default")
    rerope_window = None if rerope_window is None else operator.index(rerope_window)
    n_new = 0 if k_new is None else k_new.shape[1]
    tables = _tables(rope, choice, q.device, lambda: cache_seqlens, added=n_new,
                     rerope_window=rerope_window, rerope_leak=rerope_leak)
    call = KVCacheCall(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, tables, rope, causal, window,
                       rerope_window, None if rerope_leak is None else float(rerope_leak),
                       None if logn_base is None else float(logn_base),
                       dim ** -0.5 if softmax_scale is None else float(softmax_scale),
                       None if xpos_scale_base is None else float(xpos_scale_base))
    return KVCachePlan(choice.backend, choice.passed_over, needs_grad, call)


# ---- the standalone rotation ------------------------------------------------------------------------------------
def rotation_plan(x, rope, positions, *, seq_lens, inverse, backend) -> RotationPlan:
    _check_input("x", x)
    if not isinstance(rope, RopeScaling):
        raise TypeError(f"rope must be a RopeScaling, got {type(rope).__name__}")
    _check_rope(rope, x.shape[-1], "x")
    batch, n = x.shape[:2]
    _check_positions("positions", positions, batch, n, x.device)
    if isinstance(seq_lens, torch.Tensor):
        _check_index("seq_lens", seq_lens, 1, f"({batch},)", batch, x.device)
    elif seq_lens is not None and (isinstance(seq_lens, bool) or not isinstance(seq_lens, int)):
        raise ValueError(f"seq_lens must be an int, an int tensor ({batch},) or None, got {seq_lens!r}")
    if not isinstance(inverse, bool):
        raise TypeError(f"inverse must be a bool, got {type(inverse).__name__}")
    _check_backend(backend)

    needs_grad = _needs_grad(x)
    choice = _backends.resolve("rotation", backend, x.device, x.dtype, operator.index(x.shape[-1]), needs_grad)
    tables = _tables(rope, choice, x.device, lambda: seq_lens)
    if tables is not None and positions is None:  # the kernels take positions as a tensor
        positions = torch.arange(n, device=x.device, dtype=torch.int32).expand(batch, n)
    call = RotationCall(x, positions, None if tables is None else tables.near, rope, seq_lens, inverse)
    return RotationPlan(choice.backend, choice.passed_over, needs_grad, call)
