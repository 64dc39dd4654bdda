"""Context parallelism: scaled-RoPE attention over a sequence split across the ranks of a torch.distributed group.

Two schemes, both differentiable (out and lse) and both built on `scaled_rope_attention` for the per-rank work:

`context_parallel_attention` (ring)
    Each rank keeps its query shard; the K/V shards travel around the ring (rank r sends to r+1), one hop per step,
    W-1 hops in all. While a rank attends its queries to the K/V block it holds, the next block is already in
    flight (P2P through `dist.batch_isend_irecv`). The partial results of the blocks are merged by their lse.
    Backward sends the K/V blocks around again together with float32 dK/dV accumulators: each rank adds its
    contribution to the accumulator of the block it holds and passes it on; the finished accumulator goes home.
    Block pairs that the causal mask or a window make empty are not computed, and a block is only forwarded as far
    along the ring as the last rank that needs it (decided on the host from the positions' min/max).

`ulysses_attention` (all-to-all, head parallel)
    Three all-to-alls turn the sequence shards of q, k, v into head shards of the whole sequence; each rank runs
    ordinary full-sequence attention on H/W heads; one all-to-all brings the output (and lse) back to sequence
    shards. Needs Hq and Hkv divisible by the world size.

Which wins (per layer, per rank, forward; D head dim, N the whole sequence, W ranks, b bytes per element):
    ring     sends its K and V blocks on W-1 times: 2*(W-1)*(N/W)*Hkv*D*b, all of it overlapped with compute (each
             step moves the next block while the current one is attended); backward moves K/V again plus float32
             dK/dV accumulators (about 3x the forward's bytes, against 2.5x its FLOPs). The transfer hides behind
             the compute when a step's attention (4*(N/W)^2*Hq*D FLOPs for a whole block pair, half of that for the
             half pairs of zigzag causal sharding) takes longer than moving 2*(N/W)*Hkv*D*b bytes, i.e. for
             N/W >= b*Hkv/Hq * FLOP/s / (2 * bytes/s) tokens (twice that for half pairs): with ~500 TFLOP/s bf16
             and ~400 GB/s per direction of H200 NVLink, about 1.3k (2.5k) tokens per rank for MHA, fewer for GQA.
             At 128k+ tokens on 2-8 GPUs the ring is compute-bound. Any head count, any W.
    ulysses  moves q, k, v and out once each through all-to-all: about (2*Hq + 2*Hkv)*(N/W)*D*b*(W-1)/W per rank,
             not overlapped with compute, independent of the number of steps. It is less data than the ring for
             MHA when W > 2 and keeps one full-sequence kernel per head shard (no merge passes, no per-block
             launches), but needs Hq % W == 0 and Hkv % W == 0 (GQA with few K/V heads caps W at Hkv), and each
             rank holds the whole sequence for H/W heads (activation memory N*H*D/W, same as the ring's).
    Rule of thumb: Ulysses when the heads divide evenly and the interconnect is all-to-all (NVSwitch within a node);
    the ring across nodes, for GQA with W > Hkv, or when W does not divide the heads. They compose (Ulysses within a
    node, ring across nodes), which this module does not do for you.

Positions are global: pass each rank's q_positions / k_positions (B, N_local), or leave them out and say how the
sequence was split with `sharding` ("contiguous": rank r holds tokens [r*N/W, (r+1)*N/W); "zigzag": rank r holds
chunks r and 2W-1-r of 2W equal chunks, which balances causal work). `shard_sequence` / `unshard_sequence` /
`gather_sequence` cut a full sequence into shards and put it back together.

LongRoPE's short/long set and the dynamic NTK base follow each batch row's *global* length (largest key position
over all ranks + 1): the ring builds, per row, a RopeScaling with those frequencies fixed (`fixed_length_rope`) and
gives it to every block call, so a block that sees only early keys still uses the set of the whole sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.distributed as dist

from ._plan import _check_options, _check_qkv, _check_rope
from .attention import scaled_rope_attention
from .scaling import RopeScaling

__all__ = ["context_parallel_attention", "ulysses_attention", "fixed_length_rope", "sequence_indices",
           "shard_sequence", "unshard_sequence", "gather_sequence", "SHARDINGS"]

SHARDINGS = ("contiguous", "zigzag")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tests set this to a list to record what the ring does: ("call", pass, step, source, q_lo, q_hi, k_lo, k_hi),
# ("post", pass, step, phase, kind, peer, sends, recvs) and ("wait", pass, step, phase).
_TRACE: list | None = None


def _trace(*event) -> None:
    if _TRACE is not None:
        _TRACE.append(event)


# ---- sharding helpers ---------------------------------------------------------------------------------------
def _check_sharding(sharding: str) -> None:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")


def _check_split(n_total: int, world_size: int, sharding: str, name: str = "n_total") -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    pieces = 2 * world_size if sharding == "zigzag" else world_size
    if n_total % pieces:
        raise ValueError(f"{name}: a sequence of {n_total} tokens cannot be split into {pieces} equal "
                         f"{'chunks (2 per rank, zigzag)' if sharding == 'zigzag' else 'shards'}")


def sequence_indices(n_total: int, rank: int, world_size: int, sharding: str = "zigzag") -> torch.Tensor:
    """Indices (int64, CPU) into a sequence of n_total tokens that rank `rank` holds, in its local order.

    contiguous: [r*n, (r+1)*n) with n = n_total/W; zigzag: chunk r then chunk 2W-1-r of 2W chunks of n_total/(2W)
    (rank 0 holds the first and the last chunk, so causal work is the same on every rank)."""
    _check_sharding(sharding)
    _check_split(n_total, world_size, sharding)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if sharding == "contiguous":
        n = n_total // world_size
        return torch.arange(rank * n, (rank + 1) * n)
    c = n_total // (2 * world_size)
    back = 2 * world_size - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(back * c, (back + 1) * c)])


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, *, sharding: str = "zigzag",
                   dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of a full sequence x along `dim` (a copy)."""
    idx = sequence_indices(x.shape[dim], rank, world_size, sharding).to(x.device)
    return x.index_select(dim, idx)


def unshard_sequence(shards: Sequence[torch.Tensor], *, sharding: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard (in rank order): the inverse of `shard_sequence`."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("shards must hold one tensor per rank, got none")
    n_local = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"shards must all have one shape, got {[tuple(s.shape) for s in shards]}")
    n_total = n_local * world_size
    order = torch.cat([sequence_indices(n_total, r, world_size, sharding) for r in range(world_size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n_total)
    return torch.cat(list(shards), dim=dim).index_select(dim, inverse.to(shards[0].device))


def gather_sequence(x: torch.Tensor, group=None, *, sharding: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """All-gather every rank's shard of `x` and return the full sequence on every rank (not differentiable).
    Every rank's shard must have the same shape."""
    group = _group(group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_sequence(parts, sharding=sharding, dim=dim)


# ---- frequencies of the global length -----------------------------------------------------------------------
@lru_cache(maxsize=256)
def fixed_length_rope(rope: RopeScaling | None, seq_len: int) -> RopeScaling | None:
    """A RopeScaling whose rotation equals `rope`'s for a row of length seq_len, whatever the keys a call sees.

    Schedules that do not depend on the length come back unchanged. LongRoPE becomes `from_factors` with the set
    that seq_len selects (short for seq_len <= the original length, long above) and that set's attention factor,
    keeping base, rotary_dim, layout and n_hat: positions below n_hat still take the unscaled frequencies and
    m = 1, and the frequencies w0_i / lambda_i are computed by the same float64 expression. Dynamic NTK becomes
    `from_inv_freq` with the frequencies of seq_len."""
    if rope is None or not rope.length_dependent:
        return rope
    inv_freq, factor = rope.frequencies(seq_len)
    if rope.kind == "longrope":
        which = "long" if rope.uses_long_factors(seq_len) else "short"
        return RopeScaling.from_factors(rope.head_dim, rope.param(f"{which}_factors"), n_hat=rope.n_hat,
                                        attention_factor=factor, base=rope.base, rotary_dim=rope.rotary_dim,
                                        layout=rope.layout)
    if rope.kind == "dynamic_ntk":
        if rope.n_hat:
            raise NotImplementedError("rope: dynamic NTK with n_hat > 0 has no fixed-frequency equivalent here")
        return RopeScaling.from_inv_freq(inv_freq, factor, head_dim=rope.head_dim, layout=rope.layout)
    raise NotImplementedError(f"rope: length-dependent schedule {rope.kind!r} is not supported by the ring")


def _rope_key(rope: RopeScaling, seq_len: int):
    """Rows whose keys are equal use the same frequencies."""
    if rope.kind == "longrope":
        return rope.uses_long_factors(seq_len)
    if rope.kind == "dynamic_ntk":
        return max(seq_len, rope.param("original_max_position"))
    return seq_len


# ---- validation ---------------------------------------------------------------------------------------------
def _group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call dist.init_process_group first)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return dist.group.WORLD if group is None else group


def _validate(q, k, v, rope, *, causal, q_positions, k_positions, window, softmax_scale, rerope_window,
              rerope_leak, logn_base, backend, sharding) -> None:
    _check_qkv(q, k, v, "N_local")
    batch, nq, hq, dim = q.shape
    if nq == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k: every rank needs at least one token, got N_local {nq} and {k.shape[1]}")
    _check_rope(rope, dim)
    _check_options(rope, causal=causal, window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                   rerope_leak=rerope_leak, logn_base=logn_base, backend=backend)
    for name, pos, n in (("q_positions", q_positions, nq), ("k_positions", k_positions, k.shape[1])):
        if pos is None:
            continue
        if not isinstance(pos, torch.Tensor) or pos.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32 or int64 tensor")
        if tuple(pos.shape) != (batch, n):
            raise ValueError(f"{name} must have shape {(batch, n)}, got {tuple(pos.shape)}")
        if pos.device != q.device:
            raise ValueError(f"{name} is on {pos.device} but q is on {q.device}")
    if sharding is not None:
        _check_sharding(sharding)
        if q_positions is not None and k_positions is not None:
            raise ValueError("sharding only says where the default positions are; with q_positions and "
                             "k_positions both given it would be ignored, so leave it None")
    if (q_positions is None or k_positions is None) and nq != k.shape[1]:
        raise ValueError(f"q_positions / k_positions: default positions need as many local queries as keys, got "
                         f"{nq} and {k.shape[1]}; pass explicit positions")
    if (q_positions is None or k_positions is None) and (sharding or "contiguous") == "zigzag" and nq % 2:
        raise ValueError(f"q: zigzag sharding needs an even local length (two chunks per rank), got {nq}")


def _header(q, k, options: dict, explicit: tuple[bool, bool]) -> list[int]:
    """What every rank of a call must agree on, as ints."""
    dtype_code = _FLOATS.index(q.dtype)
    return [q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], dtype_code,
            int(options["causal"]), options["window"] or 0, options["rerope_window"] or 0, *map(int, explicit)]


_HEADER_NAMES = ("batch", "q N_local", "k N_local", "q heads", "k heads", "head dim", "dtype", "causal", "window",
                 "rerope_window", "q_positions given", "k_positions given")


def _agree(header: list[int], group, device) -> None:
    """Raise the same ValueError on every rank when the ranks disagree on the call's shape or options."""
    world = dist.get_world_size(group)
    mine = torch.tensor(header, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu().tolist()
    for i, name in enumerate(_HEADER_NAMES):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"q/k/v: every rank must call with the same {name}, got {values} (by rank)")


# ---- the plan: which block pairs are computed, how far each block travels -------------------------------------
def _segments(n: int) -> tuple[int, ...]:
    """Local index boundaries of the sub-blocks used to skip empty parts of a block pair (two halves: with zigzag
    sharding they are exactly the two chunks)."""
    return (0, n // 2, n) if n >= 2 else (0, n)


def _may_attend(q_rng, k_rng, causal: bool, window) -> bool:
    """Could some query with positions in q_rng = (min, max) attend to some key in k_rng? (exact for intervals)"""
    d_max = q_rng[1] - k_rng[0]
    d_min = q_rng[0] - k_rng[1]
    if causal and d_max < 0:
        return False
    if window is not None and d_min >= window:
        return False
    return True


@dataclass(frozen=True)
class _Plan:
    calls: tuple  # calls[s]: ((q_lo, q_hi, k_lo, k_hi), ...) of this rank's queries against block s
    last_hop: tuple  # last_hop[s]: ring hops block s travels (0: only its own rank uses it)
    seq_lens: tuple  # each batch row's global length (largest key position + 1)


def _block_calls(active, q_bounds, k_bounds) -> tuple:
    """Kernel calls covering the active sub-block pairs: query segments with the same hull of active key
    segments share a call."""
    if not any(any(row) for row in active):
        return ()
    if all(all(row) for row in active):
        return ((q_bounds[0], q_bounds[-1], k_bounds[0], k_bounds[-1]),)
    calls = []
    for i, row in enumerate(active):
        cols = [j for j, a in enumerate(row) if a]
        if not cols:
            continue
        hull = (cols[0], cols[-1])
        if calls and calls[-1][1] == i and calls[-1][2] == hull:
            calls[-1][1] = i + 1
        else:
            calls.append([i, i + 1, hull])
    return tuple((q_bounds[a], q_bounds[b], k_bounds[h[0]], k_bounds[h[1] + 1]) for a, b, h in calls)


def _make_plan(q_ranges, k_ranges, rank: int, nq: int, nk: int, causal: bool, window) -> _Plan:
    """q_ranges[t][b][i] = (min, max) of rank t's query positions in row b, segment i; k_ranges likewise."""
    world = len(q_ranges)
    q_bounds, k_bounds = _segments(nq), _segments(nk)
    batch = len(q_ranges[0])
    need = [[False] * world for _ in range(world)]
    calls = []
    for t in range(world):
        for s in range(world):
            active = [[any(_may_attend(q_ranges[t][b][i], k_ranges[s][b][j], causal, window) for b in range(batch))
                       for j in range(len(k_bounds) - 1)] for i in range(len(q_bounds) - 1)]
            need[t][s] = any(any(row) for row in active)
            if t == rank:
                calls.append(_block_calls(active, q_bounds, k_bounds))
    last_hop = tuple(max([(t - s) % world for t in range(world) if need[t][s]], default=0) for s in range(world))
    seq_lens = tuple(max(k_ranges[s][b][j][1] for s in range(world) for j in range(len(k_bounds) - 1)) + 1
                     for b in range(batch))
    return _Plan(tuple(calls), last_hop, seq_lens)


@lru_cache(maxsize=64)
def _default_ranges(n_local: int, world: int, sharding: str) -> tuple:
    """Per rank, per segment (min, max) of the default positions (one batch row)."""
    bounds = _segments(n_local)
    out = []
    for t in range(world):
        idx = sequence_indices(n_local * world, t, world, sharding)
        out.append(tuple((int(idx[a:b].min()), int(idx[a:b].max())) for a, b in zip(bounds[:-1], bounds[1:])))
    return tuple(out)


@lru_cache(maxsize=256)
def _default_plan(n_local: int, world: int, rank: int, sharding: str, batch: int, causal: bool, window) -> _Plan:
    ranges = _default_ranges(n_local, world, sharding)
    rows = [[ranges[t]] * batch for t in range(world)]
    return _make_plan(rows, rows, rank, n_local, n_local, causal, window)


def _segment_ranges(pos: torch.Tensor) -> torch.Tensor:
    """(B, segments, 2) min/max of positions per segment."""
    bounds = _segments(pos.shape[1])
    parts = [torch.stack((pos[:, a:b].amin(dim=1), pos[:, a:b].amax(dim=1)), dim=-1)
             for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.stack(parts, dim=1).to(torch.int64)


def _explicit_plan(q_pos, k_pos, group, rank: int, causal: bool, window) -> _Plan:
    """Gather every rank's per-segment position ranges (one small all_gather and one host sync)."""
    world = dist.get_world_size(group)
    mine = torch.cat((_segment_ranges(q_pos), _segment_ranges(k_pos)), dim=1)  # (B, sq + sk, 2)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine.contiguous(), group=group)
    table = torch.stack(parts).cpu().tolist()  # (W, B, sq + sk, 2)
    sq = len(_segments(q_pos.shape[1])) - 1
    q_ranges = [[[tuple(seg) for seg in row[:sq]] for row in rank_rows] for rank_rows in table]
    k_ranges = [[[tuple(seg) for seg in row[sq:]] for row in rank_rows] for rank_rows in table]
    return _make_plan(q_ranges, k_ranges, rank, q_pos.shape[1], k_pos.shape[1], causal, window)


# ---- configuration of one call ------------------------------------------------------------------------------
@dataclass
class _Config:
    group: object
    rank: int
    world: int
    peers: tuple  # global rank of each group rank
    plan: _Plan
    row_groups: tuple  # ((rope, rows tensor or None), ...)
    options: dict  # causal, window, softmax_scale, rerope_window, rerope_leak, logn_base
    backend: str
    acc_dtype: torch.dtype


def _row_groups(rope, seq_lens, device) -> tuple:
    if rope is None or not rope.length_dependent:
        return ((rope, None),)
    keys: dict = {}
    for b, n in enumerate(seq_lens):
        keys.setdefault(_rope_key(rope, n), []).append(b)
    groups = []
    for rows in keys.values():
        fixed = fixed_length_rope(rope, seq_lens[rows[0]])
        index = None if len(rows) == len(seq_lens) else torch.tensor(rows, dtype=torch.int64, device=device)
        groups.append((fixed, index))
    return tuple(groups)


_P2P_READY: set = set()


def _p2p_ready(group) -> None:
    """NCCL wants every rank in the first collective of a group before P2P batches that some ranks skip."""
    if dist.get_backend(group) != "nccl":
        return
    key = id(group)
    if key not in _P2P_READY:
        dist.barrier(group=group)
        _P2P_READY.add(key)


# ---- block calls --------------------------------------------------------------------------------------------
def _rows(x, rows):
    return x if rows is None else x.index_select(0, rows)


def _block_forward(cfg: _Config, q, k, v, q_pos, k_pos, backend=None):
    """(out, lse) of queries q against one K/V block, each batch row with its global-length rope."""
    backend = backend or cfg.backend
    if len(cfg.row_groups) == 1:
        rope = cfg.row_groups[0][0]
        return scaled_rope_attention(q, k, v, rope, q_positions=q_pos, k_positions=k_pos, return_lse=True,
                                     backend=backend, **cfg.options)
    out = q.new_empty(q.shape)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    for rope, rows in cfg.row_groups:
        o, l_ = scaled_rope_attention(_rows(q, rows), _rows(k, rows), _rows(v, rows), rope,
                                      q_positions=_rows(q_pos, rows), k_positions=_rows(k_pos, rows),
                                      return_lse=True, backend=backend, **cfg.options)
        out = out.index_copy(0, rows, o)
        lse = lse.index_copy(0, rows, l_)
    return out, lse


def _merge(out_acc, lse_acc, out_b, lse_b) -> None:
    """In place: (out_acc, lse_acc) <- the softmax over both key sets, from each one's normalised output and lse.
    Rows empty in both stay (0, -inf); the weights exp(lse_x - lse_new) are <= 1."""
    lse_b = lse_b.to(lse_acc.dtype)
    new = torch.logaddexp(lse_acc, lse_b)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w_acc = torch.exp(lse_acc - safe).transpose(1, 2).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).addcmul_(out_b, w_b)
    lse_acc.copy_(new)


def _kernel_backward_api():
    """(attention_plan, triton backend, lse2_from_natural) where this install has the backend plug-ins, else None."""
    try:
        from . import _backends
        from ._plan import attention_plan
        from .triton_kernels.attention import lse2_from_natural
    except ImportError:
        return None
    return attention_plan, _backends, lse2_from_natural


def block_backward_method(backend: str, q: torch.Tensor) -> str:
    """How the ring's backward gets a block's gradients: "kernel" (the Triton backward fed the merged out, lse and
    the upstream gradients of out and lse: its P = exp(S - lse) is then the global softmax restricted to the block
    and its Delta = dO.O - dlse the global one, so it gives the block's share of the gradients directly) or
    "recompute" (the block's forward again under autograd, with rescaled upstream gradients; any backend)."""
    from .attention import explain_backend

    chosen = explain_backend(q, None, needs_grad=True)[0] if backend == "auto" else backend
    if chosen not in ("triton", "cuda"):
        return "recompute"
    api = _kernel_backward_api()
    if api is None:
        return "recompute"
    if api[1].choose("attention", "triton", q.device, q.dtype, q.shape[-1], True).backend != "triton":
        return "recompute"
    return "kernel"


def _grads_kernel(cfg: _Config, q, k, v, q_pos, k_pos, out, lse, dout, dlse):
    attention_plan, backends, lse2_from_natural = _kernel_backward_api()
    triton = backends.get("triton")
    results = []
    for rope, rows in cfg.row_groups:
        qr, kr, vr, qp, kp = (_rows(x, rows) for x in (q, k, v, q_pos, k_pos))
        plan = attention_plan(qr, kr, vr, rope, q_positions=qp, k_positions=kp, backend="triton", **cfg.options)
        lse_r = _rows(lse, rows)
        grads = triton.attention_backward(plan.call, _rows(out, rows), lse_r, lse2_from_natural(lse_r),
                                          _rows(dout, rows), None if dlse is None else _rows(dlse, rows))
        results.append((rows, grads))
    return _scatter_rows(results, (q, k, v))


def _grads_recompute(cfg: _Config, backend: str, q, k, v, q_pos, k_pos, out, lse, dout, dlse):
    """Block b's share of the gradients. With P = exp(S - lse) over all keys and c = exp(lse_b - lse) per row,
    P restricted to b is c * P_b (P_b: the block's own softmax), and dS = P (dO.v - dO.O + dlse). The block's own
    backward with upstream (g_out, g_lse) gives dS_b = P_b (g_out.v - g_out.O_b + g_lse); so g_out = c dO and
    g_lse = c (dO.(O_b - O) + dlse) reproduce dS exactly, and its dv = P_b^T g_out = P^T dO as well."""
    acc = cfg.acc_dtype
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        out_b, lse_b = _block_forward(cfg, *leaves, q_pos, k_pos, backend=backend)
        lse_g = lse.to(acc)
        c = torch.where(torch.isneginf(lse_g), torch.zeros_like(lse_g), torch.exp(lse_b.detach().to(acc) - lse_g))
        d = dout.to(acc)
        corr = (d * (out_b.detach().to(acc) - out.to(acc))).sum(-1).transpose(1, 2)
        if dlse is not None:
            corr = corr + dlse.to(acc)
        g_out = (c.transpose(1, 2).unsqueeze(-1) * d).to(out_b.dtype)
        g_lse = (c * corr).to(lse_b.dtype)
        grads = torch.autograd.grad((out_b, lse_b), leaves, (g_out, g_lse), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v)))


def _scatter_rows(results, like):
    if len(results) == 1 and results[0][0] is None:
        return results[0][1]
    grads = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in like]
    for rows, parts in results:
        for g, p in zip(grads, parts):
            g.index_copy_(0, rows, p.to(g.dtype))
    return tuple(grads)


# ---- the ring -----------------------------------------------------------------------------------------------
_TAG_K, _TAG_V, _TAG_DK, _TAG_DV = 0, 1, 2, 3


class _Exchange:
    """One batch of P2P operations, posted at construction; wait() completes them. The tensors are kept
    referenced until then."""

    def __init__(self, cfg: _Config, sends, recvs, pass_: str, step: int, phase: str):
        self.where = (pass_, step, phase)
        self.tensors = [t for t, _, _ in sends] + [t for t, _, _ in recvs]
        ops = [dist.P2POp(dist.isend, t, cfg.peers[p], cfg.group, tag) for t, p, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, cfg.peers[p], cfg.group, tag) for t, p, tag in recvs]
        self.works = dist.batch_isend_irecv(ops) if ops else []
        if ops and _TRACE is not None:
            _trace("post", pass_, step, phase, tuple((p, tag, t.numel() * t.element_size()) for t, p, tag in sends),
                   tuple((p, tag) for _, p, tag in recvs))

    def wait(self) -> None:
        if self.works:
            for work in self.works:
                work.wait()
            _trace("wait", *self.where)
        self.works, self.tensors = [], []


def _post_kv(cfg: _Config, step: int, held, template, pass_: str):
    """Phase A of a step: pass the block held now to r+1 and receive the next one from r-1, each only while some
    rank further along the ring needs it. Returns (exchange, the buffers being received or None)."""
    r, world, hops = cfg.rank, cfg.world, cfg.plan.last_hop
    sends, recvs, incoming = [], [], None
    if step + 1 < world:
        nxt, prv = (r + 1) % world, (r - 1) % world
        if hops[(r - step) % world] >= step + 1:  # implies the block is held
            sends = [(held[0], nxt, _TAG_K), (held[1], nxt, _TAG_V)]
        if hops[(r - 1 - step) % world] >= step + 1:
            incoming = (torch.empty_like(template[0]), torch.empty_like(template[1]))
            recvs = [(incoming[0], prv, _TAG_K), (incoming[1], prv, _TAG_V)]
    return _Exchange(cfg, sends, recvs, pass_, step, "kv"), incoming


def _ring_forward(cfg: _Config, q, k, v, q_pos, k_pos_of):
    r, world = cfg.rank, cfg.world
    batch, nq, heads, dim = q.shape
    out = torch.zeros(batch, nq, heads, dim, dtype=cfg.acc_dtype, device=q.device)
    lse = torch.full((batch, heads, nq), float("-inf"), dtype=cfg.acc_dtype, device=q.device)
    bounds = _segments(nq)
    written = [False] * (len(bounds) - 1)  # per query segment: has a partial result been stored yet?
    held = (k, v)
    for step in range(world):
        src = (r - step) % world
        exchange, incoming = _post_kv(cfg, step, held, (k, v), "fwd")
        if held is not None:
            for q_lo, q_hi, k_lo, k_hi in cfg.plan.calls[src]:
                _trace("call", "fwd", step, src, q_lo, q_hi, k_lo, k_hi)
                o, l_ = _block_forward(cfg, q[:, q_lo:q_hi], held[0][:, k_lo:k_hi], held[1][:, k_lo:k_hi],
                                       q_pos[:, q_lo:q_hi], k_pos_of(src)[:, k_lo:k_hi])
                segs = [i for i in range(len(written)) if q_lo <= bounds[i] < q_hi]
                if not any(written[i] for i in segs):
                    out[:, q_lo:q_hi].copy_(o)
                    lse[:, :, q_lo:q_hi].copy_(l_)
                else:
                    _merge(out[:, q_lo:q_hi], lse[:, :, q_lo:q_hi], o, l_)
                for i in segs:
                    written[i] = True
        exchange.wait()
        held = incoming
    return out.to(q.dtype), lse.to(torch.float32)


def _ring_backward(cfg: _Config, q, k, v, q_pos, k_pos_of, out, lse, dout, dlse, method: str, backend: str):
    """dq, dk, dv. K/V travel as in the forward (phase A of each step); after computing its share of block src's
    gradients, a rank adds the accumulator that r-1 sent, then (phase B) sends it on to r+1, or home to src when
    it is the last rank that needs src, and posts the receive of the next accumulator, which then travels while
    the next block is computed."""
    r, world, hops = cfg.rank, cfg.world, cfg.plan.last_hop
    acc_t = torch.float64 if cfg.acc_dtype == torch.float64 else torch.float32
    dev = q.device

    def zeros():
        return (torch.zeros(k.shape, dtype=acc_t, device=dev), torch.zeros(v.shape, dtype=acc_t, device=dev))

    dq = torch.zeros(q.shape, dtype=acc_t, device=dev)
    held = (k, v)
    traveling = None  # accumulator of the held block, being received from r-1 (step > 0)
    pending = None  # phase-B exchange of the previous step (its sends and the receive of `traveling`)
    home = None  # this rank's finished dk, dv
    for step in range(world):
        src = (r - step) % world
        kv_exchange, incoming = _post_kv(cfg, step, held, (k, v), "bwd")
        parts = []  # (k_lo, k_hi, dk, dv) of this step's calls, added to the accumulator once it has arrived
        if held is not None:
            for q_lo, q_hi, k_lo, k_hi in cfg.plan.calls[src]:
                _trace("call", "bwd", step, src, q_lo, q_hi, k_lo, k_hi)
                args = (q[:, q_lo:q_hi], held[0][:, k_lo:k_hi], held[1][:, k_lo:k_hi], q_pos[:, q_lo:q_hi],
                        k_pos_of(src)[:, k_lo:k_hi], out[:, q_lo:q_hi], lse[:, :, q_lo:q_hi], dout[:, q_lo:q_hi],
                        None if dlse is None else dlse[:, :, q_lo:q_hi])
                if method == "kernel":
                    g = _grads_kernel(cfg, *args)
                else:
                    g = _grads_recompute(cfg, backend, *args)
                dq[:, q_lo:q_hi] += g[0]
                parts.append((k_lo, k_hi, g[1], g[2]))
        if pending is not None:
            pending.wait()
        acc = None
        if held is not None:
            acc = traveling if traveling is not None else zeros()
            for k_lo, k_hi, dk, dv in parts:
                acc[0][:, k_lo:k_hi] += dk
                acc[1][:, k_lo:k_hi] += dv
        sends, recvs = [], []
        if held is not None and hops[src] >= step + 1:
            sends = [(acc[0], (r + 1) % world, _TAG_DK), (acc[1], (r + 1) % world, _TAG_DV)]
        elif held is not None and hops[src] == step and step > 0:
            sends = [(acc[0], src, _TAG_DK), (acc[1], src, _TAG_DV)]
        elif step == 0:  # hops[r] == 0: no other rank needs this rank's block
            home = acc
        traveling = None
        if step + 1 < world and hops[(r - 1 - step) % world] >= step + 1:
            traveling = (torch.empty(k.shape, dtype=acc_t, device=dev), torch.empty(v.shape, dtype=acc_t, device=dev))
            recvs += [(traveling[0], (r - 1) % world, _TAG_DK), (traveling[1], (r - 1) % world, _TAG_DV)]
        if step > 0 and hops[r] == step:
            home = (torch.empty(k.shape, dtype=acc_t, device=dev), torch.empty(v.shape, dtype=acc_t, device=dev))
            recvs += [(home[0], (r + step) % world, _TAG_DK), (home[1], (r + step) % world, _TAG_DV)]
        pending = _Exchange(cfg, sends, recvs, "bwd", step, "dkv")
        kv_exchange.wait()
        held = incoming
    pending.wait()
    if home is None:
        home = zeros()
    return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos_all, cfg):
        k_pos_of = _positions_of(k_pos_all)
        out, lse = _ring_forward(cfg, q, k, v, q_pos, k_pos_of)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, *k_pos_all)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, q_pos, *k_pos_all = ctx.saved_tensors
        cfg = ctx.cfg
        # every rank takes part even when its own output got no gradient: the others need its K/V and dK/dV
        if dout is None:
            dout = torch.zeros_like(out)
        method = block_backward_method(cfg.backend, q)
        _trace("method", method)
        dq, dk, dv = _ring_backward(cfg, q, k, v, q_pos, _positions_of(k_pos_all), out, lse, dout.contiguous(),
                                    dlse, method, cfg.backend)
        return dq, dk, dv, None, None, None


def _positions_of(k_pos_all):
    return lambda s: k_pos_all[s]


@lru_cache(maxsize=256)
def _device_positions(n_local: int, world: int, rank: int, sharding: str, device: torch.device) -> torch.Tensor:
    """sequence_indices built on the device (no host-to-device copy, which would wait for the GPU); read-only."""
    if sharding == "contiguous":
        return torch.arange(rank * n_local, (rank + 1) * n_local, device=device)
    c = n_local // 2
    back = 2 * world - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange(back * c, (back + 1) * c, device=device)])


def _default_positions(n_local: int, world: int, rank: int, sharding: str, batch: int, device) -> torch.Tensor:
    return _device_positions(n_local, world, rank, sharding, torch.device(device)).expand(batch, n_local)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeScaling | None, *,
                               group=None, causal: bool = True, q_positions: torch.Tensor | None = None,
                               k_positions: torch.Tensor | None = None, window: int | None = None,
                               softmax_scale: float | None = None, rerope_window: int | None = None,
                               rerope_leak: float | None = None, logn_base: float | None = None,
                               return_lse: bool = False, backend: str = "auto", sharding: str | None = None):
    """Ring attention over the sequence shards of the ranks of `group` (default: the world), forward and backward.

    Each rank passes its shard: q (B, Nq_local, Hq, D), k and v (B, Nk_local, Hkv, D), the same shapes and keywords
    on every rank; the result is this rank's shard of what `scaled_rope_attention` gives on the whole sequence:
    out (B, Nq_local, Hq, D) and, with return_lse, lse (B, Hq, Nq_local) float32 (both differentiable).

    Positions are global token positions: q_positions / k_positions (B, N_local) int tensors, or None for the
    positions of `sharding` ("contiguous" by default, or "zigzag"; see `sequence_indices`), which then needs
    Nq_local == Nk_local (self-attention on the shards). With explicit positions the ranks exchange their
    positions once per call (one host synchronisation); with default ones nothing is exchanged beforehand.
    Keywords otherwise as for `scaled_rope_attention` (causal, window, softmax_scale, rerope_window, rerope_leak,
    logn_base, backend); length-dependent ropes (LongRoPE, dynamic NTK) use each row's global length.

    Every rank must call it, and call backward on its output (the backward is a collective too).
    """
    _validate(q, k, v, rope, causal=causal, q_positions=q_positions, k_positions=k_positions, window=window,
              softmax_scale=softmax_scale, rerope_window=rerope_window, rerope_leak=rerope_leak,
              logn_base=logn_base, backend=backend, sharding=sharding)
    group = _group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sharding = sharding or "contiguous"
    batch, nq, _, dim = q.shape
    nk = k.shape[1]
    options = dict(causal=causal, window=window,
                   softmax_scale=float(dim ** -0.5 if softmax_scale is None else softmax_scale),
                   rerope_window=rerope_window, rerope_leak=rerope_leak, logn_base=logn_base)
    explicit = (q_positions is not None, k_positions is not None)
    if any(explicit):
        _agree(_header(q, k, options, explicit), group, q.device)
        q_pos = q_positions if explicit[0] else _default_positions(nq, world, rank, sharding, batch, q.device)
        k_pos = k_positions if explicit[1] else _default_positions(nk, world, rank, sharding, batch, q.device)
        plan = _explicit_plan(q_pos, k_pos, group, rank, causal, window)
        k_pos = k_pos.to(torch.int64).contiguous()
        gathered = [torch.empty_like(k_pos) for _ in range(world)]
        dist.all_gather(gathered, k_pos, group=group)
        k_pos_all = tuple(gathered)
    else:
        _check_split(nq * world, world, sharding, "q")
        plan = _default_plan(nq, world, rank, sharding, batch, causal, window)
        q_pos = _default_positions(nq, world, rank, sharding, batch, q.device)
        k_pos_all = tuple(_default_positions(nk, world, s, sharding, batch, q.device) for s in range(world))
    cfg = _Config(group=group, rank=rank, world=world,
                  peers=tuple(dist.get_global_rank(group, p) for p in range(world)), plan=plan,
                  row_groups=_row_groups(rope, plan.seq_lens, q.device), options=options, backend=backend,
                  acc_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    if world > 1:
        _p2p_ready(group)
    q, k, v = (x if x.is_contiguous() else x.contiguous() for x in (q, k, v))  # P2P sends whole tensors
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _RingAttention.apply(q, k, v, q_pos, k_pos_all, cfg)
    else:
        out, lse = _ring_forward(cfg, q, k, v, q_pos, _positions_of(k_pos_all))
    return (out, lse) if return_lse else out


# ---- Ulysses: all-to-all between sequence shards and head shards ----------------------------------------------
def _seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """(B, N_local, H, *rest) sequence shard -> (B, W*N_local, H/W, *rest): all tokens (rank 0's shard first)
    for this rank's heads."""
    world = dist.get_world_size(group)
    batch, n, heads = x.shape[:3]
    rest = x.shape[3:]
    send = x.reshape(batch, n, world, heads // world, *rest).movedim(2, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, 1).reshape(batch, world * n, heads // world, *rest)


def _head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of `_seq_to_head`: (B, W*N_local, H/W, *rest) -> (B, N_local, H, *rest)."""
    world = dist.get_world_size(group)
    batch, total, heads = x.shape[:3]
    rest = x.shape[3:]
    n = total // world
    send = x.reshape(batch, world, n, heads, *rest).movedim(1, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, 2).reshape(batch, n, world * heads, *rest)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad.contiguous(), ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad.contiguous(), ctx.group), None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeScaling | None, *, group=None,
                      causal: bool = True, q_positions: torch.Tensor | None = None,
                      k_positions: torch.Tensor | None = None, window: int | None = None,
                      softmax_scale: float | None = None, rerope_window: int | None = None,
                      rerope_leak: float | None = None, logn_base: float | None = None, return_lse: bool = False,
                      backend: str = "auto", sharding: str | None = None):
    """Head-parallel (Ulysses) attention over sequence shards: arguments and result as for
    `context_parallel_attention`; needs Hq and Hkv divisible by the group's size.

    all_to_all gives each rank the whole sequence (every rank's shard, concatenated in rank order) for Hq/W query
    heads and the Hkv/W K/V heads they use; `scaled_rope_attention` runs on it with the global positions (so row
    lengths, LongRoPE's set and ReRoPE's classification are those of the whole sequence); one all_to_all brings
    out (and lse) back to sequence shards. The backward is the same exchanges in reverse around the ordinary
    attention backward. Per rank and layer it moves q, k, v and out once each ((2*Hq + 2*Hkv) * N/W * D elements,
    (W-1)/W of them over the links), not overlapped with compute.
    """
    _validate(q, k, v, rope, causal=causal, q_positions=q_positions, k_positions=k_positions, window=window,
              softmax_scale=softmax_scale, rerope_window=rerope_window, rerope_leak=rerope_leak,
              logn_base=logn_base, backend=backend, sharding=sharding)
    group = _group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, nq, hq, dim = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    if hq % world:
        raise ValueError(f"q: ulysses_attention needs the q heads ({hq}) divisible by the world size ({world})")
    if hkv % world:
        raise ValueError(f"k: ulysses_attention needs the k/v heads ({hkv}) divisible by the world size ({world}); "
                         f"use context_parallel_attention")
    sharding = sharding or "contiguous"
    explicit = (q_positions is not None, k_positions is not None)
    options = dict(causal=causal, window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                   rerope_leak=rerope_leak, logn_base=logn_base)
    if any(explicit):
        _agree(_header(q, k, options, explicit), group, q.device)

    def all_positions(pos, n):
        if pos is None:
            _check_split(n * world, world, sharding, "q")
            return torch.cat([_default_positions(n, world, s, sharding, batch, q.device) for s in range(world)], 1)
        pos = pos.contiguous()
        parts = [torch.empty_like(pos) for _ in range(world)]
        dist.all_gather(parts, pos, group=group)
        return torch.cat(parts, dim=1)

    q_all, k_all = all_positions(q_positions, nq), all_positions(k_positions, nk)
    qh, kh, vh = (_SeqToHead.apply(x, group) for x in (q, k, v))
    out_h, lse_h = scaled_rope_attention(qh, kh, vh, rope, q_positions=q_all, k_positions=k_all, return_lse=True,
                                         backend=backend, **options)
    out = _HeadToSeq.apply(out_h, group)
    if not return_lse:
        return out
    lse = _HeadToSeq.apply(lse_h.transpose(1, 2).unsqueeze(-1), group).squeeze(-1).transpose(1, 2)
    return out, lse
