"""Fused scaled-RoPE attention in Triton: FlashAttention-2 style forward and backward.

q and k arrive unrotated. A prepass (`rotate`, triton_kernels/rope.py) writes rotated copies into scratch
buffers laid out (B, H, N, D) so that every tile is one contiguous block; for ReRoPE it also writes the far
rotations. The attention kernels then run over the rotated tensors; the backward recomputes the scratch, forms
gradients with respect to the rotated q and k (near and far apart for ReRoPE) and maps them back with the
inverse rotation at the same positions. Nothing rotated is kept between forward and backward: memory is O(N*D).

Semantics (docs/DESIGN.md §3): key allowed iff (not causal or delta >= 0) and (window is None or delta < window),
delta = P - Q; score = softmax_scale * g(P) * <q_rot, k_rot>; ReRoPE takes the far product when delta >= w.

Key tiles are visited in segments whose kind is decided once per program from the positions: fully masked tiles
are skipped; full tiles inside every limit run without masks; boundary tiles are masked per element. With ReRoPE
each tile is near (one product with the near operands), far (one product with the far operands) or straddling
(both, selected per element). With default positions the segments come from arithmetic; with explicit positions
each tile's min/max delta decides at run time.

Order: jitted helpers, configs, kernels, launchers. The launchers take tensors, rotation tables and plain numbers
(LaunchArgs) that the package's Triton backend (scaled_rope._backend_triton) derives from its plan; they check
nothing and keep no autograd state (the package registers one autograd for every backend).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import triton
import triton.language as tl

from .. import _alloc, _env
from ._host import cdiv, next_power_of_2, signed
from .rope import rotate

_INTERPRET = _env.triton_interpret()

# ReRoPE tile kinds
NEAR: tl.constexpr = tl.constexpr(0)
FAR: tl.constexpr = tl.constexpr(1)
BOTH: tl.constexpr = tl.constexpr(2)
NEAR_PART: tl.constexpr = tl.constexpr(3)
FAR_PART: tl.constexpr = tl.constexpr(4)
INT32_MAX: tl.constexpr = tl.constexpr(2147483647)
INT32_MIN: tl.constexpr = tl.constexpr(-2147483647)
# windows beyond this are clamped (positions and their differences are int32 inside the kernels)
_MAX_WINDOW = 1 << 30



# ----------------------------------------------------------------------------------------------------------
# jitted helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _cdiv_pos(x, b: tl.constexpr):
    """ceil(max(x, 0) / b)."""
    return (tl.maximum(x, 0) + b - 1) // b


@triton.jit
def _fdiv_pos(x, b: tl.constexpr):
    """floor(max(x, 0) / b)."""
    return tl.maximum(x, 0) // b


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, ROW_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows >= n_rows (when ROW_MASK) and columns >= HEAD_DIM read as zero."""
    if ROW_MASK:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _row_scale(qpos, scale, inv_ln_logn, LOGN: tl.constexpr):
    """Per query row: scale * g(P), g(P) = max(1, ln(P + 1) / ln(logn_base)) (1 without log-n)."""
    if LOGN:
        g = tl.log(tl.maximum(qpos + 1, 1).to(tl.float32)) * inv_ln_logn
        row = scale * tl.maximum(g, 1.0)
    else:
        row = tl.zeros(qpos.shape, dtype=tl.float32) + scale
    return row


@triton.jit
def _exp2_minus_lse(x, lse_hi, lse_lo, DOT_PREC: tl.constexpr):
    """exp2(x - lse2), lse2 = lse_hi + lse_lo in log2 units (lse_hi = max * scale, lse_lo = log2 of the sum).
    fp32 inputs (the only ones with ieee dots) subtract the parts one by one: a single fp32 lse2 of magnitude
    ~10 would cost p up to 5e-7 relative, more than the rest of the fp32 backward; half types add them first."""
    if DOT_PREC == "ieee":
        y = tl.math.exp2((x - lse_hi) - lse_lo)
    else:
        y = tl.math.exp2(x - (lse_hi + lse_lo))
    return y


@triton.jit
def _allowed(delta, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, window):
    ok = delta == delta
    if CAUSAL:
        ok = ok & (delta >= 0)
    if HAS_WINDOW:
        ok = ok & (delta < window)
    return ok


XPOS_PERIOD = tl.constexpr(128)  # xPos: operands come scaled within 128-row periods; every BLOCK_M / BLOCK_N divides it


@triton.jit
def _xpos_vector(xrate, distance):
    """xPos's per-pair weight 2^(rate distance) of a tile pair whose operands came scaled within their periods (q row
    m by 2^(rate (m mod XPOS_PERIOD)), key n by 2^(-rate (n mod XPOS_PERIOD)): `scale_xpos_operands`): distance is
    the query period's first position less the key period's first position, rate = log2(zeta) / scale base per
    column (0 off the rotation pairs). One BLOCK_D vector per tile; <= 1 on allowed causal pairs up to one period."""
    return tl.exp2(xrate * distance.to(tl.float32))[None, :]


@triton.jit
def _xpos_rates(XRate, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, XPOS: tl.constexpr):
    """The per-column rates, loaded once per program; zeros without xPos."""
    rate = tl.zeros([BLOCK_D], dtype=tl.float32)
    if XPOS:
        rate = tl.load(XRate + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    return rate


@triton.jit
def _scaled(x, factors):
    """x times factors (float32), rounded back to x's dtype: an operand of the products."""
    return (x.to(tl.float32) * factors).to(x.dtype)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, q_far, K, K_far, V, start_n, qpos, kpos, row_scale, Nk, stride_kn, stride_kfn,
              stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr,
              MODE: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, XPOS: tl.constexpr):
    """One key tile of the online softmax. K/K_far/V point at (batch, kv head); start_n is the tile's first key.
    NEAR/FAR: one product; BOTH: both, selected per element; NEAR_PART/FAR_PART: one product, keys on the other
    side of the ReRoPE window masked out (a straddling tile visited once per side)."""
    cols = start_n + offs_n
    if MASK or (MODE >= BOTH):
        delta = qpos[:, None] - kpos[None, :]
    if (MODE == NEAR) or (MODE == BOTH) or (MODE == NEAR_PART):
        k_offs = start_n.to(tl.int64) * stride_kn + (offs_n[:, None] * stride_kn + offs_d[None, :])
        k = _load_tile(K + k_offs, cols, Nk, offs_d, MASK, HEAD_DIM, BLOCK_D)
        if XPOS:  # x_base: the query period's first position
            qk = tl.dot(_scaled(q, _xpos_vector(xrate, x_base - (start_n - start_n % XPOS_PERIOD))), tl.trans(k),
                        input_precision=DOT_PREC)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if (MODE == FAR) or (MODE == BOTH) or (MODE == FAR_PART):
        kf_offs = start_n.to(tl.int64) * stride_kfn + (offs_n[:, None] * stride_kfn + offs_d[None, :])
        k_far = _load_tile(K_far + kf_offs, cols, Nk, offs_d, MASK, HEAD_DIM, BLOCK_D)
        qk_far = tl.dot(q_far, tl.trans(k_far), input_precision=DOT_PREC)
        if MODE == BOTH:
            qk = tl.where(delta < rerope_w, qk, qk_far)
        else:
            qk = qk_far
    tl.static_assert(MASK or (MODE < NEAR_PART), "a straddling tile is visited with masks")
    if MASK:
        ok = _allowed(delta, CAUSAL, HAS_WINDOW, window) & (cols[None, :] < Nk)
        if MODE == NEAR_PART:
            ok = ok & (delta < rerope_w)
        if MODE == FAR_PART:
            ok = ok & (delta >= rerope_w)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed so far
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = m_new
    # m is the running max of the raw products (row_scale > 0), so lse = m * scale + ln(l) rounds like a direct sum
    m_scaled = m_sub * row_scale
    p = tl.math.exp2(qk * row_scale[:, None] - m_scaled[:, None])
    alpha = tl.math.exp2(m_i * row_scale - m_scaled)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v_offs = start_n.to(tl.int64) * stride_vn + (offs_n[:, None] * stride_vn + offs_d[None, :])
    v = _load_tile(V + v_offs, cols, Nk, offs_d, MASK, HEAD_DIM, BLOCK_D)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_segment(acc, l_i, m_i, q, q_far, K, K_far, V, lo, hi, qpos, row_scale, Nk, stride_kn, stride_kfn, stride_vn,
                 window, rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 MODE: tl.constexpr,
                 MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PREC: tl.constexpr, XPOS: tl.constexpr):
    """Key tiles lo..hi-1 of one kind, default positions (key Q = its index)."""
    for t in range(lo, hi):
        start_n = t * BLOCK_N
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_far, K, K_far, V, start_n, qpos, start_n + offs_n, row_scale, Nk,
                                  stride_kn, stride_kfn, stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base,
                                  CAUSAL,
                                  HAS_WINDOW, MODE, MASK, HEAD_DIM, BLOCK_D, DOT_PREC, XPOS)
    return acc, l_i, m_i


@triton.jit
def _fwd_kind(acc, l_i, m_i, q, K, V, t_lo, a, b, t_hi, first, last, qpos, row_scale, Nk, stride_kn, stride_vn, window,
              rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              MODE: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              XPOS: tl.constexpr):
    """The tiles first..last-1 of one product kind (q, K: its operands), in the segments of the limits:
    [t_lo, a) masked (window edge), [a, b) unmasked, [b, t_hi) masked (causal diagonal, sequence tail)."""
    if HAS_WINDOW:
        acc, l_i, m_i = _fwd_segment(acc, l_i, m_i, q, q, K, K, V, tl.maximum(t_lo, first), tl.minimum(a, last), qpos,
                                     row_scale, Nk, stride_kn, stride_kn, stride_vn, window, rerope_w, offs_n, offs_d,
                                     xrate, x_base, CAUSAL, HAS_WINDOW, MODE, True, HEAD_DIM, BLOCK_D, BLOCK_N,
                                     DOT_PREC, XPOS)
    acc, l_i, m_i = _fwd_segment(acc, l_i, m_i, q, q, K, K, V, tl.maximum(a, first), tl.minimum(b, last), qpos,
                                 row_scale, Nk, stride_kn, stride_kn, stride_vn, window, rerope_w, offs_n, offs_d,
                                 xrate, x_base, CAUSAL, HAS_WINDOW, MODE, False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
                                 XPOS)
    acc, l_i, m_i = _fwd_segment(acc, l_i, m_i, q, q, K, K, V, tl.maximum(b, first), tl.minimum(t_hi, last), qpos,
                                 row_scale, Nk, stride_kn, stride_kn, stride_vn, window, rerope_w, offs_n, offs_d,
                                 xrate, x_base, CAUSAL, HAS_WINDOW, MODE, True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
                                 XPOS)
    return acc, l_i, m_i


@triton.jit
def _tile_schedule(pid, num_tiles, BH, section_heads, REVERSE: tl.constexpr):
    """(batch * head, tile) of program pid of a 1-D grid. Heads are taken in L2 sections of section_heads and,
    inside a section, tile-major: every head of the section gets tile t before any gets the next, so the programs
    running at once share the K/V (or Q/dO) of a few heads in L2 while the longest tiles (REVERSE: the last ones)
    still start first."""
    per_section = section_heads * num_tiles
    section = pid // per_section
    first = section * section_heads
    r = pid - section * per_section
    heads_here = tl.minimum(section_heads, BH - first)
    tile = r // heads_here
    bh = first + r - tile * heads_here
    if REVERSE:
        tile = num_tiles - 1 - tile
    return bh, tile


@triton.jit
def _group_head(Q, DO, Lse, Delta, off_b, off_hk, g, GROUP, H, Nq, stride_qb, stride_qh, stride_dob, stride_doh):
    """Q, dO, lse and Delta of q head g of kv head off_hk's group (dk/dv kernel)."""
    off_h = off_hk * GROUP + g
    return (Q + off_b * stride_qb + off_h * stride_qh, DO + off_b * stride_dob + off_h * stride_doh,
            Lse + 2 * (off_b * H + off_h) * Nq, Delta + (off_b * H + off_h) * Nq)


@triton.jit
def _query_program(Nq, H, GROUP, section_heads, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(batch, q head, kv head, first row) of this program of a query-tile grid (forward and dq): causal, the
    longest query tiles first, so that the short ones fill the tail."""
    num_tiles = tl.cdiv(Nq, BLOCK_M)
    pid_bh, pid_m = _tile_schedule(tl.program_id(0), num_tiles, tl.num_programs(0) // num_tiles, section_heads, CAUSAL)
    off_h = pid_bh % H
    return (pid_bh // H).to(tl.int64), off_h.to(tl.int64), (off_h // GROUP).to(tl.int64), pid_m * BLOCK_M


@triton.jit
def _row_bounds(start, n_rows, BLOCK: tl.constexpr, off):
    """First and last position of the valid rows start..min(start+BLOCK, n_rows)-1 at position off + row."""
    return off + start, off + tl.minimum(start + BLOCK, n_rows) - 1


@triton.jit
def _key_tile_ranges(p_lo, p_hi, Nk, window, rerope_w, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     REROPE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Default positions, query rows at positions p_lo..p_hi, key Q = index. Returns tile bounds
    (t_lo, a, b, t_hi, t_far, t_near): tiles < t_lo and >= t_hi are fully masked; [a, b) need no mask;
    [t_lo, a) and [b, t_hi) are masked; tiles < t_far are fully far, tiles >= t_near fully near."""
    t_lo = p_lo * 0
    t_hi = tl.cdiv(Nk, BLOCK_N) + t_lo
    t_full_lo = t_lo
    t_full_hi = Nk // BLOCK_N + t_lo
    if CAUSAL:  # allowed iff Q <= P
        t_hi = tl.minimum(t_hi, _cdiv_pos(p_hi + 1, BLOCK_N))
        t_full_hi = tl.minimum(t_full_hi, _fdiv_pos(p_lo + 1, BLOCK_N))
    if HAS_WINDOW:  # allowed iff Q > P - window
        t_lo = _fdiv_pos(p_lo - window + 1, BLOCK_N)
        t_full_lo = _cdiv_pos(p_hi - window + 1, BLOCK_N)
    a = tl.maximum(t_lo, tl.minimum(t_full_lo, t_hi))
    b = tl.maximum(a, tl.minimum(t_full_hi, t_hi))
    if REROPE:  # near iff Q > P - w
        t_far = _fdiv_pos(p_lo - rerope_w + 1, BLOCK_N)
        t_near = _cdiv_pos(p_hi - rerope_w + 1, BLOCK_N)
    else:
        t_far = t_lo
        t_near = t_lo
    return t_lo, a, b, t_hi, t_far, t_near


@triton.jit
def _query_tile_ranges(q_lo, q_hi, Nq, off, window, rerope_w, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       REROPE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Default positions, keys q_lo..q_hi, query row m at P = off + m. Returns (i_lo, a, b, i_hi, i_near, i_far):
    tiles outside [i_lo, i_hi) fully masked; [a, b) need no mask (and are full tiles); tiles < i_near are fully
    near, tiles >= i_far fully far."""
    i_lo = q_lo * 0
    i_hi = tl.cdiv(Nq, BLOCK_M) + i_lo
    i_full_lo = i_lo
    i_full_hi = Nq // BLOCK_M + i_lo
    if CAUSAL:  # allowed iff off + m >= Q
        i_lo = _fdiv_pos(q_lo - off, BLOCK_M)
        i_full_lo = _cdiv_pos(q_hi - off, BLOCK_M)
    if HAS_WINDOW:  # allowed iff off + m - Q < window
        i_hi = tl.minimum(i_hi, _cdiv_pos(q_hi + window - off, BLOCK_M))
        i_full_hi = tl.minimum(i_full_hi, _fdiv_pos(q_lo + window - off, BLOCK_M))
    a = tl.maximum(i_lo, tl.minimum(i_full_lo, i_hi))
    b = tl.maximum(a, tl.minimum(i_full_hi, i_hi))
    if REROPE:  # near iff off + m - Q < w
        i_near = _fdiv_pos(q_lo + rerope_w - off, BLOCK_M)
        i_far = _cdiv_pos(q_hi + rerope_w - off, BLOCK_M)
    else:
        i_near = i_hi
        i_far = i_hi
    return i_lo, a, b, i_hi, i_near, i_far


@triton.jit
def _valid_range(pos, valid):
    """(min, max) of the positions where valid (INT32_MAX, INT32_MIN when none is)."""
    return tl.min(tl.where(valid, pos, INT32_MAX), 0), tl.max(tl.where(valid, pos, INT32_MIN), 0)


@triton.jit
def _explicit_tile_kind(d_min, d_max, window, rerope_w, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        REROPE: tl.constexpr):
    """Explicit positions: what a (query tile, key tile) pair with deltas in [d_min, d_max] needs: -1 nothing (no
    pair allowed, or an empty tile), NEAR, FAR or BOTH (ReRoPE window straddled); NEAR without ReRoPE."""
    live = d_max >= d_min
    if CAUSAL:
        live = live & (d_max >= 0)
    if HAS_WINDOW:
        live = live & (d_min < window)
    kind = 0
    if REROPE:
        kind = tl.where(d_max < rerope_w, 0, tl.where(d_min >= rerope_w, 1, 2))
    return tl.where(live, kind, -1)


@triton.jit
def _bwd_kv_tile(dk, dk_far, dv, k, k_far, v, Q, Q_far, DO, Lse, Delta, start_m, qpos, kpos, Nq, stride_qm, stride_dom,
                 sm_scale, sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m, offs_d, xrate, x_base,
                 CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, MODE: tl.constexpr, MASK: tl.constexpr, LOGN: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, XPOS: tl.constexpr):
    """One query tile's contribution to dk (near), dk_far and dv of a key tile, all in the transposed form
    (rows = keys). Q/Q_far/DO/Lse/Delta point at (batch, q head). NEAR: dk from (k, Q); FAR: dk_far from
    (k_far, Q_far); BOTH: both, selected per element; NEAR_PART/FAR_PART: dk from (k, Q) with the pairs on the
    other side of the ReRoPE window masked out (the caller passes the far operands for FAR_PART)."""
    rows = start_m + offs_m
    q_offs = start_m.to(tl.int64) * stride_qm + (offs_m[:, None] * stride_qm + offs_d[None, :])
    do_offs = start_m.to(tl.int64) * stride_dom + (offs_m[:, None] * stride_dom + offs_d[None, :])
    tl.static_assert(MASK or (MODE < NEAR_PART), "a straddling tile is visited with masks")
    if MASK or (MODE >= BOTH):
        delta_t = qpos[None, :] - kpos[:, None]
    if MODE != FAR:
        q = _load_tile(Q + q_offs, rows, Nq, offs_d, MASK, HEAD_DIM, BLOCK_D)
        if XPOS:  # x_base: the key period's first position; dq and dk leave for the operand scaling's transpose
            q = _scaled(q, _xpos_vector(xrate, tl.min(qpos, 0) - start_m % XPOS_PERIOD - x_base))
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    if (MODE == FAR) or (MODE == BOTH):
        q_far = _load_tile(Q_far + q_offs, rows, Nq, offs_d, MASK, HEAD_DIM, BLOCK_D)
        s_far = tl.dot(k_far, tl.trans(q_far), input_precision=DOT_PREC)
        if MODE == FAR:
            s_t = s_far
        else:
            s_t = tl.where(delta_t < rerope_w, s_t, s_far)
    if MASK:  # rows past Nq get p = 0
        lse_hi = tl.load(Lse + 2 * rows, mask=rows < Nq, other=float("inf"))
        lse_lo = tl.load(Lse + 2 * rows + 1, mask=rows < Nq, other=0.0)
        dlt = tl.load(Delta + rows, mask=rows < Nq, other=0.0)
    else:
        lse_hi = tl.load(Lse + 2 * rows)
        lse_lo = tl.load(Lse + 2 * rows + 1)
        dlt = tl.load(Delta + rows)
    row_scale = _row_scale(qpos, sm_scale_log2, inv_ln_logn, LOGN)
    p_t = _exp2_minus_lse(s_t * row_scale[None, :], lse_hi[None, :], lse_lo[None, :], DOT_PREC)
    if MASK:
        ok = _allowed(delta_t, CAUSAL, HAS_WINDOW, window)
        if MODE == NEAR_PART:
            ok = ok & (delta_t < rerope_w)
        if MODE == FAR_PART:
            ok = ok & (delta_t >= rerope_w)
        p_t = tl.where(ok, p_t, 0.0)
    do = _load_tile(DO + do_offs, rows, Nq, offs_d, MASK, HEAD_DIM, BLOCK_D)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - dlt[None, :])
    if LOGN:  # per query row softmax_scale * g(P); a constant scale is applied once at the end
        ds_t = ds_t * _row_scale(qpos, sm_scale, inv_ln_logn, LOGN)[None, :]
    if (MODE == NEAR) or (MODE >= NEAR_PART):
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    elif MODE == FAR:
        dk_far = tl.dot(ds_t.to(q_far.dtype), q_far, dk_far, input_precision=DOT_PREC)
    else:
        near = delta_t < rerope_w
        dk = tl.dot(tl.where(near, ds_t, 0.0).to(q.dtype), q, dk, input_precision=DOT_PREC)
        dk_far = tl.dot(tl.where(near, 0.0, ds_t).to(q_far.dtype), q_far, dk_far, input_precision=DOT_PREC)
    return dk, dk_far, dv


@triton.jit
def _bwd_kv_segment(dk, dk_far, dv, k, k_far, v, Q, Q_far, DO, Lse, Delta, lo, hi, kpos, qoff, Nq, stride_qm,
                    stride_dom, sm_scale, sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m, offs_d,
                    xrate, x_base, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MODE: tl.constexpr,
                    MASK: tl.constexpr,
                    LOGN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    DOT_PREC: tl.constexpr, XPOS: tl.constexpr):
    """Query tiles lo..hi-1 of one kind, default positions (row m at P = qoff + m)."""
    for i in range(lo, hi):
        start_m = i * BLOCK_M
        dk, dk_far, dv = _bwd_kv_tile(dk, dk_far, dv, k, k_far, v, Q, Q_far, DO, Lse, Delta, start_m,
                                      qoff + start_m + offs_m, kpos, Nq, stride_qm, stride_dom, sm_scale, sm_scale_log2,
                                      inv_ln_logn, window, rerope_w, offs_m, offs_d, xrate, x_base, CAUSAL,
                                      HAS_WINDOW, MODE, MASK,
                                      LOGN, HEAD_DIM, BLOCK_D, DOT_PREC, XPOS)
    return dk, dk_far, dv


@triton.jit
def _bwd_kv_kind(dk, dv, k, v, Q, DO, Lse, Delta, i_lo, a, b, i_hi, first, last, kpos, qoff, Nq, stride_qm,
                 stride_dom, sm_scale, sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m, offs_d,
                 xrate, x_base, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MODE: tl.constexpr, LOGN: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
                 XPOS: tl.constexpr):
    """The query tiles first..last-1 of one product kind (k, Q: its operands, dk: its accumulator), in the
    segments of the limits: [i_lo, a) masked (causal diagonal), [a, b) unmasked, [b, i_hi) masked (window edge,
    sequence tail)."""
    dk, dk_same, dv = _bwd_kv_segment(dk, dk, dv, k, k, v, Q, Q, DO, Lse, Delta, tl.maximum(i_lo, first),
                                      tl.minimum(a, last), kpos, qoff, Nq, stride_qm, stride_dom, sm_scale,
                                      sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m, offs_d, xrate, x_base,
                                      CAUSAL, HAS_WINDOW,
                                      MODE, True, LOGN, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, XPOS)
    dk, dk_same, dv = _bwd_kv_segment(dk, dk, dv, k, k, v, Q, Q, DO, Lse, Delta, tl.maximum(a, first),
                                      tl.minimum(b, last), kpos, qoff, Nq, stride_qm, stride_dom, sm_scale,
                                      sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m, offs_d, xrate, x_base,
                                      CAUSAL, HAS_WINDOW,
                                      MODE, False, LOGN, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, XPOS)
    dk, dk_same, dv = _bwd_kv_segment(dk, dk, dv, k, k, v, Q, Q, DO, Lse, Delta, tl.maximum(b, first),
                                      tl.minimum(i_hi, last), kpos, qoff, Nq, stride_qm, stride_dom, sm_scale,
                                      sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m, offs_d, xrate, x_base,
                                      CAUSAL, HAS_WINDOW,
                                      MODE, True, LOGN, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, XPOS)
    return dk, dv


@triton.jit
def _bwd_q_tile(dq, dq_far, q, q_far, do, lse, lse_lo, dlt, K, K_far, V, start_n, qpos, kpos, row_scale, Nk, stride_kn,
                stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr,
                MODE: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr, XPOS: tl.constexpr):
    """One key tile's contribution to dq (near) and dq_far of a query tile (unscaled: times softmax scale later).
    Modes as in _bwd_kv_tile: NEAR_PART/FAR_PART accumulate dq from (q, K) with the other side's keys masked out."""
    cols = start_n + offs_n
    k_offs = start_n.to(tl.int64) * stride_kn + (offs_n[:, None] * stride_kn + offs_d[None, :])
    v_offs = start_n.to(tl.int64) * stride_vn + (offs_n[:, None] * stride_vn + offs_d[None, :])
    tl.static_assert(MASK or (MODE < NEAR_PART), "a straddling tile is visited with masks")
    if MASK or (MODE >= BOTH):
        delta = qpos[:, None] - kpos[None, :]
    if MODE != FAR:
        k = _load_tile(K + k_offs, cols, Nk, offs_d, MASK, HEAD_DIM, BLOCK_D)
        if XPOS:  # as in the forward; dq takes the tile's weights
            q_factors = _xpos_vector(xrate, x_base - (start_n - start_n % XPOS_PERIOD))
            s = tl.dot(_scaled(q, q_factors), tl.trans(k), input_precision=DOT_PREC)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if (MODE == FAR) or (MODE == BOTH):
        k_far = _load_tile(K_far + k_offs, cols, Nk, offs_d, MASK, HEAD_DIM, BLOCK_D)
        s_far = tl.dot(q_far, tl.trans(k_far), input_precision=DOT_PREC)
        if MODE == FAR:
            s = s_far
        else:
            s = tl.where(delta < rerope_w, s, s_far)
    p = _exp2_minus_lse(s * row_scale[:, None], lse[:, None], lse_lo[:, None], DOT_PREC)
    if MASK:
        ok = _allowed(delta, CAUSAL, HAS_WINDOW, window) & (cols[None, :] < Nk)
        if MODE == NEAR_PART:
            ok = ok & (delta < rerope_w)
        if MODE == FAR_PART:
            ok = ok & (delta >= rerope_w)
        p = tl.where(ok, p, 0.0)
    v = _load_tile(V + v_offs, cols, Nk, offs_d, MASK, HEAD_DIM, BLOCK_D)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - dlt[:, None])
    if XPOS:
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * q_factors
    elif (MODE == NEAR) or (MODE >= NEAR_PART):
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    elif MODE == FAR:
        dq_far = tl.dot(ds.to(k_far.dtype), k_far, dq_far, input_precision=DOT_PREC)
    else:
        near = delta < rerope_w
        dq = tl.dot(tl.where(near, ds, 0.0).to(k.dtype), k, dq, input_precision=DOT_PREC)
        dq_far = tl.dot(tl.where(near, 0.0, ds).to(k_far.dtype), k_far, dq_far, input_precision=DOT_PREC)
    return dq, dq_far


@triton.jit
def _bwd_q_segment(dq, dq_far, q, q_far, do, lse, lse_lo, dlt, K, K_far, V, lo, hi, qpos, row_scale, Nk, stride_kn,
                   stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr,
                   MODE: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, XPOS: tl.constexpr):
    for t in range(lo, hi):
        start_n = t * BLOCK_N
        dq, dq_far = _bwd_q_tile(dq, dq_far, q, q_far, do, lse, lse_lo, dlt, K, K_far, V, start_n, qpos,
                                 start_n + offs_n, row_scale, Nk, stride_kn, stride_vn, window, rerope_w, offs_n,
                                 offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, MODE, MASK, HEAD_DIM, BLOCK_D, DOT_PREC,
                                 XPOS)
    return dq, dq_far


@triton.jit
def _bwd_q_kind(dq, q, do, lse, lse_lo, dlt, K, V, t_lo, a, b, t_hi, first, last, qpos, row_scale, Nk, stride_kn,
                stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr,
                MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PREC: tl.constexpr, XPOS: tl.constexpr):
    """The key tiles first..last-1 of one product kind (q, K: its operands, dq: its accumulator), in the segments
    of the limits as in _fwd_kind."""
    if HAS_WINDOW:
        dq, dq_same = _bwd_q_segment(dq, dq, q, q, do, lse, lse_lo, dlt, K, K, V, tl.maximum(t_lo, first),
                                     tl.minimum(a, last), qpos, row_scale, Nk, stride_kn, stride_vn, window, rerope_w,
                                     offs_n, offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, MODE, True, HEAD_DIM, BLOCK_D,
                                     BLOCK_N,
                                     DOT_PREC, XPOS)
    dq, dq_same = _bwd_q_segment(dq, dq, q, q, do, lse, lse_lo, dlt, K, K, V, tl.maximum(a, first),
                                 tl.minimum(b, last), qpos, row_scale, Nk, stride_kn, stride_vn, window, rerope_w,
                                 offs_n, offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, MODE, False, HEAD_DIM, BLOCK_D,
                                 BLOCK_N, DOT_PREC, XPOS)
    dq, dq_same = _bwd_q_segment(dq, dq, q, q, do, lse, lse_lo, dlt, K, K, V, tl.maximum(b, first),
                                 tl.minimum(t_hi, last), qpos, row_scale, Nk, stride_kn, stride_vn, window, rerope_w,
                                 offs_n, offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, MODE, True, HEAD_DIM, BLOCK_D,
                                 BLOCK_N, DOT_PREC, XPOS)
    return dq


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------
_KEY = ["N_BUCKET", "BH_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "REROPE", "EXPLICIT", "LOGN", "XPOS"]


def _configs(block_pairs, head_dims=None):
    """Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages); head_dims (lo, hi) limits them to those head dims."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in block_pairs]
    for config in configs:
        config.head_dims = head_dims
    return configs


if _INTERPRET:  # one config, deliberately rectangular so that tile-range arithmetic is exercised
    _FWD_CONFIGS = _configs([(16, 32, 4, 1)])
    _DKDV_CONFIGS = _configs([(32, 16, 4, 1)])
    _DQ_CONFIGS = _configs([(16, 32, 4, 1)])
else:  # the first config that fits is the one SCALED_ROPE_AUTOTUNE=0 uses: keep the safest first
    # forward: head dims above 64 (8 warps = two warpgroups of 64 rows), then head dims up to 64 (FA2's choice
    # there is 128 x 128 or 128 x 64 tiles with 4 warps: the products are short, so more keys per softmax step)
    _FWD_CONFIGS = (_configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)], (65, 256))
                    + _configs([(128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 64, 8, 3),
                                (64, 64, 4, 3)], (1, 64)))
    _DKDV_CONFIGS = _configs([(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 2), (64, 64, 4, 3)])
    _DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 2)])
# used only when no config above fits the estimate (head dim 256 with ReRoPE or fp32)
_FALLBACK = {"fwd": _configs([(64, 32, 4, 2)])[0], "dkdv": _configs([(32, 64, 4, 2)])[0],
             "dq": _configs([(64, 32, 4, 2)])[0]}

_MAX_FP32_PER_THREAD = 192  # accumulators + score tiles held in registers
_MAX_SHARED_BYTES = 180 * 1024  # H100 has 227 KB per block; leave room for layout conversions


def _fits(kind: str, block_m: int, block_n: int, num_warps: int, num_stages: int, block_d: int, sets: int,
          elem: int) -> bool:
    """Rough register and shared-memory estimate of one program (sets: operand sets live at once, 2 where ReRoPE
    needs the near and far pair together; the pipeliner keeps num_stages - 1 tiles in flight)."""
    staged = max(num_stages - 1, 1)
    if kind == "fwd":  # acc (m x d), scores (m x n) per set; q tiles resident, k (per set) and v staged
        regs = block_m * block_d + sets * block_m * block_n
        smem = sets * block_m * block_d + staged * (sets + 1) * block_n * block_d
    elif kind == "dkdv":  # dk per set and dv (n x d), transposed scores; k, v resident, q (per set) and do staged
        regs = (sets + 1) * block_n * block_d + sets * block_m * block_n
        smem = (sets + 1) * block_n * block_d + staged * (sets + 1) * block_m * block_d
    else:  # dq per set (m x d), scores; q, do resident, k (per set) and v staged
        regs = sets * block_m * block_d + sets * block_m * block_n
        smem = (sets + 1) * block_m * block_d + staged * (sets + 1) * block_n * block_d
    return regs <= _MAX_FP32_PER_THREAD * 32 * num_warps and smem * elem <= _MAX_SHARED_BYTES


def _forced_config(kind: str):
    """SCALED_ROPE_FWD_CONFIG / _DKDV_ / _DQ_CONFIG = "BLOCK_M,BLOCK_N,num_warps,num_stages": that config alone
    (for measurements; tools/probe_rerope.py sets it)."""
    name, text = _env.forced_config(kind)
    if not text:
        return None
    try:
        bm, bn, w, st = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must be 'BLOCK_M,BLOCK_N,num_warps,num_stages', got {text!r}") from None
    return _configs([(bm, bn, w, st)])[0]


def _prune(configs, named_args, kind="fwd", **kwargs):
    """Configs that fit the head dim and dtype; SCALED_ROPE_AUTOTUNE=0 keeps only the first (the GPU feature
    tests use it so that each feature compiles one config)."""
    forced = _forced_config(kind)
    if forced is not None:
        return [forced]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", block_d))
    rerope = bool(kwargs.get("REROPE", named_args.get("REROPE")))
    explicit = bool(kwargs.get("EXPLICIT", named_args.get("EXPLICIT")))
    # with default positions every kernel holds one operand set at a time (far side, then near side)
    sets = 2 if rerope and explicit else 1
    elem = named_args["Q"].element_size() if "Q" in named_args else 2
    kept = [c for c in configs
            if (getattr(c, "head_dims", None) is None or c.head_dims[0] <= head_dim <= c.head_dims[1])
            and _fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, block_d, sets, elem)]
    kept = kept or [_FALLBACK[kind]]
    if not _env.autotune():
        kept = kept[:1]
    return kept


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": partial(_prune, kind="fwd")})
@triton.jit
def _attn_fwd(Q, K, V, Q_far, K_far, Out, Lse, Lse2, QPos, KPos, XRate, stride_qb, stride_qh, stride_qm, stride_kb,
              stride_kh,
              stride_kn, stride_kfb, stride_kfh, stride_kfn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh,
              stride_om, stride_qpb, stride_qpn, stride_kpb, stride_kpn, Nq, Nk, H, GROUP, sm_scale, sm_scale_log2,
              inv_ln_logn, window, rerope_w, section_heads, N_BUCKET, BH_BUCKET, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, REROPE: tl.constexpr,
              EXPLICIT: tl.constexpr, LOGN: tl.constexpr, XPOS: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_b, off_h, off_hk, start_m = _query_program(Nq, H, GROUP, section_heads, CAUSAL, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    tl.static_assert(not (XPOS and (EXPLICIT or REROPE)), "xPos runs with default positions and no ReRoPE")
    tl.static_assert(not XPOS or (XPOS_PERIOD % BLOCK_M == 0 and XPOS_PERIOD % BLOCK_N == 0),
                     "xPos needs tiles that divide its period")
    xrate = _xpos_rates(XRate, offs_d, HEAD_DIM, BLOCK_D, XPOS)
    x_base = Nk - Nq + start_m - start_m % XPOS_PERIOD  # xPos: the query period's first position (default positions)

    q_offs = off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qm \
        + (offs_m[:, None] * stride_qm + offs_d[None, :])
    K += off_b * stride_kb + off_hk * stride_kh
    K_far += off_b * stride_kfb + off_hk * stride_kfh
    V += off_b * stride_vb + off_hk * stride_vh
    if EXPLICIT:
        qpos = tl.load(QPos + off_b * stride_qpb + rows * stride_qpn, mask=rows < Nq, other=0).to(tl.int32)
    else:
        qpos = Nk - Nq + rows
    row_scale = _row_scale(qpos, sm_scale_log2, inv_ln_logn, LOGN)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if EXPLICIT:
        q = _load_tile(Q + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
        if REROPE:
            q_far = _load_tile(Q_far + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
        else:
            q_far = q
        p_min, p_max = _valid_range(qpos, rows < Nq)
        KPos += off_b * stride_kpb
        for t in range(0, tl.cdiv(Nk, BLOCK_N)):
            start_n = t * BLOCK_N
            cols = start_n + offs_n
            kpos = tl.load(KPos + cols * stride_kpn, mask=cols < Nk, other=0).to(tl.int32)
            k_min, k_max = _valid_range(kpos, cols < Nk)
            kind = _explicit_tile_kind(p_min - k_max, p_max - k_min, window, rerope_w, CAUSAL, HAS_WINDOW, REROPE)
            if kind == NEAR:
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_far, K, K_far, V, start_n, qpos, kpos, row_scale, Nk,
                                          stride_kn, stride_kfn, stride_vn, window, rerope_w, offs_n, offs_d, xrate,
                                          x_base, CAUSAL,
                                          HAS_WINDOW, NEAR, True, HEAD_DIM, BLOCK_D, DOT_PREC, XPOS)
            if REROPE:
                if kind == FAR:
                    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_far, K, K_far, V, start_n, qpos, kpos, row_scale, Nk,
                                              stride_kn, stride_kfn, stride_vn, window, rerope_w, offs_n, offs_d,
                                              xrate, x_base, CAUSAL, HAS_WINDOW, FAR, True, HEAD_DIM, BLOCK_D,
                                              DOT_PREC, XPOS)
                if kind == BOTH:
                    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_far, K, K_far, V, start_n, qpos, kpos, row_scale, Nk,
                                              stride_kn, stride_kfn, stride_vn, window, rerope_w, offs_n, offs_d,
                                              xrate, x_base, CAUSAL, HAS_WINDOW, BOTH, True, HEAD_DIM, BLOCK_D,
                                              DOT_PREC, XPOS)
    else:
        p_lo, p_hi = _row_bounds(start_m, Nq, BLOCK_M, Nk - Nq)
        t_lo, a, b, t_hi, t_far, t_near = _key_tile_ranges(p_lo, p_hi, Nk, window, rerope_w, CAUSAL, HAS_WINDOW, REROPE,
                                                           BLOCK_N)
        if REROPE:
            # Far side first, with only the far q tile live: the fully far tiles, then the straddling tiles
            # [t_far, t_near) with their near keys masked. Then the near q tile: the straddling tiles again with
            # their far keys masked, then the fully near tiles. One q operand at a time keeps the registers and
            # shared memory of plain attention (a straddling tile costs one more P V product instead).
            s_lo = tl.maximum(t_lo, t_far)
            s_hi = tl.minimum(t_hi, t_near)
            q_far = _load_tile(Q_far + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
            acc, l_i, m_i = _fwd_kind(acc, l_i, m_i, q_far, K_far, V, t_lo, a, b, t_hi, t_lo, t_far, qpos, row_scale,
                                      Nk, stride_kfn, stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base,
                                      CAUSAL, HAS_WINDOW,
                                      FAR, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, XPOS)
            acc, l_i, m_i = _fwd_segment(acc, l_i, m_i, q_far, q_far, K_far, K_far, V, s_lo, s_hi, qpos, row_scale, Nk,
                                         stride_kfn, stride_kfn, stride_vn, window, rerope_w, offs_n, offs_d, xrate,
                                         x_base, CAUSAL,
                                         HAS_WINDOW, FAR_PART, True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, XPOS)
            q = _load_tile(Q + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
            acc, l_i, m_i = _fwd_segment(acc, l_i, m_i, q, q, K, K, V, s_lo, s_hi, qpos, row_scale, Nk, stride_kn,
                                         stride_kn, stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base,
                                         CAUSAL, HAS_WINDOW,
                                         NEAR_PART, True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, XPOS)
            acc, l_i, m_i = _fwd_kind(acc, l_i, m_i, q, K, V, t_lo, a, b, t_hi, t_near, t_hi, qpos, row_scale, Nk,
                                      stride_kn, stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL,
                                      HAS_WINDOW, NEAR,
                                      HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, XPOS)
        else:
            q = _load_tile(Q + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
            acc, l_i, m_i = _fwd_kind(acc, l_i, m_i, q, K, V, t_lo, a, b, t_hi, t_lo, t_hi, qpos, row_scale, Nk,
                                      stride_kn, stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL,
                                      HAS_WINDOW, NEAR,
                                      HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, XPOS)

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = m_i * _row_scale(qpos, sm_scale, inv_ln_logn, LOGN) + tl.log(l_safe)
    lse2_hi = m_i * row_scale
    o_offs = off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om \
        + (offs_m[:, None] * stride_om + offs_d[None, :])
    _store_tile(Out + o_offs, out.to(Out.dtype.element_ty), rows, Nq, offs_d, HEAD_DIM, BLOCK_D)
    lse_offs = (off_b * H + off_h) * Nq + rows
    tl.store(Lse + lse_offs, tl.where(nonempty, lse, float("-inf")), mask=rows < Nq)
    # for the backward, interleaved (max * scale, log2 of the sum) in log2 units; +inf for an empty row (p = 0)
    tl.store(Lse2 + 2 * lse_offs, tl.where(nonempty, lse2_hi, float("inf")), mask=rows < Nq)
    tl.store(Lse2 + 2 * lse_offs + 1, tl.log2(l_safe), mask=rows < Nq)


@triton.jit
def _attn_bwd_preprocess(Out, DO, DLse, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, Nq,
                         H, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    """Delta = rowsum(dO * O) - dLse (an lse gradient enters the softmax backward as a shift of Delta)."""
    start_m = tl.program_id(1) * BLOCK_M
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    o = _load_tile(Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om
                   + (offs_m[:, None] * stride_om + offs_d[None, :]), rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + start_m.to(tl.int64) * stride_dom
                    + (offs_m[:, None] * stride_dom + offs_d[None, :]), rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_offs = (off_b * H + off_h) * Nq + rows
    if HAS_DLSE:
        delta -= tl.load(DLse + lse_offs, mask=rows < Nq, other=0.0)
    tl.store(Delta + lse_offs, delta, mask=rows < Nq)


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": partial(_prune, kind="dkdv")})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, Q_far, K_far, DO, Lse, Delta, DK, DK_far, DV, QPos, KPos, XRate, stride_qb, stride_qh,
                   stride_qm,
                   stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_qpb, stride_qpn,
                   stride_kpb, stride_kpn, Nq, Nk, H, HKV, GROUP, sm_scale, sm_scale_log2, inv_ln_logn, window,
                   rerope_w, section_heads, N_BUCKET, BH_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, REROPE: tl.constexpr, EXPLICIT: tl.constexpr,
                   LOGN: tl.constexpr, XPOS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """One key tile of one kv head: dk (near and far, w.r.t. the rotated k) and dv, summed over the q heads of the
    group and every query tile."""
    # causal: the first key tiles see the most queries and start first
    num_tiles = tl.cdiv(Nk, BLOCK_N)
    pid_bh, pid_n = _tile_schedule(tl.program_id(0), num_tiles, tl.num_programs(0) // num_tiles, section_heads, False)
    off_b = (pid_bh // HKV).to(tl.int64)
    off_hk = (pid_bh % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    tl.static_assert(not (XPOS and (EXPLICIT or REROPE)), "xPos runs with default positions and no ReRoPE")
    tl.static_assert(not XPOS or (XPOS_PERIOD % BLOCK_M == 0 and XPOS_PERIOD % BLOCK_N == 0),
                     "xPos needs tiles that divide its period")
    xrate = _xpos_rates(XRate, offs_d, HEAD_DIM, BLOCK_D, XPOS)
    x_base = start_n - start_n % XPOS_PERIOD  # xPos: the key period's first position

    k_offs = off_b * stride_kb + off_hk * stride_kh + start_n.to(tl.int64) * stride_kn \
        + (offs_n[:, None] * stride_kn + offs_d[None, :])
    v = _load_tile(V + off_b * stride_vb + off_hk * stride_vh + start_n.to(tl.int64) * stride_vn
                   + (offs_n[:, None] * stride_vn + offs_d[None, :]), cols, Nk, offs_d, True, HEAD_DIM, BLOCK_D)
    dk_offs = off_b * stride_dkb + off_hk * stride_dkh + start_n.to(tl.int64) * stride_dkn \
        + (offs_n[:, None] * stride_dkn + offs_d[None, :])
    if LOGN:  # the per-row scale is already inside ds
        ds_scale = 1.0
    else:
        ds_scale = sm_scale
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if EXPLICIT:
        k = _load_tile(K + k_offs, cols, Nk, offs_d, True, HEAD_DIM, BLOCK_D)
        if REROPE:
            k_far = _load_tile(K_far + k_offs, cols, Nk, offs_d, True, HEAD_DIM, BLOCK_D)
        else:
            k_far = k
        kpos = tl.load(KPos + off_b * stride_kpb + cols * stride_kpn, mask=cols < Nk, other=0).to(tl.int32)
        k_min, k_max = _valid_range(kpos, cols < Nk)
        QPos += off_b * stride_qpb
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk_far = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUP):
            Qh, DOh, Lseh, Deltah = _group_head(Q, DO, Lse, Delta, off_b, off_hk, g, GROUP, H, Nq, stride_qb,
                                                stride_qh, stride_dob, stride_doh)
            Qh_far = Q_far + off_b * stride_qb + (off_hk * GROUP + g) * stride_qh
            for i in range(0, tl.cdiv(Nq, BLOCK_M)):
                start_m = i * BLOCK_M
                rows = start_m + offs_m
                qpos = tl.load(QPos + rows * stride_qpn, mask=rows < Nq, other=0).to(tl.int32)
                q_min, q_max = _valid_range(qpos, rows < Nq)
                kind = _explicit_tile_kind(q_min - k_max, q_max - k_min, window, rerope_w, CAUSAL, HAS_WINDOW, REROPE)
                if kind == NEAR:
                    dk, dk_far, dv = _bwd_kv_tile(dk, dk_far, dv, k, k_far, v, Qh, Qh_far, DOh, Lseh, Deltah, start_m,
                                                  qpos, kpos, Nq, stride_qm, stride_dom, sm_scale, sm_scale_log2,
                                                  inv_ln_logn, window, rerope_w, offs_m, offs_d, xrate, x_base,
                                                  CAUSAL, HAS_WINDOW,
                                                  NEAR, True, LOGN, HEAD_DIM, BLOCK_D, DOT_PREC, XPOS)
                if REROPE:
                    if kind == FAR:
                        dk, dk_far, dv = _bwd_kv_tile(dk, dk_far, dv, k, k_far, v, Qh, Qh_far, DOh, Lseh, Deltah,
                                                      start_m, qpos, kpos, Nq, stride_qm, stride_dom, sm_scale,
                                                      sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m, offs_d,
                                                      xrate, x_base, CAUSAL, HAS_WINDOW, FAR, True, LOGN, HEAD_DIM,
                                                      BLOCK_D, DOT_PREC, XPOS)
                    if kind == BOTH:
                        dk, dk_far, dv = _bwd_kv_tile(dk, dk_far, dv, k, k_far, v, Qh, Qh_far, DOh, Lseh, Deltah,
                                                      start_m, qpos, kpos, Nq, stride_qm, stride_dom, sm_scale,
                                                      sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m, offs_d,
                                                      xrate, x_base, CAUSAL, HAS_WINDOW, BOTH, True, LOGN, HEAD_DIM,
                                                      BLOCK_D,
                                                      DOT_PREC, XPOS)
        if REROPE:
            _store_tile(DK_far + dk_offs, (dk_far * ds_scale).to(DK.dtype.element_ty), cols, Nk, offs_d, HEAD_DIM,
                        BLOCK_D)
    else:
        kpos = cols
        qoff = Nk - Nq
        i_lo, a, b, i_hi, i_near, i_far = _query_tile_ranges(start_n, tl.minimum(start_n + BLOCK_N, Nk) - 1, Nq,
                                                             qoff, window, rerope_w, CAUSAL, HAS_WINDOW, REROPE,
                                                             BLOCK_M)
        if REROPE:
            # Far side first with only k_far and one dk accumulator live (as in the forward): the fully far query
            # tiles, then the straddling tiles' far pairs; dk_far is stored before the near side starts.
            s_lo = tl.maximum(i_lo, i_near)
            s_hi = tl.minimum(i_hi, i_far)
            k_far = _load_tile(K_far + k_offs, cols, Nk, offs_d, True, HEAD_DIM, BLOCK_D)
            dk_far = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for g in range(0, GROUP):
                Qh_far, DOh, Lseh, Deltah = _group_head(Q_far, DO, Lse, Delta, off_b, off_hk, g, GROUP, H, Nq,
                                                        stride_qb, stride_qh, stride_dob, stride_doh)
                dk_far, dv = _bwd_kv_kind(dk_far, dv, k_far, v, Qh_far, DOh, Lseh, Deltah, i_lo, a, b, i_hi, i_far,
                                          i_hi, kpos, qoff, Nq, stride_qm, stride_dom, sm_scale, sm_scale_log2,
                                          inv_ln_logn, window, rerope_w, offs_m, offs_d, xrate, x_base, CAUSAL,
                                          HAS_WINDOW, NEAR,
                                          LOGN, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, XPOS)
                dk_far, dk_same, dv = _bwd_kv_segment(dk_far, dk_far, dv, k_far, k_far, v, Qh_far, Qh_far, DOh, Lseh,
                                                      Deltah, s_lo, s_hi, kpos, qoff, Nq, stride_qm, stride_dom,
                                                      sm_scale, sm_scale_log2, inv_ln_logn, window, rerope_w, offs_m,
                                                      offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, FAR_PART, True, LOGN,
                                                      HEAD_DIM,
                                                      BLOCK_D, BLOCK_M, DOT_PREC, XPOS)
            _store_tile(DK_far + dk_offs, (dk_far * ds_scale).to(DK.dtype.element_ty), cols, Nk, offs_d, HEAD_DIM,
                        BLOCK_D)
            first_near = i_near
        else:
            first_near = i_hi
        k = _load_tile(K + k_offs, cols, Nk, offs_d, True, HEAD_DIM, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUP):
            Qh, DOh, Lseh, Deltah = _group_head(Q, DO, Lse, Delta, off_b, off_hk, g, GROUP, H, Nq, stride_qb,
                                                stride_qh, stride_dob, stride_doh)
            if REROPE:
                dk, dk_same, dv = _bwd_kv_segment(dk, dk, dv, k, k, v, Qh, Qh, DOh, Lseh, Deltah,
                                                  tl.maximum(i_lo, i_near), tl.minimum(i_hi, i_far), kpos, qoff, Nq,
                                                  stride_qm, stride_dom, sm_scale, sm_scale_log2, inv_ln_logn, window,
                                                  rerope_w, offs_m, offs_d, xrate, x_base, CAUSAL, HAS_WINDOW,
                                                  NEAR_PART, True, LOGN,
                                                  HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, XPOS)
            dk, dv = _bwd_kv_kind(dk, dv, k, v, Qh, DOh, Lseh, Deltah, i_lo, a, b, i_hi, i_lo, first_near, kpos, qoff,
                                  Nq, stride_qm, stride_dom, sm_scale, sm_scale_log2, inv_ln_logn, window, rerope_w,
                                  offs_m, offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, NEAR, LOGN, HEAD_DIM, BLOCK_D,
                                  BLOCK_M,
                                  DOT_PREC, XPOS)

    _store_tile(DK + dk_offs, (dk * ds_scale).to(DK.dtype.element_ty), cols, Nk, offs_d, HEAD_DIM, BLOCK_D)
    dv_offs = off_b * stride_dvb + off_hk * stride_dvh + start_n.to(tl.int64) * stride_dvn \
        + (offs_n[:, None] * stride_dvn + offs_d[None, :])
    _store_tile(DV + dv_offs, dv.to(DV.dtype.element_ty), cols, Nk, offs_d, HEAD_DIM, BLOCK_D)


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": partial(_prune, kind="dq")})
@triton.jit
def _attn_bwd_dq(Q, K, V, Q_far, K_far, DO, Lse, Delta, DQ, DQ_far, QPos, KPos, XRate, stride_qb, stride_qh, stride_qm,
                 stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm, stride_qpb, stride_qpn, stride_kpb, stride_kpn, Nq, Nk, H, GROUP,
                 sm_scale, sm_scale_log2, inv_ln_logn, window, rerope_w, section_heads, N_BUCKET, BH_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 REROPE: tl.constexpr, EXPLICIT: tl.constexpr, LOGN: tl.constexpr, XPOS: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile of one q head: dq near and far (w.r.t. the rotated q), over every key tile."""
    off_b, off_h, off_hk, start_m = _query_program(Nq, H, GROUP, section_heads, CAUSAL, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    tl.static_assert(not (XPOS and (EXPLICIT or REROPE)), "xPos runs with default positions and no ReRoPE")
    tl.static_assert(not XPOS or (XPOS_PERIOD % BLOCK_M == 0 and XPOS_PERIOD % BLOCK_N == 0),
                     "xPos needs tiles that divide its period")
    xrate = _xpos_rates(XRate, offs_d, HEAD_DIM, BLOCK_D, XPOS)
    x_base = Nk - Nq + start_m - start_m % XPOS_PERIOD  # xPos: the query period's first position (default positions)

    q_offs = off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qm \
        + (offs_m[:, None] * stride_qm + offs_d[None, :])
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + start_m.to(tl.int64) * stride_dom
                    + (offs_m[:, None] * stride_dom + offs_d[None, :]), rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
    lse_offs = (off_b * H + off_h) * Nq + rows
    lse = tl.load(Lse + 2 * lse_offs, mask=rows < Nq, other=float("inf"))
    lse_lo = tl.load(Lse + 2 * lse_offs + 1, mask=rows < Nq, other=0.0)
    dlt = tl.load(Delta + lse_offs, mask=rows < Nq, other=0.0)
    K += off_b * stride_kb + off_hk * stride_kh
    K_far += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    if EXPLICIT:
        qpos = tl.load(QPos + off_b * stride_qpb + rows * stride_qpn, mask=rows < Nq, other=0).to(tl.int32)
    else:
        qpos = Nk - Nq + rows
    row_scale = _row_scale(qpos, sm_scale_log2, inv_ln_logn, LOGN)
    ds_scale = _row_scale(qpos, sm_scale, inv_ln_logn, LOGN)  # softmax_scale * g(P) per row
    dq_offs = off_b * stride_dqb + off_h * stride_dqh + start_m.to(tl.int64) * stride_dqm \
        + (offs_m[:, None] * stride_dqm + offs_d[None, :])

    if EXPLICIT:
        q = _load_tile(Q + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
        if REROPE:
            q_far = _load_tile(Q_far + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
        else:
            q_far = q
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq_far = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        p_min, p_max = _valid_range(qpos, rows < Nq)
        KPos += off_b * stride_kpb
        for t in range(0, tl.cdiv(Nk, BLOCK_N)):
            start_n = t * BLOCK_N
            cols = start_n + offs_n
            kpos = tl.load(KPos + cols * stride_kpn, mask=cols < Nk, other=0).to(tl.int32)
            k_min, k_max = _valid_range(kpos, cols < Nk)
            kind = _explicit_tile_kind(p_min - k_max, p_max - k_min, window, rerope_w, CAUSAL, HAS_WINDOW, REROPE)
            if kind == NEAR:
                dq, dq_far = _bwd_q_tile(dq, dq_far, q, q_far, do, lse, lse_lo, dlt, K, K_far, V, start_n, qpos, kpos,
                                         row_scale, Nk, stride_kn, stride_vn, window, rerope_w, offs_n, offs_d, xrate,
                                         x_base, CAUSAL,
                                         HAS_WINDOW, NEAR, True, HEAD_DIM, BLOCK_D, DOT_PREC, XPOS)
            if REROPE:
                if kind == FAR:
                    dq, dq_far = _bwd_q_tile(dq, dq_far, q, q_far, do, lse, lse_lo, dlt, K, K_far, V, start_n, qpos,
                                             kpos, row_scale, Nk, stride_kn, stride_vn, window, rerope_w, offs_n,
                                             offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, FAR, True, HEAD_DIM, BLOCK_D,
                                             DOT_PREC, XPOS)
                if kind == BOTH:
                    dq, dq_far = _bwd_q_tile(dq, dq_far, q, q_far, do, lse, lse_lo, dlt, K, K_far, V, start_n, qpos,
                                             kpos, row_scale, Nk, stride_kn, stride_vn, window, rerope_w, offs_n,
                                             offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, BOTH, True, HEAD_DIM, BLOCK_D,
                                             DOT_PREC, XPOS)
        if REROPE:
            _store_tile(DQ_far + dq_offs, (dq_far * ds_scale[:, None]).to(DQ.dtype.element_ty), rows, Nq, offs_d,
                        HEAD_DIM, BLOCK_D)
    else:
        p_lo, p_hi = _row_bounds(start_m, Nq, BLOCK_M, Nk - Nq)
        t_lo, a, b, t_hi, t_far, t_near = _key_tile_ranges(p_lo, p_hi, Nk, window, rerope_w, CAUSAL, HAS_WINDOW, REROPE,
                                                           BLOCK_N)
        s_lo = tl.maximum(t_lo, t_far)  # the straddling key tiles
        s_hi = tl.minimum(t_hi, t_near)
        if REROPE:
            # Far side first with only q_far and one dq accumulator live (as in the forward): the fully far key
            # tiles, then the straddling tiles' far keys; dq_far is stored before the near side starts.
            q_far = _load_tile(Q_far + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
            dq_far = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            dq_far = _bwd_q_kind(dq_far, q_far, do, lse, lse_lo, dlt, K_far, V, t_lo, a, b, t_hi, t_lo, t_far, qpos,
                                 row_scale, Nk, stride_kn, stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base,
                                 CAUSAL,
                                 HAS_WINDOW, NEAR, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, XPOS)
            dq_far, dq_same = _bwd_q_segment(dq_far, dq_far, q_far, q_far, do, lse, lse_lo, dlt, K_far, K_far, V, s_lo,
                                             s_hi, qpos, row_scale, Nk, stride_kn, stride_vn, window, rerope_w, offs_n,
                                             offs_d, xrate, x_base, CAUSAL, HAS_WINDOW, FAR_PART, True, HEAD_DIM,
                                             BLOCK_D, BLOCK_N,
                                             DOT_PREC, XPOS)
            _store_tile(DQ_far + dq_offs, (dq_far * ds_scale[:, None]).to(DQ.dtype.element_ty), rows, Nq, offs_d,
                        HEAD_DIM, BLOCK_D)
            first_near = t_near
        else:
            first_near = t_lo
        q = _load_tile(Q + q_offs, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if REROPE:
            dq, dq_same = _bwd_q_segment(dq, dq, q, q, do, lse, lse_lo, dlt, K, K, V, s_lo, s_hi, qpos, row_scale, Nk,
                                         stride_kn, stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base,
                                         CAUSAL, HAS_WINDOW,
                                         NEAR_PART, True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, XPOS)
        dq = _bwd_q_kind(dq, q, do, lse, lse_lo, dlt, K, V, t_lo, a, b, t_hi, first_near, t_hi, qpos, row_scale, Nk,
                         stride_kn, stride_vn, window, rerope_w, offs_n, offs_d, xrate, x_base, CAUSAL, HAS_WINDOW,
                         NEAR, HEAD_DIM,
                         BLOCK_D, BLOCK_N, DOT_PREC, XPOS)

    _store_tile(DQ + dq_offs, (dq * ds_scale[:, None]).to(DQ.dtype.element_ty), rows, Nq, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchArgs:
    """Everything the kernels need besides q, k, v and positions, fixed once per call (`LaunchArgs.build`)."""
    tables: object  # rotation tables of q and k (scaled_rope.tables.RotaryTables), None: no rotation
    q_far_tables: object  # ReRoPE's far q
    k_far_tables: object  # ReRoPE's far k
    q_far_both_tables: object  # far q with k's attention factor too, when the forward reads k itself as far k
    causal: bool
    has_window: bool
    window: int
    rerope: bool
    rerope_w: int
    k_far_unrotated: bool  # the far k tables rotate by 0 (plain ReRoPE): far k = k * attention factor
    explicit: bool
    q_sign: float  # 1, -1 or 0, folded into the rotated q
    logn: bool
    inv_ln_logn: float
    sm_scale: float  # > 0
    sm_scale_log2: float
    xpos_rate: object = None  # xPos: float32 (head_dim,) log2(zeta) / scale base per column (`xpos_rates`)

    @staticmethod
    def build(tables, q_far_tables, k_far_tables, q_far_both_tables, *, nk: int, explicit: bool, causal: bool,
              window: int | None, rerope_window: int | None, q_sign: float, sm_scale: float,
              logn_base: float | None, xpos_rate=None) -> "LaunchArgs":
        """q_sign and sm_scale > 0: softmax_scale with its sign moved into q. With default positions every delta
        is < nk: a window or ReRoPE window that large changes nothing and is dropped."""
        has_window = window is not None and (explicit or window < nk)
        rerope = rerope_window is not None and tables is not None and (explicit or rerope_window < nk)
        return LaunchArgs(
            tables=tables, q_far_tables=q_far_tables, k_far_tables=k_far_tables,
            q_far_both_tables=q_far_both_tables, causal=bool(causal), has_window=has_window,
            window=min(int(window), _MAX_WINDOW) if has_window else 0, rerope=rerope,
            rerope_w=max(min(int(rerope_window), _MAX_WINDOW), -_MAX_WINDOW) if rerope else 0,
            k_far_unrotated=q_far_both_tables is not None, explicit=explicit, q_sign=q_sign,
            logn=logn_base is not None, inv_ln_logn=1.0 / math.log(logn_base) if logn_base is not None else 0.0,
            sm_scale=sm_scale, sm_scale_log2=sm_scale * 1.4426950408889634, xpos_rate=xpos_rate)

    def constexprs(self, head_dim: int, n_bucket: int, bh_bucket: int, dtype: torch.dtype) -> dict:
        return dict(N_BUCKET=n_bucket, BH_BUCKET=bh_bucket, HEAD_DIM=head_dim,
                    BLOCK_D=max(16, next_power_of_2(head_dim)),
                    CAUSAL=self.causal, HAS_WINDOW=self.has_window, REROPE=self.rerope, EXPLICIT=self.explicit,
                    LOGN=self.logn, XPOS=self.xpos_rate is not None,
                    DOT_PREC="ieee" if dtype == torch.float32 else "tf32")


def _length_bucket(nq: int, nk: int) -> int:
    """Autotune key for the lengths: powers of two up to 16k; longer sequences reuse the 16k choice."""
    return min(next_power_of_2(max(nq, nk)), 16384)


def _grid_bucket(batch: int, heads: int) -> int:
    """Autotune key for batch * heads (powers of two up to 256): a small grid may prefer smaller query tiles."""
    return min(next_power_of_2(max(batch * heads, 1)), 256)


_L2_SECTION_BYTES = 8 * 2 ** 20  # K/V the programs running at once share (H100 L2: 50 MB); 32 MB measured slower


def l2_section_heads(bh_count: int, group: int, bytes_per_shared_head: int) -> int:
    """Heads per L2 section of the tile schedule: as many as keep the tensors they stream (bytes_per_shared_head
    per kv head, shared by group consecutive q heads; group 1 for a kv-head grid) within _L2_SECTION_BYTES, a
    multiple of group. SCALED_ROPE_L2_SECTION_HEADS overrides it for measurements (1: one head at a time; a
    large number: all heads tile-major)."""
    heads = _env.l2_section_heads()
    if heads is None:
        heads = max(1, _L2_SECTION_BYTES // max(bytes_per_shared_head, 1)) * group
    return max(1, min(heads, bh_count))


def _scratch_like(x: torch.Tensor) -> torch.Tensor:
    """A (B, N, H, D) view of a fresh (B, H, N, D) buffer: each head's rows are one contiguous block."""
    batch, n, heads, dim = x.shape
    return _alloc.empty((batch, heads, n, dim), x.dtype, x.device).transpose(1, 2)


_CACHE: dict = {}  # small derived tensors reused between calls (default positions)


def _cached(key, device, make):
    return _alloc.kept(_CACHE, key, device, make, 256)


def default_positions(batch: int, start: int, n: int, device) -> torch.Tensor:
    """start..start+n-1 for every row (a stride-0 view of one cached row)."""
    return _cached(("positions", str(device), start, n), device,
                   lambda: torch.arange(start, start + n, dtype=torch.int32, device=device)).expand(batch, n)


def _rotated(x, positions, tables):
    if tables is None:
        return x
    return rotate(x, positions, tables, out=_scratch_like(x))


def _rotated_pair(x, positions, tables, far_tables):
    """x rotated with the near and with the far tables in one pass (x read once) into two scratch buffers."""
    return rotate(x, positions, tables, out=_scratch_like(x), second_tables=far_tables, second_out=_scratch_like(x))


def _shared_rotation(q, k, q_pos, k_pos, launch: LaunchArgs) -> bool:
    """q and k rotate at the same positions (self-attention with default positions, or one positions tensor for
    both): one launch can rotate both."""
    if launch.tables is None or q.shape[1] != k.shape[1]:
        return False
    return q_pos is k_pos if launch.explicit else True


def _rotate_inputs(q, k, q_pos, k_pos, launch: LaunchArgs):
    """Rotated scratch (q near, k near, q far, k far); the far pair is the near pair without ReRoPE."""
    if not launch.rerope:
        if _shared_rotation(q, k, q_pos, k_pos, launch):
            q_near, k_near = rotate(q, q_pos, launch.tables, out=_scratch_like(q), y=k, y_out=_scratch_like(k))
            q_near = signed(q_near, q, launch.q_sign)
        else:
            q_near = signed(_rotated(q, q_pos, launch.tables), q, launch.q_sign)
            k_near = _rotated(k, k_pos, launch.tables)
        return q_near, k_near, q_near, k_near
    q_near, q_far = _rotated_pair(q, q_pos, launch.tables, launch.q_far_tables)
    k_near, k_far = _rotated_pair(k, k_pos, launch.tables, launch.k_far_tables)
    return signed(q_near, q, launch.q_sign), k_near, signed(q_far, q, launch.q_sign), k_far


def _forward_operands(q, k, q_pos, k_pos, launch: LaunchArgs):
    """The forward's operands (q near, k near, q far, k far). For plain ReRoPE the far k is the caller's k itself:
    <m rot(q, w), m k> = <m^2 rot(q, w), k>, so the far q takes both attention factors and no far k is written."""
    if not (launch.rerope and launch.k_far_unrotated):
        return _rotate_inputs(q, k, q_pos, k_pos, launch)
    far_q_tables = launch.q_far_both_tables
    if _shared_rotation(q, k, q_pos, k_pos, launch):  # q near, q far and k near in one launch
        q_near, q_far, k_near = rotate(q, q_pos, launch.tables, out=_scratch_like(q), second_tables=far_q_tables,
                                       second_out=_scratch_like(q), y=k, y_out=_scratch_like(k))
    else:
        q_near, q_far = _rotated_pair(q, q_pos, launch.tables, far_q_tables)
        k_near = _rotated(k, k_pos, launch.tables)
    return signed(q_near, q, launch.q_sign), k_near, signed(q_far, q, launch.q_sign), k


def _xpos_period_factors(rate: torch.Tensor, n: int, sign: float) -> torch.Tensor:
    """float32 (n, head_dim): 2^(sign rate (i mod XPOS_PERIOD)) for the rows i of an operand."""
    period = XPOS_PERIOD.value
    steps = torch.arange(period, device=rate.device, dtype=torch.float32)
    table = torch.exp2(sign * steps[:, None] * rate[None, :])
    return table[torch.arange(n, device=rate.device) % period]


def scale_xpos_operands(q_r: torch.Tensor, k_r: torch.Tensor, rate: torch.Tensor) -> None:
    """xPos, in place on the rotated scratch operands (B, N, H, D): query row m times 2^(rate (m mod XPOS_PERIOD)),
    key n times 2^(-rate (n mod XPOS_PERIOD)), so that a tile pair needs one weight vector (`_xpos_vector`) and the
    keys enter the products as loaded. Every factor lies within 2^(|rate| XPOS_PERIOD) of 1. The backward applies
    the same to the gradients of the scaled operands (the scaling is its own transpose)."""
    q_r.mul_(_xpos_period_factors(rate, q_r.shape[1], 1.0)[None, :, None, :])
    k_r.mul_(_xpos_period_factors(rate, k_r.shape[1], -1.0)[None, :, None, :])


def _pos_args(positions, explicit: bool, dummy: torch.Tensor):
    if explicit:
        return positions, positions.stride(0), positions.stride(1)
    return dummy, 0, 0


def forward(q, k, v, q_pos, k_pos, launch: LaunchArgs):
    """(out (B, Nq, Hq, D), lse (B, Hq, Nq) float32 natural log, lse2 (B, Hq, Nq, 2) the log2-domain lse in two
    parts that `backward` takes). q (B, Nq, Hq, D), k, v (B, Nk, Hkv, D) with contiguous last dims; q_pos, k_pos
    int (B, N) tensors (`default_positions` when the call has none: then launch.explicit is False)."""
    batch, nq, heads, dim = q.shape
    nk, kv_heads = k.shape[1], k.shape[2]
    out = _alloc.empty((batch, nq, heads, dim), q.dtype, q.device)
    lse = _alloc.empty((batch, heads, nq), torch.float32, q.device)
    lse2 = _alloc.empty((batch, heads, nq, 2), torch.float32, q.device)
    if nq == 0 or batch == 0:
        return out, lse, lse2
    if nk == 0:
        return out.zero_(), lse.fill_(float("-inf")), lse2
    q_r, k_r, q_f, k_f = _forward_operands(q, k, q_pos, k_pos, launch)
    if launch.xpos_rate is not None:  # no ReRoPE: q_f, k_f are q_r, k_r
        scale_xpos_operands(q_r, k_r, launch.xpos_rate)
    qp, stride_qpb, stride_qpn = _pos_args(q_pos, launch.explicit, q_r)
    kp, stride_kpb, stride_kpn = _pos_args(k_pos, launch.explicit, q_r)
    n_bucket = _length_bucket(nq, nk)

    streamed = nk * dim * v.element_size() * (3 if launch.rerope else 2)  # K, V (and the far K) per kv head
    section = l2_section_heads(batch * heads, heads // kv_heads, streamed)

    def grid(meta):
        return (batch * heads * cdiv(nq, meta["BLOCK_M"]),)

    xr = q_r if launch.xpos_rate is None else launch.xpos_rate
    _attn_fwd[grid](
        q_r, k_r, v, q_f, k_f, out, lse, lse2, qp, kp, xr,
        q_r.stride(0), q_r.stride(2), q_r.stride(1), k_r.stride(0), k_r.stride(2), k_r.stride(1),
        k_f.stride(0), k_f.stride(2), k_f.stride(1), v.stride(0), v.stride(2), v.stride(1),
        out.stride(0), out.stride(2), out.stride(1),
        stride_qpb, stride_qpn, stride_kpb, stride_kpn,
        nq, nk, heads, heads // kv_heads, launch.sm_scale, launch.sm_scale_log2, launch.inv_ln_logn, launch.window,
        launch.rerope_w, section, **launch.constexprs(dim, n_bucket, _grid_bucket(batch, heads), q.dtype))
    return out, lse, lse2


def backward(do, dlse, q, k, v, out, lse2, q_pos, k_pos, launch: LaunchArgs):
    """(dq, dk, dv) for the unrotated inputs, in fresh tensors. lse2: the forward's log2-domain lse in two parts
    (B, H, Nq, 2), +inf on empty rows (`lse2_from_natural` makes it from another forward's lse); dlse: the
    gradient of the natural-log lse (B, H, Nq) or None."""
    batch, nq, heads, dim = q.shape
    nk, kv_heads = k.shape[1], k.shape[2]
    if nq == 0 or nk == 0 or batch == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if do.stride(-1) != 1:
        do = do.contiguous()
    consts = launch.constexprs(dim, _length_bucket(nq, nk), _grid_bucket(batch, heads), q.dtype)
    delta = _alloc.empty((batch, heads, nq), torch.float32, q.device)
    has_dlse = dlse is not None
    dlse = dlse.contiguous() if has_dlse else delta
    block_m = 16 if _INTERPRET else 64
    _attn_bwd_preprocess[(batch * heads, cdiv(nq, block_m))](
        out, do, dlse, delta, out.stride(0), out.stride(2), out.stride(1), do.stride(0), do.stride(2), do.stride(1),
        nq, heads, HAS_DLSE=has_dlse, HEAD_DIM=dim, BLOCK_D=consts["BLOCK_D"], BLOCK_M=block_m)

    q_r, k_r, q_f, k_f = _rotate_inputs(q, k, q_pos, k_pos, launch)
    if launch.xpos_rate is not None:
        scale_xpos_operands(q_r, k_r, launch.xpos_rate)
    qp, stride_qpb, stride_qpn = _pos_args(q_pos, launch.explicit, q_r)
    kp, stride_kpb, stride_kpn = _pos_args(k_pos, launch.explicit, q_r)

    dk_r = _scratch_like(k)
    dk_f = _scratch_like(k) if launch.rerope else dk_r
    dv = _alloc.empty(v.shape, v.dtype, v.device)

    group = heads // kv_heads
    operands = 3 if launch.rerope else 2  # q (and q far) and dO of every q head of the group
    section_kv = l2_section_heads(batch * kv_heads, 1, nq * dim * q.element_size() * operands * group)
    section_q = l2_section_heads(batch * heads, group, nk * dim * k.element_size() * (3 if launch.rerope else 2))

    def grid_kv(meta):
        return (batch * kv_heads * cdiv(nk, meta["BLOCK_N"]),)

    xr = q_r if launch.xpos_rate is None else launch.xpos_rate
    _attn_bwd_dkdv[grid_kv](
        q_r, k_r, v, q_f, k_f, do, lse2, delta, dk_r, dk_f, dv, qp, kp, xr,
        q_r.stride(0), q_r.stride(2), q_r.stride(1), k_r.stride(0), k_r.stride(2), k_r.stride(1),
        v.stride(0), v.stride(2), v.stride(1), do.stride(0), do.stride(2), do.stride(1),
        dk_r.stride(0), dk_r.stride(2), dk_r.stride(1), dv.stride(0), dv.stride(2), dv.stride(1),
        stride_qpb, stride_qpn, stride_kpb, stride_kpn,
        nq, nk, heads, kv_heads, group, launch.sm_scale, launch.sm_scale_log2, launch.inv_ln_logn, launch.window,
        launch.rerope_w, section_kv, **consts)

    dq_r = _scratch_like(q)
    dq_f = _scratch_like(q) if launch.rerope else dq_r

    def grid_q(meta):
        return (batch * heads * cdiv(nq, meta["BLOCK_M"]),)

    _attn_bwd_dq[grid_q](
        q_r, k_r, v, q_f, k_f, do, lse2, delta, dq_r, dq_f, qp, kp, xr,
        q_r.stride(0), q_r.stride(2), q_r.stride(1), k_r.stride(0), k_r.stride(2), k_r.stride(1),
        v.stride(0), v.stride(2), v.stride(1), do.stride(0), do.stride(2), do.stride(1),
        dq_r.stride(0), dq_r.stride(2), dq_r.stride(1),
        stride_qpb, stride_qpn, stride_kpb, stride_kpn,
        nq, nk, heads, group, launch.sm_scale, launch.sm_scale_log2, launch.inv_ln_logn, launch.window,
        launch.rerope_w, section_q, **consts)
    del q_r, k_r, q_f, k_f
    if launch.q_sign != 1.0:  # gradients w.r.t. the signed rotated q
        dq_r.mul_(launch.q_sign)
        if launch.rerope:
            dq_f.mul_(launch.q_sign)

    if launch.xpos_rate is not None:  # gradients of the scaled operands -> of the rotated ones
        scale_xpos_operands(dq_r, dk_r, launch.xpos_rate)
    dq = _unrotate(dq_r, dq_f, q, q_pos, launch.tables, launch.q_far_tables, launch.rerope)
    dk = _unrotate(dk_r, dk_f, k, k_pos, launch.tables, launch.k_far_tables, launch.rerope)
    return dq, dk, dv


def _unrotate(g_near, g_far, x, positions, tables, far_tables, rerope: bool):
    """Gradient w.r.t. the unrotated x: the transposed rotations applied to the near and far parts, summed."""
    if tables is None:
        return g_near
    grad = rotate(g_near, positions, tables, inverse=True, out=_alloc.empty(x.shape, x.dtype, x.device))
    if rerope:
        grad += rotate(g_far, positions, far_tables, inverse=True)
    return grad


def lse2_from_natural(lse: torch.Tensor) -> torch.Tensor:
    """The backward's log2-domain lse (B, H, Nq, 2), all in the first part, from a natural-log lse (B, H, Nq) of
    another forward (the CUDA backend's); -inf (an empty row) becomes +inf, which gives p = 0."""
    log2_lse = torch.where(lse == float("-inf"), float("inf"), lse.float() * 1.4426950408889634)
    return torch.stack((log2_lse, torch.zeros_like(log2_lse)), dim=-1).contiguous()
