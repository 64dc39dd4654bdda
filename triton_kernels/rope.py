"""Scaled-RoPE rotation in Triton: `rope_cos_sin` (the angle helper every kernel uses) and `rotate`.

Angles come from 64-bit fixed-point turns (scaled_rope.tables): T = p * turns + offset in int64, wrapping mod
2**64, angle = T * 2pi / 2**64 in [-pi, pi), carried as a float32 pair (see rope_cos_sin). One program takes a block of positions of one batch row,
computes m' * (cos, sin) once per (position, pair) and loops over its heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._env import triton_interpret
from ._host import cdiv, next_power_of_2

_INTERPRET = triton_interpret()


@triton.jit
def rope_cos_sin(pos, turns, offset):
    """(cos, sin) in fp32 of the angle (pos * turns + offset) / 2**64 turns; pos, turns, offset int64.

    The angle is carried as a float32 pair a_hi + a_lo: t keeps its top 12 bits in t_hi, so that
    float32(t_hi) * ANGLE_HI (a 12-bit constant) is exact, and the rest (|a_lo| < 2.3e-3 rad) enters through
    cos(a_hi + a_lo) = cos(a_hi)(1 - a_lo^2/2) - sin(a_hi) a_lo. cos and sin then carry only the error of
    tl.cos/tl.sin at an exact argument, instead of float32(t)'s 2e-7 rad.
    """
    t = pos.to(tl.int64) * turns + offset  # wraps mod 2**64: only the fractional turn matters
    t_hi = t & -4503599627370496  # clears the low 52 bits (-(2**52) is ~(2**52 - 1))
    t_lo = t - t_hi  # in [0, 2**52), exact
    a_hi = t_hi.to(tl.float32) * 3.406131239146355e-19  # ANGLE_HI: 2pi/2**64 to 12 significant bits
    a_lo = t_hi.to(tl.float32) * -9.65905944255895e-25 + t_lo.to(tl.float32) * 3.4061216748705226e-19
    c = tl.cos(a_hi)
    s = tl.sin(a_hi)
    c_lo = 1.0 - 0.5 * a_lo * a_lo
    return c * c_lo - s * a_lo, s * c_lo + c * a_lo


@triton.jit
def _rotate_heads(x_ptrs, o_ptrs, o2_ptrs, stride_xh, stride_oh, stride_o2h, cos, sin, cos2, sin2, h_start, heads,
                  mask_n, offs_i, mask, ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
                  INTERLEAVED: tl.constexpr, SECOND: tl.constexpr):
    """Heads h_start.. of one block of positions: x rotated by (cos, sin) into o and, with SECOND, by (cos2, sin2)
    into o2; pass-through dims copied."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    for h in range(0, HEADS_PER_PROGRAM):
        head_ok = h_start + h < heads
        # A scalar condition is folded into a block mask with tl.where, not `&`: triton's interpreter splats a
        # scalar comparison as int32, and triton >= 3.9 rejects a non-bool mask ('mask has unsupported dtype').
        mask_h = tl.where(head_ok, mask, False)
        if INTERLEAVED:
            offs_d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
            mask_d = tl.where(head_ok, mask_n[:, None] & (offs_d < ROTARY_DIM), False)
            x = tl.load(x_ptrs + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_N, BLOCK_HALF, 2)))
            y = tl.reshape(tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos), (BLOCK_N, 2 * BLOCK_HALF))
            tl.store(o_ptrs + offs_d, y.to(o_ptrs.dtype.element_ty), mask=mask_d)
            if SECOND:
                y2 = tl.reshape(tl.join(x1 * cos2 - x2 * sin2, x1 * sin2 + x2 * cos2), (BLOCK_N, 2 * BLOCK_HALF))
                tl.store(o2_ptrs + offs_d, y2.to(o2_ptrs.dtype.element_ty), mask=mask_d)
        else:
            offs_d = offs_i[None, :]
            x1 = tl.load(x_ptrs + offs_d, mask=mask_h, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptrs + HALF + offs_d, mask=mask_h, other=0.0).to(tl.float32)
            tl.store(o_ptrs + offs_d, (x1 * cos - x2 * sin).to(o_ptrs.dtype.element_ty), mask=mask_h)
            tl.store(o_ptrs + HALF + offs_d, (x1 * sin + x2 * cos).to(o_ptrs.dtype.element_ty), mask=mask_h)
            if SECOND:
                tl.store(o2_ptrs + offs_d, (x1 * cos2 - x2 * sin2).to(o2_ptrs.dtype.element_ty), mask=mask_h)
                tl.store(o2_ptrs + HALF + offs_d, (x1 * sin2 + x2 * cos2).to(o2_ptrs.dtype.element_ty),
                         mask=mask_h)
        if BLOCK_PASS > 0:
            offs_p = ROTARY_DIM + tl.arange(0, BLOCK_PASS)[None, :]
            mask_p = tl.where(head_ok, mask_n[:, None] & (offs_p < HEAD_DIM), False)
            x_pass = tl.load(x_ptrs + offs_p, mask=mask_p, other=0.0)
            tl.store(o_ptrs + offs_p, x_pass, mask=mask_p)
            if SECOND:
                tl.store(o2_ptrs + offs_p, x_pass, mask=mask_p)
        x_ptrs += stride_xh
        o_ptrs += stride_oh
        if SECOND:
            o2_ptrs += stride_o2h


@triton.jit
def _rotate_kernel(
    X, Out, Pos, Turns, Offset, TurnsUnscaled, Factor, Out2, Turns2, Offset2, Factor2, Y, OutY,
    seqlen, heads, heads_y, n_hat,
    stride_xb, stride_xn, stride_xh,
    stride_ob, stride_on, stride_oh,
    stride_o2b, stride_o2n, stride_o2h,
    stride_yb, stride_yn, stride_yh,
    stride_oyb, stride_oyn, stride_oyh,
    stride_pb, stride_pn, stride_tb, stride_offb, stride_fb, stride_t2b, stride_off2b, stride_f2b,
    ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_NHAT: tl.constexpr,
    SECOND: tl.constexpr, HAS_OFFSET2: tl.constexpr, HAS_Y: tl.constexpr,
):
    """Rotates x with the tables into Out; with SECOND also with the second tables (no n_hat) into Out2, reading x
    once (ReRoPE's near and far copies); with HAS_Y also y (another tensor at the same positions, e.g. k beside q)
    with the first tables into OutY, from the same cos and sin."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h_start = tl.program_id(2) * HEADS_PER_PROGRAM
    HALF: tl.constexpr = ROTARY_DIM // 2

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seqlen
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < HALF
    mask = mask_n[:, None] & mask_i[None, :]

    # m' * (cos, sin) for every (position, pair) of the block, shared by all heads
    pos = tl.load(Pos + b * stride_pb + offs_n * stride_pn, mask=mask_n, other=0).to(tl.int64)
    turns = tl.load(Turns + b * stride_tb + offs_i, mask=mask_i, other=0)[None, :]
    m = tl.load(Factor + b * stride_fb)
    if HAS_NHAT:
        short = pos < n_hat
        turns_unscaled = tl.load(TurnsUnscaled + offs_i, mask=mask_i, other=0)
        turns = tl.where(short[:, None], turns_unscaled[None, :], turns)
        scale = tl.where(short, 1.0, m)[:, None]
    else:
        scale = m
    if HAS_OFFSET:
        offset = tl.load(Offset + b * stride_offb + offs_i, mask=mask_i, other=0)[None, :]
    else:
        offset = 0
    cos, sin = rope_cos_sin(pos[:, None], turns, offset)
    cos = cos * scale
    sin = sin * scale
    if INVERSE:
        sin = -sin
    cos2 = cos
    sin2 = sin
    if SECOND:
        turns2 = tl.load(Turns2 + b * stride_t2b + offs_i, mask=mask_i, other=0)[None, :]
        if HAS_OFFSET2:
            offset2 = tl.load(Offset2 + b * stride_off2b + offs_i, mask=mask_i, other=0)[None, :]
        else:
            offset2 = 0
        cos2, sin2 = rope_cos_sin(pos[:, None], turns2, offset2)
        m2 = tl.load(Factor2 + b * stride_f2b)
        cos2 = cos2 * m2
        sin2 = sin2 * m2
        if INVERSE:
            sin2 = -sin2

    row_n = offs_n[:, None]
    _rotate_heads(X + b * stride_xb + row_n * stride_xn + h_start.to(tl.int64) * stride_xh,
                  Out + b * stride_ob + row_n * stride_on + h_start.to(tl.int64) * stride_oh,
                  Out2 + b * stride_o2b + row_n * stride_o2n + h_start.to(tl.int64) * stride_o2h,
                  stride_xh, stride_oh, stride_o2h, cos, sin, cos2, sin2, h_start, heads, mask_n, offs_i, mask,
                  ROTARY_DIM, HEAD_DIM, BLOCK_N, BLOCK_HALF, BLOCK_PASS, HEADS_PER_PROGRAM, INTERLEAVED, SECOND)
    if HAS_Y:
        _rotate_heads(Y + b * stride_yb + row_n * stride_yn + h_start.to(tl.int64) * stride_yh,
                      OutY + b * stride_oyb + row_n * stride_oyn + h_start.to(tl.int64) * stride_oyh,
                      OutY, stride_yh, stride_oyh, 0, cos, sin, cos, sin, h_start, heads_y, mask_n, offs_i, mask,
                      ROTARY_DIM, HEAD_DIM, BLOCK_N, BLOCK_HALF, BLOCK_PASS, HEADS_PER_PROGRAM, INTERLEAVED, False)


def _row_stride(t: torch.Tensor) -> int:
    """Stride between batch rows of a (B or 1, ...) operand: 0 when one row serves every batch row."""
    return t.stride(0) if t.shape[0] > 1 else 0


def _output(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return _alloc.empty(like.shape, like.dtype, like.device) if out is None else out


def rotate(x: torch.Tensor, positions: torch.Tensor, tables, *, inverse: bool = False,
           out: torch.Tensor | None = None, second_tables=None, second_out: torch.Tensor | None = None,
           y: torch.Tensor | None = None, y_out: torch.Tensor | None = None):
    """Rotate x (B, N, H, D) at integer positions (B or 1, N) with `tables` (scaled_rope.tables.RotaryTables).

    inverse=True applies the transpose (gradient map). Output has x's dtype (fp32 math, one rounding); `out`
    may be given, x itself included (in place). Strides of x and out are free except for the last dim.
    second_tables (same rotary dim and layout, n_hat 0): also rotate x with them into second_out (allocated when
    None) in the same pass, reading x once; neither output may be x then. y (B, N, Hy, D), same dtype: also
    rotate y (k beside q) with `tables` at the same positions into y_out (not y), in the same launch. Returns
    out, then second_out and y_out where asked for: out, (out, second_out), (out, y_out) or
    (out, second_out, y_out).

    Arguments are not checked here (the plan builds them): x float16/bfloat16/float32 with a contiguous last
    dim, positions int32/int64, table rows B or 1 with contiguous last dims, attention factors float32.
    """
    o = _output(out, x)
    o2 = _output(second_out, x) if second_tables is not None else None
    oy = _output(y_out, y) if y is not None else None
    results = (o,) + ((o2,) if o2 is not None else ()) + ((oy,) if oy is not None else ())
    if x.numel() == 0 and (y is None or y.numel() == 0):
        return results[0] if len(results) == 1 else results
    batch, seqlen, heads, head_dim = x.shape
    rotary_dim = tables.rotary_dim
    half = rotary_dim // 2
    block_half = next_power_of_2(half)
    block_pass = next_power_of_2(head_dim - rotary_dim) if head_dim > rotary_dim else 0
    if _INTERPRET:  # one small config; few programs (each costs interpreter time)
        block_n, num_warps, min_programs = min(16, next_power_of_2(seqlen)), 1, 4
    else:
        block_n = max(1, min(64, 2048 // block_half, next_power_of_2(seqlen)))
        num_warps, min_programs = 4, 1024
    # split the heads over programs only when positions alone do not fill the GPU (a power of two per program
    # keeps the compiled variants few; the constexpr loop bound also runs under the interpreter with numpy 2.4)
    programs = cdiv(seqlen, block_n) * batch
    most_heads = max(heads, y.shape[2] if y is not None else 0)
    heads_per_program = most_heads
    if programs < min_programs:
        heads_per_program = min(most_heads, next_power_of_2(cdiv(most_heads * programs, min_programs)))
    grid = (cdiv(seqlen, block_n), batch, cdiv(most_heads, heads_per_program))
    # without second tables or y their arguments are unused placeholders
    t2, o2_ = (second_tables, o2) if second_tables is not None else (tables, o)
    yy, oy_ = (y, oy) if y is not None else (x, o)
    offset = tables.offset if tables.offset is not None else tables.turns
    offset2 = t2.offset if t2.offset is not None else t2.turns
    unscaled = tables.turns_unscaled if tables.n_hat > 0 else tables.turns
    _rotate_kernel[grid](
        x, o, positions, tables.turns, offset, unscaled, tables.attention_factor,
        o2_, t2.turns, offset2, t2.attention_factor, yy, oy_,
        seqlen, heads, yy.shape[2], tables.n_hat,
        x.stride(0), x.stride(1), x.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        o2_.stride(0), o2_.stride(1), o2_.stride(2),
        yy.stride(0), yy.stride(1), yy.stride(2),
        oy_.stride(0), oy_.stride(1), oy_.stride(2),
        _row_stride(positions), positions.stride(1), _row_stride(tables.turns),
        _row_stride(offset), _row_stride(tables.attention_factor), _row_stride(t2.turns), _row_stride(offset2),
        _row_stride(t2.attention_factor),
        ROTARY_DIM=rotary_dim, HEAD_DIM=head_dim,
        BLOCK_N=block_n, BLOCK_HALF=block_half, BLOCK_PASS=block_pass, HEADS_PER_PROGRAM=heads_per_program,
        INTERLEAVED=bool(tables.interleaved), INVERSE=bool(inverse), HAS_OFFSET=tables.offset is not None,
        HAS_NHAT=tables.n_hat > 0, SECOND=second_tables is not None, HAS_OFFSET2=t2.offset is not None,
        HAS_Y=y is not None, num_warps=num_warps,
    )
    return results[0] if len(results) == 1 else results
