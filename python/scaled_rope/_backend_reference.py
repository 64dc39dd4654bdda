"""The reference backend: scaled_rope.reference (plain PyTorch, any device and float dtype), for every operation.

It rotates from the RopeScaling itself, not from kernel tables. Called directly (eager mode) it keeps plain torch
autograd; inside the custom ops (torch.compile), where autograd does not record, its backward is the reference's
written-out one (`reference.attention_backward`, held to autograd by the tests).
"""
from __future__ import annotations

import torch

from . import reference
from ._backends import AttentionCall, Backend, KVCacheCall, RotationCall


def _options(call: AttentionCall) -> dict:
    return dict(causal=call.causal, q_positions=call.q_positions, k_positions=call.k_positions, window=call.window,
                softmax_scale=call.softmax_scale, rerope_window=call.rerope_window, rerope_leak=call.rerope_leak,
                logn_base=call.logn_base, xpos_scale_base=call.xpos_scale_base)


def check_lengths(cache_seqlens: torch.Tensor, n_new: int, capacity: int) -> int | None:
    """Host check of 0 <= cache_seqlens and cache_seqlens + Nnew <= capacity (one synchronisation; free for CPU
    tensors). Returns the longest row after the append (None for an empty batch)."""
    if cache_seqlens.numel() == 0:
        return None
    lo, hi = torch.stack([cache_seqlens.min(), cache_seqlens.max()]).tolist()
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {lo}")
    if hi + n_new > capacity:
        raise ValueError(f"cache_seqlens + Nnew ({hi} + {n_new}) exceeds the cache capacity of {capacity} tokens "
                         f"per row")
    return hi + n_new


def capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Tokens one row of the cache can hold: N, or max_pages * page_size when paged."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def _token_index(cache_seqlens: torch.Tensor, n: int, block_table: torch.Tensor | None, page_size: int):
    """(row or page index, slot) of tokens cache_seqlens[b] + 0..n-1, each (B, n) int64."""
    pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(n, device=cache_seqlens.device)[None, :]
    if block_table is None:
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
        return rows, pos
    return block_table.to(torch.int64).gather(1, pos // page_size), pos % page_size


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


class ReferenceBackend(Backend):
    name = "reference"
    needs_tables = False
    xpos_modes = {"attention": ("default", "explicit"), "kvcache": ("default",)}

    def attention_support(self, device, dtype, head_dim):
        return None

    def attention_forward(self, call: AttentionCall):
        out, lse = reference.attention(call.q, call.k, call.v, call.rope, **_options(call))
        return out, lse, None

    def attention_backward(self, call: AttentionCall, out, lse, residual, dout, dlse):
        return reference.attention_backward(call.q, call.k, call.v, call.rope, dout, dlse, **_options(call))

    def kvcache_support(self, device, dtype, head_dim):
        return None

    def attention_with_kvcache(self, call: KVCacheCall):
        n_new = 0 if call.k_new is None else call.k_new.shape[1]
        check_lengths(call.cache_seqlens, n_new, capacity(call.k_cache, call.block_table))
        if call.k_new is not None:
            where, slot = _token_index(call.cache_seqlens, n_new, call.block_table, call.k_cache.shape[1])
            call.k_cache[where, slot] = call.k_new
            call.v_cache[where, slot] = call.v_new
        return reference_with_kvcache(call.q, call.k_cache, call.v_cache, call.rope,
                                      seqlens=call.cache_seqlens + n_new, block_table=call.block_table,
                                      causal=call.causal, window=call.window, softmax_scale=call.softmax_scale,
                                      rerope_window=call.rerope_window, rerope_leak=call.rerope_leak,
                                      logn_base=call.logn_base, xpos_scale_base=call.xpos_scale_base)

    def rotation_support(self, device, dtype):
        return None

    def rotate(self, call: RotationCall):
        lens = call.seq_lens
        if isinstance(lens, torch.Tensor):
            lens = lens.tolist()
        elif lens is not None:
            lens = [lens] * call.x.shape[0]
        return reference.apply_scaled_rope(call.x, call.rope, call.positions, seq_lens=lens, inverse=call.inverse)
