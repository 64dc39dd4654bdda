"""Split-KV decode and chunked prefill over an UNROTATED key cache (flash-decoding with on-chip rotation).

Grid (num_splits, Hkv, B * m_blocks). A program takes one KV head, all GROUP = Hq / Hkv query heads that share it
and a block of query tokens as its M rows (row r = token r // GROUP, head r % GROUP), so each K/V byte is read once
per head group. It walks one chunk of that row's cache in tiles of BLOCK_N keys, rotating keys as they arrive.

Rotation cost per key element is a few FMAs: a rotation R(a) of a pair is orthogonal, so for a tile starting at
p0, <R(P w) q, R((p0 + j) w) k> = <R((P - p0) w) q, R(j w) k>. The key side uses a per-program table
cos/sin(j w), j < BLOCK_N (exact, from the fixed-point turns, held in registers); the query side is shifted by
-p0 once per tile (BLOCK_M x R/2 work) with cos/sin(p0 w) exact every 8th tile and stepped by BLOCK_N w in
between (every tile exact for float32). Tiles are walked in segments of one kind (ReRoPE all-far / mixed /
all-near, exact per-element rotation below LongRoPE's n_hat), each a compile-time specialisation. The frequencies
are the row's own (LongRoPE short/long set or dynamic NTK base picked from the row's length by `build_tables`), so
nothing in the cache depends on them. Scores are sums of partial dots: the two halves of the pairs plus the
pass-through dims. With several splits each program writes its partial output with its running max and sum, and the
last split of a row to finish merges them (`_merge_rows`, counted on a counter per row that the merging program
resets to zero for the plan's next launch): one attention launch per call whatever the split count.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import triton
import triton.language as tl

from .._alloc import empty, kept
from .._env import direct_launch, triton_interpret
from ._host import cdiv, next_power_of_2
from .rope import rope_cos_sin

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------------
# jitted helpers
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_pairs(x1, x2, c, s):
    return x1 * c - x2 * s, x1 * s + x2 * c


@triton.jit
def _load_pairs(rows, row_mask, stride_d, ROWS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                INTERLEAVED: tl.constexpr):
    """The rotary pairs (x1, x2), each (ROWS, HALF_PAD), of the rows at pointers `rows`; dtype as stored."""
    if INTERLEAVED:  # one contiguous load, then de-interleave on-chip
        col = tl.arange(0, 2 * HALF_PAD)
        x = tl.load(rows[:, None] + col[None, :] * stride_d, mask=row_mask[:, None] & (col < 2 * HALF)[None, :],
                    other=0.0)
        x1, x2 = tl.split(tl.reshape(x, (ROWS, HALF_PAD, 2)))
    else:
        pair = tl.arange(0, HALF_PAD)
        mask = row_mask[:, None] & (pair < HALF)[None, :]
        x1 = tl.load(rows[:, None] + pair[None, :] * stride_d, mask=mask, other=0.0)
        x2 = tl.load(rows[:, None] + (pair + HALF)[None, :] * stride_d, mask=mask, other=0.0)
    return x1, x2


@triton.jit
def _load_pass(rows, row_mask, stride_d, START: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr):
    """Pass-through dims START..START+PASS-1 of the rows at pointers `rows`, (ROWS, PASS_PAD)."""
    col = tl.arange(0, PASS_PAD)
    return tl.load(rows[:, None] + (START + col)[None, :] * stride_d,
                   mask=row_mask[:, None] & (col < PASS)[None, :], other=0.0)


@triton.jit
def _shift_q(q1, q2, c0, s0, DTYPE: tl.constexpr):
    """Rotate the (rotated) query pairs by -p0 * w, given cos/sin(p0 * w): the tile's keys then rotate by j * w."""
    return (q1 * c0[None, :] + q2 * s0[None, :]).to(DTYPE), (q2 * c0[None, :] - q1 * s0[None, :]).to(DTYPE)


@triton.jit
def _tile_base(tile, lo, c, s, c_step, s_step, turns, BLOCK_N: tl.constexpr, HALF_PAD: tl.constexpr,
               ANCHOR: tl.constexpr):
    """cos/sin(p0 * w) at tile base p0 = tile * BLOCK_N: exact every ANCHOR tiles, else the previous tile's
    rotated by BLOCK_N * w (a few FMAs instead of a sin and a cos per pair; the drift over 7 steps stays well
    below 1e-6, and far below half-precision rounding)."""
    if (tile - lo) % ANCHOR == 0:
        zero = tl.zeros([HALF_PAD], dtype=tl.int64)
        c, s = rope_cos_sin(zero + tile * BLOCK_N, turns, zero)
    else:
        c, s = c * c_step - s * s_step, s * c_step + c * s_step
    return c, s


@triton.jit
def _row_length(SEQLENS, b, n_new, capacity):
    """(ok, length) of row b: length = SEQLENS[b] + n_new, ok when SEQLENS[b] >= 0 and length <= capacity (int64
    arithmetic, so no overflow hides a bad row); length is 0 for a row that is not ok."""
    cached = tl.load(SEQLENS + b).to(tl.int64)
    ok = (cached >= 0) & (cached + n_new <= capacity)
    return ok, tl.where(ok, cached + n_new, 0)


@triton.jit
def _lse(m, total):
    """ln(total * 2^m), -inf where total == 0; in float64 so that the float32 result is rounded once."""
    lse = m.to(tl.float64) * 0.6931471805599453 + tl.log(tl.where(total == 0.0, 1.0, total).to(tl.float64))
    return tl.where(total == 0.0, float("-inf"), lse.to(tl.float32))


@triton.jit
def _score(a1, a2, ap, b1, b2, bp, HAS_ROT: tl.constexpr, HAS_PASS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """<a, b> over the two pair halves + pass-through dims: (BLOCK_M, BLOCK_N) fp32."""
    if HAS_ROT:
        acc = tl.dot(a1, tl.trans(b1), input_precision=DOT_PRECISION)
        acc = tl.dot(a2, tl.trans(b2), acc, input_precision=DOT_PRECISION)
        if HAS_PASS:
            acc = tl.dot(ap, tl.trans(bp), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(ap, tl.trans(bp), input_precision=DOT_PRECISION)
    return acc


NEAR: tl.constexpr = tl.constexpr(0)       # every pair near (or no ReRoPE): q shifted per tile, keys by the j-table
FAR: tl.constexpr = tl.constexpr(1)        # every pair far (ReRoPE)
NEAR_PART: tl.constexpr = tl.constexpr(2)  # tile straddles the ReRoPE window: its near pairs (the far ones masked)
EXACT: tl.constexpr = tl.constexpr(3)      # tile reaches below n_hat: keys rotated exactly per element
FAR_PART: tl.constexpr = tl.constexpr(4)   # tile straddles the ReRoPE window: its far pairs (the near ones masked)


@triton.jit
def _attend_tiles(acc, l_i, m_i, lo, hi,
                  k_head, v_head, BLOCK_TABLE, b64, seqlen, stride_btb, stride_btp, stride_kb, stride_kn, stride_kd,
                  stride_vb, stride_vn, stride_vd, qr1, qr2, qf1, qf2, qf1_d, qf2_d, qp, turns, turns_kf, turns_un,
                  factor, q_pos, row_scale, window, rerope_window, n_hat, offs_j, dcol,
                  d_mask, xrate, p_ref, MODE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  PASS: tl.constexpr, PASS_PAD: tl.constexpr, HAS_ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                  PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  LEAKY: tl.constexpr, DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ANCHOR: tl.constexpr,
                  XPOS: tl.constexpr):
    """Online softmax over key tiles lo..hi-1 of one kind (MODE). A tile straddling the ReRoPE window is visited
    twice, once per pair (NEAR_PART, FAR_PART), each visit with one key rotation and this segment's j-table.
    XPOS: the q pairs come weighted by 2^(rate (P - p_ref)); the keys' j-table takes 2^(-rate j) and the per-tile
    shift of q the rest, 2^(rate (p_ref - p0)), so each pair's term carries 2^(rate (P - Q)) (rate = log2(zeta) / B)."""
    far_side: tl.constexpr = MODE == FAR or MODE == FAR_PART
    # keys at p0 + j rotate by the j-table cos/sin(j w) times the keys' factor m (Leaky far keys: w / kappa), q by
    # -p0 w per tile; the table is made here, so only this segment's stays live
    j_turns = turns_kf if far_side and LEAKY else turns
    zero_pairs = tl.zeros([HALF_PAD], dtype=tl.int64)
    c_step, s_step = rope_cos_sin(zero_pairs + BLOCK_N, j_turns, zero_pairs)
    cos_j, sin_j = rope_cos_sin(offs_j.to(tl.int64)[:, None], j_turns[None, :],
                                tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.int64))
    cos_j = cos_j * factor
    sin_j = sin_j * factor
    if XPOS:
        decay_j = tl.exp2(-xrate[None, :] * offs_j.to(tl.float32)[:, None])
        cos_j = cos_j * decay_j
        sin_j = sin_j * decay_j
    q1 = qr1  # this segment's q pair
    q2 = qr2
    if far_side:
        q1 = qf1
        q2 = qf2
    c_b = tl.zeros([HALF_PAD], dtype=tl.float32)
    s_b = c_b
    for tile in range(lo, hi):
        p0 = tile * BLOCK_N
        offs_n = p0 + offs_j
        key_valid = offs_n < seqlen
        if PAGED:  # BLOCK_N divides PAGE_SIZE, so the tile lies in one page
            page = tl.load(BLOCK_TABLE + b64 * stride_btb + (p0 // PAGE_SIZE).to(tl.int64) * stride_btp,
                           mask=p0 < seqlen, other=0).to(tl.int64)
            slot = (p0 % PAGE_SIZE + offs_j).to(tl.int64)
            k_rows = k_head + page * stride_kb + slot * stride_kn
            v_rows = v_head + page * stride_vb + slot * stride_vn
        else:
            k_rows = k_head + b64 * stride_kb + offs_n.to(tl.int64) * stride_kn
            v_rows = v_head + b64 * stride_vb + offs_n.to(tl.int64) * stride_vn
        if PASS > 0:
            kp = _load_pass(k_rows, key_valid, stride_kd, 2 * HALF, PASS, PASS_PAD)
        else:
            kp = tl.zeros([BLOCK_N, 16], dtype=DTYPE)  # unused
        v = tl.load(v_rows[:, None] + dcol[None, :] * stride_vd, mask=key_valid[:, None] & d_mask[None, :],
                    other=0.0)
        delta = q_pos[:, None] - offs_n[None, :]
        if HAS_ROT:
            k1, k2 = _load_pairs(k_rows, key_valid, stride_kd, BLOCK_N, HALF, HALF_PAD, INTERLEAVED)
            if MODE == EXACT:
                kpos = offs_n.to(tl.int64)[:, None]
                early = kpos < n_hat
                kc, ks = rope_cos_sin(kpos, tl.where(early, turns_un[None, :], turns[None, :]),
                                      tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.int64))
                kc = tl.where(early, kc, kc * factor)
                ks = tl.where(early, ks, ks * factor)
                if XPOS:
                    decay = tl.exp2(xrate[None, :] * (p_ref - kpos).to(tl.float32))
                    kc = kc * decay
                    ks = ks * decay
                ky1, ky2 = _rotate_pairs(k1.to(tl.float32), k2.to(tl.float32), kc, ks)
                qk = _score(qr1.to(DTYPE), qr2.to(DTYPE), qp, ky1.to(DTYPE), ky2.to(DTYPE), kp, HAS_ROT, PASS > 0,
                            DOT_PRECISION)
            elif LEAKY or MODE == NEAR or MODE == NEAR_PART:  # keys rotated by the j-table, q shifted per tile
                c_b, s_b = _tile_base(tile, lo, c_b, s_b, c_step, s_step, j_turns, BLOCK_N, HALF_PAD, ANCHOR)
                if XPOS:
                    decay = tl.exp2(xrate * (p_ref - p0).to(tl.float32))
                    a1, a2 = _shift_q(q1, q2, c_b * decay, s_b * decay, DTYPE)
                else:
                    a1, a2 = _shift_q(q1, q2, c_b, s_b, DTYPE)
                ky1, ky2 = _rotate_pairs(k1.to(tl.float32), k2.to(tl.float32), cos_j, sin_j)
                qk = _score(a1, a2, qp, ky1.to(DTYPE), ky2.to(DTYPE), kp, HAS_ROT, PASS > 0, DOT_PRECISION)
            else:  # plain ReRoPE's far keys are not rotated (their factor is folded into the far q)
                qk = _score(qf1_d, qf2_d, qp, k1, k2, kp, HAS_ROT, PASS > 0, DOT_PRECISION)
        else:
            qk = _score(qp, qp, qp, kp, kp, kp, HAS_ROT, PASS > 0, DOT_PRECISION)

        allowed = key_valid[None, :]
        if MODE == NEAR_PART:
            allowed = allowed & (delta < rerope_window)
        if MODE == FAR_PART:
            allowed = allowed & (delta >= rerope_window)
        if CAUSAL:
            allowed = allowed & (delta >= 0)
        if HAS_WINDOW:
            allowed = allowed & (delta < window)
        qk = tl.where(allowed, qk * row_scale[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep exp2 finite
        p = tl.exp2(qk - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ---------------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(
    Q, K, V, SEQLENS, BLOCK_TABLE,
    TURNS, TURNS_UNSCALED, FACTOR, TURNS_QF, OFFSET_QF, TURNS_KF, XRATE,
    OUT, LSE, STATUS, COUNTER, OUT_FINAL, LSE_FINAL,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_btb, stride_btp,
    stride_tb, stride_tqb, stride_oqb, stride_tkb,
    stride_ob, stride_om, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_lm, stride_ls, stride_lx,
    stride_fb, stride_fm, stride_fh, stride_fd, stride_gb, stride_gh, stride_gm,
    n_q, n_new, capacity, n_m_blocks, num_splits, sm_scale_log2, inv_ln_logn_base, window, rerope_window, n_hat,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    HAS_ROT: tl.constexpr, INTERLEAVED: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, REROPE: tl.constexpr, LEAKY: tl.constexpr,
    HAS_NHAT: tl.constexpr, HAS_LOGN: tl.constexpr, SPLIT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ANCHOR: tl.constexpr, SPLITS_PAD: tl.constexpr, XPOS: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_bm = tl.program_id(2)
    b = pid_bm // n_m_blocks
    m_block = pid_bm % n_m_blocks
    b64 = b.to(tl.int64)
    # the row's length; a row outside 0..capacity reads nothing, outputs NaN and clears STATUS (no host check)
    length_ok, seqlen = _row_length(SEQLENS, b, n_new, capacity)
    seqlen = seqlen.to(tl.int32)
    tl.store(STATUS, 0, mask=~length_ok)
    DTYPE: tl.constexpr = K.dtype.element_ty

    # ---- the M rows: query token t, head h_kv * GROUP + g ---------------------------------------------------
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < n_q * GROUP
    tok = rows // GROUP
    head = pid_h * GROUP + rows % GROUP
    q_pos = seqlen - n_q + tok  # bottom-right aligned to the row's length
    p_min = seqlen - n_q + m_block * BLOCK_M // GROUP
    p_max = seqlen - n_q + tl.minimum((m_block * BLOCK_M + BLOCK_M - 1) // GROUP, n_q - 1)

    # ---- this split's tiles ---------------------------------------------------------------------------------
    k_lo = 0
    if HAS_WINDOW:
        k_lo = tl.maximum(p_min - window + 1, 0)
    k_hi = seqlen
    if CAUSAL:
        k_hi = tl.minimum(seqlen, p_max + 1)
    tile_first = k_lo // BLOCK_N
    n_tiles = tl.maximum(tl.cdiv(k_hi, BLOCK_N) - tile_first, 0)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    tile_lo = tile_first + pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tile_first + n_tiles)

    pair = tl.arange(0, HALF_PAD)
    pair_mask = pair < HALF
    dcol = tl.arange(0, D_PAD)
    d_mask = dcol < HEAD_DIM
    offs_j = tl.arange(0, BLOCK_N)

    # ---- q: load once, rotate at its own positions (near; far for ReRoPE) -----------------------------------
    q_row = Q + b64 * stride_qb + tok.to(tl.int64) * stride_qm + head.to(tl.int64) * stride_qh
    if PASS > 0:
        qp = _load_pass(q_row, row_valid, stride_qd, 2 * HALF, PASS, PASS_PAD)
    else:
        qp = tl.zeros([BLOCK_M, 16], dtype=DTYPE)  # unused
    qr1 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    qr2 = qr1
    qf1 = qr1
    qf2 = qr1
    turns = tl.zeros([HALF_PAD], dtype=tl.int64)
    turns_kf = turns
    turns_un = turns
    factor = 1.0
    if HAS_ROT:
        factor = tl.load(FACTOR + b)
        turns = tl.load(TURNS + b64 * stride_tb + pair, mask=pair_mask, other=0)
        zero = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.int64)
        qx1, qx2 = _load_pairs(q_row, row_valid, stride_qd, BLOCK_M, HALF, HALF_PAD, INTERLEAVED)
        qx1 = qx1.to(tl.float32)
        qx2 = qx2.to(tl.float32)
        qpos64 = q_pos.to(tl.int64)[:, None]
        q_turns = turns[None, :] + zero
        q_factor = factor + tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_NHAT:
            turns_un = tl.load(TURNS_UNSCALED + pair, mask=pair_mask, other=0)
            q_turns = tl.where(qpos64 < n_hat, turns_un[None, :], q_turns)
            q_factor = tl.where(q_pos < n_hat, 1.0, q_factor)
        qc, qs = rope_cos_sin(qpos64, q_turns, zero)
        qr1, qr2 = _rotate_pairs(qx1, qx2, qc * q_factor[:, None], qs * q_factor[:, None])
        if REROPE:
            turns_qf = tl.load(TURNS_QF + b64 * stride_tqb + pair, mask=pair_mask, other=0)
            offset_qf = tl.load(OFFSET_QF + b64 * stride_oqb + pair, mask=pair_mask, other=0)
            qc, qs = rope_cos_sin(qpos64, turns_qf[None, :] + zero, offset_qf[None, :] + zero)
            if LEAKY:  # far keys rotate at Q / kappa (their j-table: cos/sin(j w / kappa) times m)
                turns_kf = tl.load(TURNS_KF + b64 * stride_tkb + pair, mask=pair_mask, other=0)
                qf1, qf2 = _rotate_pairs(qx1, qx2, qc * factor, qs * factor)
            else:  # far keys are unrotated but still times m: fold m * m into q
                qf1, qf2 = _rotate_pairs(qx1, qx2, qc * (factor * factor), qs * (factor * factor))
    xrate = tl.zeros([HALF_PAD], dtype=tl.float32)
    if XPOS:  # per pair log2(zeta) / B; q weighted once by 2^(rate (P - p_min)), <= 1 (no rounding: float32)
        tl.static_assert(HAS_ROT and not REROPE, "xPos needs a rotation and no ReRoPE")
        xrate = tl.load(XRATE + pair, mask=pair_mask, other=0.0)
        q_decay = tl.exp2(xrate[None, :] * (q_pos - p_min).to(tl.float32)[:, None])
        qr1 = qr1 * q_decay
        qr2 = qr2 * q_decay
    qf1_d = qf1.to(DTYPE)
    qf2_d = qf2.to(DTYPE)
    row_scale = sm_scale_log2 + tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LOGN:
        row_scale = row_scale * tl.maximum(tl.log(tl.maximum(q_pos + 1, 1).to(tl.float32)) * inv_ln_logn_base, 1.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    k_head = K + pid_h.to(tl.int64) * stride_kh
    v_head = V + pid_h.to(tl.int64) * stride_vh
    # the tiles of this split, in segments of one kind each (a kind is a compile-time specialisation)
    if REROPE:  # all pairs far / mixed (visited once per pair) / all near, for every row of the block
        t_far = tl.maximum(p_min - rerope_window + 1, 0) // BLOCK_N
        t_near = tl.cdiv(tl.maximum(p_max - rerope_window + 1, 0), BLOCK_N)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, tile_lo, tl.minimum(tile_hi, t_far),
            k_head, v_head, BLOCK_TABLE, b64, seqlen, stride_btb, stride_btp, stride_kb, stride_kn, stride_kd,
            stride_vb, stride_vn, stride_vd, qr1, qr2, qf1, qf2, qf1_d, qf2_d, qp, turns, turns_kf, turns_un,
            factor, q_pos, row_scale, window, rerope_window, n_hat, offs_j, dcol,
            d_mask, xrate, p_min, FAR, BLOCK_M, BLOCK_N, HALF, HALF_PAD, PASS, PASS_PAD, HAS_ROT, INTERLEAVED, PAGED,
            PAGE_SIZE, CAUSAL, HAS_WINDOW, LEAKY, DTYPE, DOT_PRECISION, ANCHOR, XPOS)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, tl.maximum(tile_lo, t_far), tl.minimum(tile_hi, t_near),
            k_head, v_head, BLOCK_TABLE, b64, seqlen, stride_btb, stride_btp, stride_kb, stride_kn, stride_kd,
            stride_vb, stride_vn, stride_vd, qr1, qr2, qf1, qf2, qf1_d, qf2_d, qp, turns, turns_kf, turns_un,
            factor, q_pos, row_scale, window, rerope_window, n_hat, offs_j, dcol,
            d_mask, xrate, p_min, FAR_PART, BLOCK_M, BLOCK_N, HALF, HALF_PAD, PASS, PASS_PAD, HAS_ROT, INTERLEAVED,
            PAGED,
            PAGE_SIZE, CAUSAL, HAS_WINDOW, LEAKY, DTYPE, DOT_PRECISION, ANCHOR, XPOS)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, tl.maximum(tile_lo, t_far), tl.minimum(tile_hi, t_near),
            k_head, v_head, BLOCK_TABLE, b64, seqlen, stride_btb, stride_btp, stride_kb, stride_kn, stride_kd,
            stride_vb, stride_vn, stride_vd, qr1, qr2, qf1, qf2, qf1_d, qf2_d, qp, turns, turns_kf, turns_un,
            factor, q_pos, row_scale, window, rerope_window, n_hat, offs_j, dcol,
            d_mask, xrate, p_min, NEAR_PART, BLOCK_M, BLOCK_N, HALF, HALF_PAD, PASS, PASS_PAD, HAS_ROT, INTERLEAVED,
            PAGED,
            PAGE_SIZE, CAUSAL, HAS_WINDOW, LEAKY, DTYPE, DOT_PRECISION, ANCHOR, XPOS)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, tl.maximum(tile_lo, t_near), tile_hi,
            k_head, v_head, BLOCK_TABLE, b64, seqlen, stride_btb, stride_btp, stride_kb, stride_kn, stride_kd,
            stride_vb, stride_vn, stride_vd, qr1, qr2, qf1, qf2, qf1_d, qf2_d, qp, turns, turns_kf, turns_un,
            factor, q_pos, row_scale, window, rerope_window, n_hat, offs_j, dcol,
            d_mask, xrate, p_min, NEAR, BLOCK_M, BLOCK_N, HALF, HALF_PAD, PASS, PASS_PAD, HAS_ROT, INTERLEAVED, PAGED,
            PAGE_SIZE, CAUSAL, HAS_WINDOW, LEAKY, DTYPE, DOT_PRECISION, ANCHOR, XPOS)
    elif HAS_NHAT:  # tiles reaching below n_hat rotate exactly per element
        t_exact = tl.cdiv(n_hat, BLOCK_N)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, tile_lo, tl.minimum(tile_hi, t_exact),
            k_head, v_head, BLOCK_TABLE, b64, seqlen, stride_btb, stride_btp, stride_kb, stride_kn, stride_kd,
            stride_vb, stride_vn, stride_vd, qr1, qr2, qf1, qf2, qf1_d, qf2_d, qp, turns, turns_kf, turns_un,
            factor, q_pos, row_scale, window, rerope_window, n_hat, offs_j, dcol,
            d_mask, xrate, p_min, EXACT, BLOCK_M, BLOCK_N, HALF, HALF_PAD, PASS, PASS_PAD, HAS_ROT, INTERLEAVED, PAGED,
            PAGE_SIZE, CAUSAL, HAS_WINDOW, LEAKY, DTYPE, DOT_PRECISION, ANCHOR, XPOS)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, tl.maximum(tile_lo, t_exact), tile_hi,
            k_head, v_head, BLOCK_TABLE, b64, seqlen, stride_btb, stride_btp, stride_kb, stride_kn, stride_kd,
            stride_vb, stride_vn, stride_vd, qr1, qr2, qf1, qf2, qf1_d, qf2_d, qp, turns, turns_kf, turns_un,
            factor, q_pos, row_scale, window, rerope_window, n_hat, offs_j, dcol,
            d_mask, xrate, p_min, NEAR, BLOCK_M, BLOCK_N, HALF, HALF_PAD, PASS, PASS_PAD, HAS_ROT, INTERLEAVED, PAGED,
            PAGE_SIZE, CAUSAL, HAS_WINDOW, LEAKY, DTYPE, DOT_PRECISION, ANCHOR, XPOS)
    else:
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, tile_lo, tile_hi,
            k_head, v_head, BLOCK_TABLE, b64, seqlen, stride_btb, stride_btp, stride_kb, stride_kn, stride_kd,
            stride_vb, stride_vn, stride_vd, qr1, qr2, qf1, qf2, qf1_d, qf2_d, qp, turns, turns_kf, turns_un,
            factor, q_pos, row_scale, window, rerope_window, n_hat, offs_j, dcol,
            d_mask, xrate, p_min, NEAR, BLOCK_M, BLOCK_N, HALF, HALF_PAD, PASS, PASS_PAD, HAS_ROT, INTERLEAVED, PAGED,
            PAGE_SIZE, CAUSAL, HAS_WINDOW, LEAKY, DTYPE, DOT_PRECISION, ANCHOR, XPOS)

    no_key = l_i == 0.0
    out = acc / tl.where(no_key, 1.0, l_i)[:, None]
    length_ok, _ = _row_length(SEQLENS, b, n_new, capacity)  # again: nothing extra stays live through the loop
    out = tl.where(length_ok, out, float("nan"))
    m_i = tl.where(length_ok, m_i, float("nan"))
    l_i = tl.where(length_ok, l_i, float("nan"))  # NaN survives the merge of the splits
    o_ptrs = (OUT + b64 * stride_ob + tok.to(tl.int64)[:, None] * stride_om + head.to(tl.int64)[:, None] * stride_oh
              + pid_s.to(tl.int64) * stride_os + dcol[None, :] * stride_od)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
    l_ptrs = (LSE + b64 * stride_lb + head.to(tl.int64) * stride_lh + tok.to(tl.int64) * stride_lm
              + pid_s.to(tl.int64) * stride_ls)
    if SPLIT_OUT:  # the merge needs (max, sum) in full precision: an lse rounded per split loses ulps
        tl.store(l_ptrs, m_i, mask=row_valid)
        tl.store(l_ptrs + stride_lx, l_i, mask=row_valid)
        # the last split of this (row, kv head, m block) to finish merges them all: one launch, no merge kernel.
        # Every thread's partial stores precede the barrier; the counter's release/acquire orders them for the
        # merging program.
        tl.debug_barrier()
        counter = COUNTER + (b * tl.num_programs(1) + pid_h) * n_m_blocks + m_block
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            tl.store(counter, 0)  # every split has counted: ready for the plan's next launch
            _merge_rows(OUT, LSE, OUT_FINAL, LSE_FINAL, b64, tok, head, row_valid, dcol, d_mask,
                        stride_ob, stride_om, stride_oh, stride_os, stride_od,
                        stride_lb, stride_lh, stride_lm, stride_ls, stride_lx,
                        stride_fb, stride_fm, stride_fh, stride_fd, stride_gb, stride_gh, stride_gm,
                        num_splits, BLOCK_M, D_PAD, SPLITS_PAD)
    else:
        tl.store(l_ptrs, _lse(m_i, l_i), mask=row_valid)


@triton.jit
def _merge_rows(OP, ML, OUT, LSE, b64, tok, head, row_valid, dcol, d_mask,
                stride_pb, stride_pm, stride_ph, stride_ps, stride_pd,
                stride_mb, stride_mh, stride_mm, stride_ms, stride_mx,
                stride_ob, stride_om, stride_oh, stride_od, stride_lb, stride_lh, stride_lm,
                num_splits, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Merge the splits of BLOCK_M rows (token tok, head head): split s has max m_s (log2 units), sum l_s and
    normalised out o_s; w_s = l_s 2^(m_s - M), out = sum_s w_s o_s / sum_s w_s, lse = ln 2 (M + log2 sum_s w_s).
    Loads bypass L1 (.cg): other programs wrote the partials."""
    tok64 = tok.to(tl.int64)
    head64 = head.to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    ml = (ML + b64 * stride_mb + tok64[:, None] * stride_mm + head64[:, None] * stride_mh
          + splits[None, :].to(tl.int64) * stride_ms)
    split_mask = row_valid[:, None] & (splits < num_splits)[None, :]
    m_s = tl.load(ml, mask=split_mask, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(ml + stride_mx, mask=split_mask, other=0.0, cache_modifier=".cg")
    m = tl.max(m_s, 1)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = l_s * tl.exp2(m_s - m_ref[:, None])
    total = tl.sum(w, 1)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    op = OP + b64 * stride_pb + tok64[:, None] * stride_pm + head64[:, None] * stride_ph + dcol[None, :] * stride_pd
    o_mask = row_valid[:, None] & d_mask[None, :]
    for s in range(0, num_splits):
        w_s = tl.sum(tl.where(splits[None, :] == s, w, 0.0), 1)
        o_s = tl.load(op + s * stride_ps, mask=o_mask, other=0.0, cache_modifier=".cg")
        acc += o_s * w_s[:, None]
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(OUT + b64 * stride_ob + tok64[:, None] * stride_om + head64[:, None] * stride_oh
             + dcol[None, :] * stride_od, out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(LSE + b64 * stride_lb + head64 * stride_lh + tok64 * stride_lm, _lse(m_ref, total), mask=row_valid)


@triton.jit
def _append_kernel(
    K_NEW, V_NEW, K, V, SEQLENS, BLOCK_TABLE, STATUS,
    stride_knb, stride_knn, stride_knh, stride_knd,
    stride_vnb, stride_vnn, stride_vnh, stride_vnd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_btb, stride_btp,
    n_new, capacity, num_pages,
    N_KV: tl.constexpr, HKV_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    """One program per (new token t, row b): K[b, seqlens[b] + t] = K_NEW[b, t], and V alike. A row outside
    0..capacity after the append writes nothing, nor does a token whose page id is outside 0..num_pages-1; either
    clears STATUS."""
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ok, length = _row_length(SEQLENS, b, n_new, capacity)
    pos = length - n_new + t
    if PAGED:
        page = tl.load(BLOCK_TABLE + b * stride_btb + (pos // PAGE_SIZE) * stride_btp, mask=ok, other=0)
        page = page.to(tl.int64)
        ok = ok & (page >= 0) & (page < num_pages)
        k_row = K + page * stride_kb + (pos % PAGE_SIZE) * stride_kn
        v_row = V + page * stride_vb + (pos % PAGE_SIZE) * stride_vn
    else:
        k_row = K + b * stride_kb + pos * stride_kn
        v_row = V + b * stride_vb + pos * stride_vn
    tl.store(STATUS, 0, mask=~ok)
    h = tl.arange(0, HKV_PAD)[:, None].to(tl.int64)
    d = tl.arange(0, D_PAD)[None, :]
    # tl.where, not `& ok`: the interpreter splats a scalar condition as a non-bool mask, which triton >= 3.9 rejects
    mask = tl.where(ok, (h < N_KV) & (d < HEAD_DIM), False)
    k = tl.load(K_NEW + b * stride_knb + t * stride_knn + h * stride_knh + d * stride_knd, mask=mask)
    v = tl.load(V_NEW + b * stride_vnb + t * stride_vnn + h * stride_vnh + d * stride_vnd, mask=mask)
    tl.store(k_row + h * stride_kh + d * stride_kd, k, mask=mask)
    tl.store(v_row + h * stride_vh + d * stride_vd, v, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------------------
_INTERPRET = triton_interpret()
_CTAS_PER_SM = 2  # what the default configs fit (registers, shared memory) on an H100
_MIN_KEYS_PER_SPLIT = 32 if _INTERPRET else 512  # small under the interpreter: tests cover the merge


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(max(n, 1)))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


_SCRATCH: dict = {}


def _scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-device placeholders for pointer arguments a specialisation never reads (int64, float32) and for a
    status nobody checks (int32)."""
    return kept(_SCRATCH, device, device, lambda: (torch.zeros(1, dtype=torch.int64, device=device),
                                                   torch.ones(1, dtype=torch.float32, device=device),
                                                   torch.ones(1, dtype=torch.int32, device=device)), 64)


def choose_num_splits(programs: int, max_keys: int, num_sms: int) -> int:
    """Splits per (row, kv head, m block): fill the resident slots (about _CTAS_PER_SM per SM) in few, full waves
    (flash-decoding's wave-efficiency rule), each split over >= _MIN_KEYS_PER_SPLIT keys of capacity."""
    slots = _CTAS_PER_SM * num_sms
    if programs >= 0.8 * slots:
        return 1
    most = max(1, min(128, cdiv(max_keys, _MIN_KEYS_PER_SPLIT)))
    efficiency = [programs * s / slots / math.ceil(programs * s / slots) for s in range(1, most + 1)]
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, start=1) if e >= 0.85 * best)


def default_config(head_dim: int, elem_size: int, block_m: int, page_size: int | None, heavy: bool) -> dict:
    """BLOCK_N / num_warps / num_stages / maxnreg; one config under the interpreter. heavy: n_hat (tiles below n_hat
    rotate exactly per element), which keeps the uncapped registers. At maxnreg 128 the kernel spills (ptxas 12.8,
    sm_90a, B8 GQA 32/8 D128 bf16: 0.9 KB of spill stores plain, 3.1 KB Leaky ReRoPE; uncapped: 255 registers, one
    CTA per SM) and still reads faster with two CTAs per SM (bench/NOTES.md, decode v4). K and V
    stages take 2 * 3 * BLOCK_N * D * elem_size bytes of shared memory: 96 KB at BLOCK_N 64, D 128, 16 bits."""
    block_n = 64 if head_dim * elem_size <= 256 else 32
    if page_size is not None:
        block_n = min(block_n, page_size)
    if _INTERPRET:
        return {"BLOCK_N": min(block_n, 32), "num_warps": 4, "num_stages": 1}
    config = {"BLOCK_N": block_n, "num_warps": 8, "num_stages": 3}
    if block_m <= 16 and head_dim * elem_size <= 256 and not heavy:  # 2 CTAs of 8 warps per SM
        config["maxnreg"] = 128
    return config


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else 0


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def append_to_cache(k_cache, v_cache, k_new, v_new, seqlens, block_table=None, status=None) -> None:
    """Write k_new, v_new (B, Nnew, Hkv, D) into the caches at seqlens (int32 (B,)), in place: one launch, no host
    synchronisation. A row whose seqlens[b] + Nnew falls outside 0..capacity writes nothing, nor does a token whose
    page id lies outside the cache; either sets status (int32 (1,), if given) to 0."""
    B, n_new, n_kv, head_dim = k_new.shape
    if B == 0 or n_new == 0:
        return
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    status = _scratch(k_cache.device)[2] if status is None else status
    _append_kernel[(n_new, B)](
        k_new, v_new, k_cache, v_cache, seqlens, block_table if paged else seqlens, status,
        *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
        block_table.stride(0) if paged else 0, block_table.stride(1) if paged else 0,
        n_new, capacity, k_cache.shape[0],
        N_KV=n_kv, HKV_PAD=next_power_of_2(n_kv), HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim),
        PAGED=paged, PAGE_SIZE=page_size,
        num_warps=min(16, max(4, next_power_of_2(n_kv) * next_power_of_2(head_dim) // 1024)),
    )


class DecodePlan:
    """What `decode_attention` decides from shapes, strides, options and tables (split count, config, constexprs,
    the argument list), made once and launched many times: every layer of a model's decode step has the same
    shapes, so a step builds one plan and each layer only swaps q, k_cache and v_cache (`plan(q, k_cache,
    v_cache)`). A call with other shapes or strides than the plan's raises ValueError. Arguments as for
    `decode_attention`; the tables, seqlens, block_table and status tensors are the plan's own, and so are the
    split counters: a plan's calls must not run concurrently (on two streams at once)."""

    def __init__(self, q, k_cache, v_cache, seqlens, tables, *, n_new=0, status=None, block_table=None,
                 q_far_tables=None, k_far_tables=None, causal=True, window=None, softmax_scale=None,
                 rerope_window=None, rerope_leak=None, logn_base=None, max_seqlen=None, num_splits=None,
                 config=None, xpos_rate=None):
        B, n_q, n_heads, head_dim = q.shape
        n_kv = k_cache.shape[2]
        group = n_heads // n_kv
        paged = block_table is not None
        page_size = k_cache.shape[1] if paged else None
        rotary_dim = tables.rotary_dim if tables is not None else 0
        rows = group * n_q
        block_m = min(64, _pow2(rows))
        n_m_blocks = cdiv(rows, block_m)
        heavy = tables is not None and tables.n_hat > 0
        cfg = dict(default_config(head_dim, q.element_size(), block_m, page_size, heavy), **(config or {}))
        if paged:  # a tile must lie in one page
            cfg["BLOCK_N"] = min(cfg["BLOCK_N"], page_size)
        capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
        if num_splits is None:
            max_keys = capacity if max_seqlen is None else max_seqlen
            if window is not None:  # a query attends at most its window and the new tokens after it
                max_keys = min(max_keys, window + n_q)
            num_splits = choose_num_splits(B * n_kv * n_m_blocks, max_keys, _num_sms(q.device))
        has_rot = tables is not None
        rerope = rerope_window is not None
        dummy_i64, dummy_f32, dummy_status = _scratch(q.device)
        turns = _last_dim_contiguous(tables.turns) if has_rot else dummy_i64  # rows may be stride-0 views
        turns_un = tables.turns_unscaled if has_rot and tables.turns_unscaled is not None else dummy_i64
        # one factor per row (a table of one row serves every row)
        factor = tables.attention_factor.reshape(-1).expand(B).contiguous() if has_rot else dummy_f32
        if rerope and has_rot:
            turns_qf = _last_dim_contiguous(q_far_tables.turns)
            offset_qf = _last_dim_contiguous(q_far_tables.offset)
            turns_kf = _last_dim_contiguous(k_far_tables.turns)
        else:
            turns_qf = offset_qf = turns_kf = dummy_i64
        n_hat = tables.n_hat if has_rot else 0
        scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
        self.shapes = (tuple(q.shape), q.stride(), tuple(k_cache.shape), k_cache.stride(), v_cache.stride(),
                       q.dtype, k_cache.dtype, q.device)
        self.num_splits = num_splits
        self.grid = (num_splits, n_kv, B * n_m_blocks)
        self.out_shape, self.lse_shape = tuple(q.shape), (B, n_heads, n_q)
        self.part_shape = (B, n_q, n_heads, num_splits, head_dim)
        # the split counters: zero between launches (each merging program resets its own), so calls take no
        # memset; calls of one plan must not overlap (one stream, or one CUDA graph)
        self.counter = torch.zeros(B * n_kv * n_m_blocks, dtype=torch.int32, device=q.device) \
            if num_splits > 1 else None
        # tensors and integers in the kernel's argument order; None marks the per-call tensors
        self.head = [None, None, None, seqlens, block_table if paged else seqlens,
                     turns, turns_un, factor, turns_qf, offset_qf, turns_kf,
                     dummy_f32 if xpos_rate is None else xpos_rate]
        self.status = dummy_status if status is None else status
        self.strides = [*q.stride(), *k_cache.stride(), *v_cache.stride(),
                        block_table.stride(0) if paged else 0, block_table.stride(1) if paged else 0,
                        _row_stride(turns), _row_stride(turns_qf), _row_stride(offset_qf), _row_stride(turns_kf)]
        self.scalars = [n_q, n_new, capacity, n_m_blocks, num_splits, scale * LOG2E,
                        1.0 / math.log(logn_base) if logn_base is not None else 0.0,
                        window if window is not None else 0, rerope_window if rerope else 0, n_hat]
        self.constexprs = dict(
            GROUP=group, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=head_dim, D_PAD=_pow2(head_dim),
            HALF=rotary_dim // 2, HALF_PAD=_pow2(rotary_dim // 2), PASS=head_dim - rotary_dim,
            PASS_PAD=_pow2(head_dim - rotary_dim), HAS_ROT=has_rot, INTERLEAVED=bool(has_rot and tables.interleaved),
            PAGED=paged, PAGE_SIZE=page_size if paged else 1, CAUSAL=bool(causal), HAS_WINDOW=window is not None,
            REROPE=rerope and has_rot, LEAKY=rerope and has_rot and rerope_leak is not None, HAS_NHAT=n_hat > 0,
            HAS_LOGN=logn_base is not None, SPLIT_OUT=num_splits > 1,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            ANCHOR=1 if q.dtype == torch.float32 else 8,  # float32: every tile base exact
            SPLITS_PAD=next_power_of_2(num_splits), XPOS=xpos_rate is not None,
            **{k: v for k, v in cfg.items() if k != "BLOCK_N"},
        )
        # what Triton specialises the launch on besides q's and the caches' alignment (checked per call): plans with
        # the same key share the launcher the first of them made, so a model step's plan takes the previous step's
        # and no step's first layer pays the JIT call
        self._key = (q.device, q.dtype, k_cache.dtype, self.grid, self.out_shape, self.part_shape,
                     tuple(_int_specialisation(x) for x in (*self.strides, *self.scalars)),
                     tuple((t.dtype, t.data_ptr() % 16 == 0) for t in (*self.head[3:], self.status)),
                     tuple(sorted(self.constexprs.items())))
        self._launch, self._constexpr_values = _LAUNCHERS.get(self._key, (None, ())) \
            if direct_launch() and not _DIRECT_LAUNCH_FAILED else (None, ())

    def __call__(self, q, k_cache, v_cache):
        """(out (B, Nq, Hq, D) in q's dtype, lse (B, Hq, Nq) float32) for these tensors."""
        shapes = (tuple(q.shape), q.stride(), tuple(k_cache.shape), k_cache.stride(), v_cache.stride(), q.dtype,
                  k_cache.dtype, q.device)
        if shapes != self.shapes:
            raise ValueError(f"this DecodePlan was made for (q shape, q strides, cache shape, k strides, v strides, "
                             f"dtypes, device) {self.shapes}, got {shapes}")
        device = q.device
        out = empty(self.out_shape, q.dtype, device)
        lse = empty(self.lse_shape, torch.float32, device)
        out_strides = (*out.stride()[:3], 0, out.stride(3))
        lse_strides = (*lse.stride(), 0, 0)
        if self.num_splits > 1:
            o_part = empty(self.part_shape, torch.float32, device)
            l_part = empty((*self.part_shape[:4], 2), torch.float32, device)  # (max, sum) per split
            part = (o_part, l_part, self.status, self.counter, out, lse,
                    *o_part.stride(), l_part.stride(0), l_part.stride(2), l_part.stride(1), l_part.stride(3),
                    l_part.stride(4), *out.stride(), *lse.stride())
        else:
            part = (out, lse, self.status, self.status, out, lse, *out_strides, *lse_strides, *out.stride(),
                    *lse.stride())
        args = (q, k_cache, v_cache, *self.head[3:], *part[:6], *self.strides, *part[6:], *self.scalars)
        aligned = (q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()) % 16 == 0
        if self._launch is not None and aligned:
            try:
                self._launch(*args, *self._constexpr_values)
                return out, lse
            except TypeError as error:  # the launcher parses its arguments before launching: nothing ran
                _direct_launch_failed(error)
                self._launch = None
        compiled = _decode_kernel[self.grid](*args, **self.constexprs)
        if aligned and direct_launch() and not _DIRECT_LAUNCH_FAILED:
            self._launch, self._constexpr_values = _direct_launcher(compiled, self.grid, len(args), self.constexprs)
            if self._launch is not None:
                if len(_LAUNCHERS) >= 256:
                    _LAUNCHERS.clear()
                _LAUNCHERS[self._key] = (self._launch, self._constexpr_values)
        return out, lse


_LAUNCHERS: dict = {}  # DecodePlan._key -> (launcher, constexpr values)
_DIRECT_LAUNCH_FAILED: list = []  # the error of a launcher that refused its arguments (then: the JIT call only)


def _direct_launch_failed(error: TypeError) -> None:
    if not _DIRECT_LAUNCH_FAILED:
        warnings.warn(f"scaled_rope: this Triton's compiled-kernel launcher refused the decode kernel's arguments "
                      f"({error}); DecodePlan launches through the JIT call from now on (same results, more host "
                      f"time per launch)", RuntimeWarning, stacklevel=3)
    _DIRECT_LAUNCH_FAILED.append(error)
    _LAUNCHERS.clear()


def _int_specialisation(x) -> tuple:
    """How Triton specialises a scalar argument: an integer on its width and on being 1 or a multiple of 16."""
    if isinstance(x, bool) or not isinstance(x, int):
        return (type(x).__name__,)
    return (-2 ** 31 <= x < 2 ** 31, x == 1, x % 16 == 0)


def _direct_launcher(compiled, grid, n_runtime_args: int, constexprs: dict):
    """(the compiled kernel's own launcher for this grid, the values that follow the runtime arguments), or (None,
    ()). Triton's JIT call spends 42-63 us of Python per launch here (H100 host, bench/NOTES.md decode v6) on binding
    ~75 arguments, working out their specialisation and looking up the kernel; a plan's arguments keep one specialisation (its integers are fixed,
    its buffers are fresh allocations, q and the caches are checked for 16-byte alignment at each call), so later
    calls launch what the first call compiled directly. (None, ()) (the JIT call every time) under the
    interpreter, or when this Triton's launcher does not take the kernel's parameters as the runtime arguments
    followed by the constexprs (all of them, as Triton 3.3+ does, or none)."""
    names = list(getattr(_decode_kernel, "arg_names", ()))
    tail = names[n_runtime_args:]
    signature = getattr(getattr(compiled, "src", None), "signature", None)
    if not hasattr(compiled, "__getitem__") or signature is None or not all(name in constexprs for name in tail):
        return None, ()
    if len(signature) == len(names):
        values = tuple(constexprs[name] for name in tail)
    elif len(signature) == n_runtime_args:
        values = ()
    else:
        return None, ()
    return compiled[grid], values


def decode_attention(q, k_cache, v_cache, seqlens, tables, *, n_new=0, status=None, block_table=None,
                     q_far_tables=None, k_far_tables=None, causal=True, window=None, softmax_scale=None,
                     rerope_window=None, rerope_leak=None, logn_base=None, max_seqlen=None, num_splits=None,
                     config=None, xpos_rate=None):
    """Attention of q (B, Nq, Hq, D) over the first seqlens[b] + n_new keys of an unrotated cache.

    k_cache, v_cache: (B, N, Hkv, D) or paged (num_pages, page_size, Hkv, D) with block_table (B, max_pages) int32.
    seqlens: int32 (B,) on the device; row b has len = seqlens[b] + n_new keys (0..len-1) and its queries sit at
    len - Nq + 0..Nq-1. A row with seqlens[b] < 0 or len > capacity (N, or max_pages * page_size) reads no key,
    gets NaN in out and lse, and sets status (int32 (1,), if given) to 0: nothing is checked on the host.
    Entries of block_table below a row's length must be page ids of the cache (not checked here).
    tables: `RotaryTables` of the rows at their lengths (None: no rotation); q_far_tables / k_far_tables: ReRoPE's
    far sides (with rerope_window; rerope_leak only says whether far k rotates). max_seqlen: the longest row if
    known (else the capacity stands in), for the split count. xpos_rate: xPos's float32 (R/2,) log2(zeta_i) / B
    per rotation pair (`scaled_rope.tables.xpos_rates`), None without xPos. num_splits (default: by SM count and length)
    and config (BLOCK_N, num_warps, num_stages, maxnreg; default `default_config`) are for tests and tuning.
    Inputs are assumed validated (`scaled_rope.kvcache` does it). One launch (`DecodePlan` keeps the decisions
    for repeated calls with the same shapes).
    Returns out (B, Nq, Hq, D) in q's dtype and lse (B, Hq, Nq) float32.
    """
    plan = DecodePlan(q, k_cache, v_cache, seqlens, tables, n_new=n_new, status=status, block_table=block_table,
                      q_far_tables=q_far_tables, k_far_tables=k_far_tables, causal=causal, window=window,
                      softmax_scale=softmax_scale, rerope_window=rerope_window, rerope_leak=rerope_leak,
                      logn_base=logn_base, max_seqlen=max_seqlen, num_splits=num_splits, config=config,
                      xpos_rate=xpos_rate)
    return plan(q, k_cache, v_cache)
