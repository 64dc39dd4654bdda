"""`scaled_rope_attention_with_kvcache`: decode and chunked prefill over a cache of UNROTATED keys.

Serving engines cache keys after rotation, so a LongRoPE request that crosses the original length (short -> long
factors) or a dynamic-NTK request whose base moves invalidates every cached key. Here the cache holds unrotated
keys and the kernel rotates them as it reads them, each batch row with the frequency set of its own length.
"""
from __future__ import annotations

import torch

from . import _ops
from ._plan import kvcache_plan
from .scaling import RopeScaling


def scaled_rope_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       rope: RopeScaling | None, *, cache_seqlens: torch.Tensor,
                                       k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                                       block_table: torch.Tensor | None = None, causal: bool = True,
                                       window: int | None = None, softmax_scale: float | None = None,
                                       rerope_window: int | None = None, rerope_leak: float | None = None,
                                       logn_base: float | None = None, xpos_scale_base: float | None = None,
                                       return_lse: bool = False, backend: str = "auto"):
    """Attention of new queries over a cache of unrotated keys (decode, chunked prefill, speculative checks).

    Shapes (flash-attn's `flash_attn_with_kvcache` layout)::

        q: (B, Nq, Hq, D)
        k_cache, v_cache: (B, N, Hkv, D), or paged (num_pages, page_size, Hkv, D) with
        block_table: (B, max_pages) int32 or int64 (page_size a power of two in 16..256)
        cache_seqlens: (B,) int32 or int64, tokens already in each row
        k_new, v_new: (B, Nnew, Hkv, D), unrotated; written into the caches at cache_seqlens, in place
        out: (B, Nq, Hq, D)   lse: (B, Hq, Nq) float32 (with return_lse=True)

    Row b then has L = cache_seqlens[b] + Nnew keys at positions 0..L-1 and its queries sit at L-Nq..L-1
    (bottom-right aligned). Keys are rotated on-chip with the frequencies of length L (LongRoPE short/long set,
    dynamic NTK base), so a row that crosses the original length switches exactly with no cache rebuild.
    causal, window, softmax_scale, rerope_window, rerope_leak, logn_base and xpos_scale_base mean what they mean in
    `scaled_rope_attention`. backend: "auto" (triton -> reference), "triton", "reference"; "cuda" has no KV-cache
    kernel and raises BackendUnsupported. No backward: with a gradient required, backward raises.

    Lengths are checked without a host synchronisation on CUDA: every row must satisfy
    0 <= cache_seqlens[b] and cache_seqlens[b] + Nnew <= capacity (N, or max_pages * page_size). On CPU tensors,
    and with backend="reference", a violation raises ValueError before anything is written. With the Triton
    backend on CUDA (and inside CUDA-graph capture) the kernels check each row on the device: a violating row
    writes nothing to the cache, reads no key, gets NaN in out and lse, and a device-side assertion
    (`torch._assert_async` on a per-device flag) fails, so the error surfaces as a CUDA "device-side assert
    triggered" at the next synchronisation, as an out-of-range index does in PyTorch; no memory outside the
    cache is touched and no wrong value is returned silently. The append kernel also refuses page ids outside
    the cache; block_table entries the kernel reads below a row's length must be page ids of the cache.

    torch.compile(fullgraph=True) traces the call without a graph break (custom op
    scaled_rope::attention_with_kvcache, which declares that it mutates k_cache and v_cache); with the Triton
    backend on CUDA a step also captures in a CUDA graph (no host synchronisation, fixed-size allocations).
    """
    plan = kvcache_plan(q, k_cache, v_cache, rope, cache_seqlens=cache_seqlens, k_new=k_new, v_new=v_new,
                        block_table=block_table, causal=causal, window=window, softmax_scale=softmax_scale,
                        rerope_window=rerope_window, rerope_leak=rerope_leak, logn_base=logn_base, backend=backend,
                        xpos_scale_base=xpos_scale_base)
    out, lse = _ops.attention_with_kvcache(plan)
    return (out, lse) if return_lse else out
