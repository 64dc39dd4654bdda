"""`scaled_rope_attention_with_kvcache`: decode and chunked prefill over a cache of UNROTATED keys.

Serving engines cache keys after rotation, so a LongRoPE request that crosses the original length (short -> long
factors) or a dynamic-NTK request whose base moves invalidates every cached key. Here the cache holds unrotated
keys and the kernel rotates them as it reads them, each batch row with the frequency set of its own length.
"""
from __future__ import annotations


import torch

from . import reference
from .attention import BACKENDS, _check_input, _check_rope, _check_tensor, _triton_reason, validate_options
from .scaling import RopeScaling


# ---- validation ---------------------------------------------------------------------------------------------
def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_index(name: str, x, ndim: int, shape_text: str, batch: int, device: torch.device) -> None:
    """An int32 tensor of ndim dims with one row per batch row, on q's device."""
    _check_tensor(name, x, ndim)
    if x.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")
    if x.shape[0] != batch:
        raise ValueError(f"{name} must have shape {shape_text}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")


def _validate(q, k_cache, v_cache, rope, cache_seqlens, k_new, v_new, block_table, causal, window, softmax_scale,
              rerope_window, rerope_leak, logn_base, backend) -> int:
    """Raise TypeError/ValueError naming the argument; returns the capacity of one row in tokens."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_input(name, x)
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    batch, n_q, n_heads, dim = q.shape
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
            if x.shape[0] != batch or x.shape[2:] != k_cache.shape[2:]:
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
        capacity = k_cache.shape[1]
    else:
        _check_index("block_table", block_table, 2, f"(B={batch}, max_pages)", batch, q.device)
        page_size = k_cache.shape[1]
        if not 16 <= page_size <= 256 or page_size & (page_size - 1):
            raise ValueError(f"the page size (k_cache.shape[1] with block_table) must be a power of two in 16..256, "
                             f"got {page_size}")
        capacity = block_table.shape[1] * page_size
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    validate_options(rope, window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                     rerope_leak=rerope_leak, logn_base=logn_base, backend=backend, backends=BACKENDS)
    return capacity


def _check_lengths(cache_seqlens: torch.Tensor, n_new: int, capacity: int) -> int | None:
    """Host check of 0 <= cache_seqlens and cache_seqlens + Nnew <= capacity, for tensors on the CPU (free there)
    and the reference backend; the Triton path on CUDA checks on the device instead (no synchronisation).
    Returns the longest new length (None when skipped)."""
    if _capturing(cache_seqlens.device) or cache_seqlens.numel() == 0:
        return None
    lo, hi = torch.stack([cache_seqlens.min(), cache_seqlens.max()]).tolist()
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {lo}")
    if hi + n_new > capacity:
        raise ValueError(f"cache_seqlens + Nnew ({hi} + {n_new}) exceeds the cache capacity of {capacity} tokens "
                         f"per row")
    return hi + n_new


_STATUS: dict = {}


def _status_flag(device: torch.device) -> torch.Tensor:
    """Per-device int32 flag, 1 until a kernel meets a row outside the cache (then 0 for good: the assertion on
    it has failed and CUDA's context with it). Made outside CUDA-graph capture, where its fill would not run."""
    flag = _STATUS.get(device)
    if flag is None:
        flag = torch.ones(1, dtype=torch.int32, device=device)
        if not _capturing(device):
            _STATUS[device] = flag
    return flag


def _resolve(backend: str, q: torch.Tensor) -> str:
    if backend == "cuda":
        raise NotImplementedError("backend='cuda' has no KV-cache decode kernel yet; use backend='triton' or "
                                  "'auto'")
    if backend == "reference":
        return backend
    reason = _triton_reason(q)
    if backend == "auto":
        return "reference" if reason is not None else "triton"
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}")
    return backend


# ---- cache write and gather ---------------------------------------------------------------------------------
def _token_index(cache_seqlens: torch.Tensor, n: int, block_table: torch.Tensor | None, page_size: int):
    """(row or page index, slot) of tokens cache_seqlens[b] + 0..n-1, each (B, n) int64, without host sync."""
    pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(n, device=cache_seqlens.device)[None, :]
    if block_table is None:
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
        return rows, pos
    return block_table.to(torch.int64).gather(1, pos // page_size), pos % page_size


def append_to_cache(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None) -> None:
    """Write k_new, v_new (B, Nnew, Hkv, D) into the caches at cache_seqlens, in place (reference backend; the
    Triton path uses one append kernel)."""
    where, slot = _token_index(cache_seqlens, k_new.shape[1], block_table, k_cache.shape[1])
    k_cache[where, slot] = k_new
    v_cache[where, slot] = v_new


def gather_row(cache: torch.Tensor, b: int, length: int, block_table: torch.Tensor | None) -> torch.Tensor:
    """Row b's first `length` tokens as a contiguous (length, Hkv, D) tensor."""
    if block_table is None:
        return cache[b, :length]
    page_size = cache.shape[1]
    pages = block_table[b, :-(-length // page_size)].to(torch.int64)
    return cache[pages].reshape(-1, *cache.shape[2:])[:length]


def reference_with_kvcache(q, k_cache, v_cache, rope, *, seqlens, block_table=None, compute_dtype=None,
                           **options):
    """Reference over the cache as it is: row b has keys 0..seqlens[b]-1, queries at the last Nq positions.

    Gathers each row into contiguous tensors and calls `reference.attention` with explicit positions (so
    length-dependent schedules see the row's own length). Returns (out (B, Nq, Hq, D), lse (B, Hq, Nq)).
    """
    n_q = q.shape[1]
    outs, lses = [], []
    for b, length in enumerate(seqlens.tolist()):
        k = gather_row(k_cache, b, length, block_table)[None]
        v = gather_row(v_cache, b, length, block_table)[None]
        k_pos = torch.arange(length, device=q.device)[None]
        q_pos = torch.arange(length - n_q, length, device=q.device)[None]
        out, lse = reference.attention(q[b:b + 1], k, v, rope, q_positions=q_pos, k_positions=k_pos,
                                       compute_dtype=compute_dtype, **options)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


# ---- public API ---------------------------------------------------------------------------------------------
def scaled_rope_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       rope: RopeScaling | None, *, cache_seqlens: torch.Tensor,
                                       k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                                       block_table: torch.Tensor | None = None, causal: bool = True,
                                       window: int | None = None, softmax_scale: float | None = None,
                                       rerope_window: int | None = None, rerope_leak: float | None = None,
                                       logn_base: float | None = None, return_lse: bool = False,
                                       backend: str = "auto"):
    """Attention of new queries over a cache of unrotated keys (decode, chunked prefill, speculative checks).

    Shapes (flash-attn's `flash_attn_with_kvcache` layout)::

        q: (B, Nq, Hq, D)
        k_cache, v_cache: (B, N, Hkv, D), or paged (num_pages, page_size, Hkv, D) with
        block_table: (B, max_pages) int32 (page_size a power of two in 16..256)
        cache_seqlens: (B,) int32, tokens already in each row
        k_new, v_new: (B, Nnew, Hkv, D), unrotated; written into the caches at cache_seqlens, in place
        out: (B, Nq, Hq, D)   lse: (B, Hq, Nq) float32 (with return_lse=True)

    Row b then has L = cache_seqlens[b] + Nnew keys at positions 0..L-1 and its queries sit at L-Nq..L-1
    (bottom-right aligned). Keys are rotated on-chip with the frequencies of length L (LongRoPE short/long set,
    dynamic NTK base), so a row that crosses the original length switches exactly with no cache rebuild.
    causal, window, softmax_scale, rerope_window, rerope_leak and logn_base mean what they mean in
    `scaled_rope_attention`. backend: "auto" (triton -> reference), "triton", "reference"; "cuda" is not
    implemented for the cache yet.

    Lengths are checked without a host synchronisation on CUDA: every row must satisfy
    0 <= cache_seqlens[b] and cache_seqlens[b] + Nnew <= capacity (N, or max_pages * page_size). On CPU tensors,
    and with backend="reference", a violation raises ValueError before anything is written. With the Triton
    backend on CUDA (and inside CUDA-graph capture) the kernels check each row on the device: a violating row
    writes nothing to the cache, reads no key, gets NaN in out and lse, and a device-side assertion
    (`torch._assert_async` on a per-device flag) fails, so the error surfaces as a CUDA "device-side assert
    triggered" at the next synchronisation, as an out-of-range index does in PyTorch; no memory outside the
    cache is touched and no wrong value is returned silently. The append kernel also refuses page ids outside
    the cache; block_table entries the kernel reads below a row's length must be page ids of the cache.
    """
    capacity = _validate(q, k_cache, v_cache, rope, cache_seqlens, k_new, v_new, block_table, causal, window,
                         softmax_scale, rerope_window, rerope_leak, logn_base, backend)
    chosen = _resolve(backend, q)
    n_new = 0 if k_new is None else k_new.shape[1]
    options = dict(causal=causal, window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                   logn_base=logn_base)
    if chosen == "reference":
        _check_lengths(cache_seqlens, n_new, capacity)
        if k_new is not None:
            append_to_cache(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
        out, lse = reference_with_kvcache(q, k_cache, v_cache, rope, seqlens=cache_seqlens + n_new,
                                          block_table=block_table, rerope_leak=rerope_leak, **options)
        return (out, lse) if return_lse else out

    from .tables import cached_tables
    from .triton_kernels.decode import append_to_cache as append_kernel
    from .triton_kernels.decode import decode_attention

    # lengths: checked on the host only where that costs no synchronisation; on CUDA the kernels check each row
    on_device = q.device.type == "cuda"
    max_seqlen = None if on_device else _check_lengths(cache_seqlens, n_new, capacity)
    status = _status_flag(q.device) if on_device else None
    tables = q_far = k_far = None
    if rope is not None:
        lens = cache_seqlens if rope.length_dependent else None  # per-row lengths matter only to these
        tables = cached_tables(rope, q.shape[0], q.device, seq_lens=lens, added=n_new)
        if rerope_window is not None:
            far = dict(seq_lens=lens, added=n_new, rerope_window=rerope_window, rerope_leak=rerope_leak)
            q_far = cached_tables(rope, q.shape[0], q.device, far="q", **far)
            k_far = cached_tables(rope, q.shape[0], q.device, far="k", **far)
    if k_new is not None:
        append_kernel(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, status=status)
    out, lse = decode_attention(q, k_cache, v_cache, cache_seqlens, tables, n_new=n_new, status=status,
                                block_table=block_table, q_far_tables=q_far, k_far_tables=k_far,
                                rerope_leak=rerope_leak, max_seqlen=max_seqlen, **options)
    if status is not None:
        torch._assert_async(status, "scaled_rope_attention_with_kvcache: cache_seqlens + Nnew outside "
                                    "0..capacity (or a page id outside the cache)")
    return (out, lse) if return_lse else out
