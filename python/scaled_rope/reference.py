"""Plain PyTorch reference: explicit score matrix, angles in float64. Written for clarity, not speed.

Every backend is tested against these functions (docs/DESIGN.md §3). They run on any device, support autograd
and any floating dtype; `compute_dtype` picks the precision of the arithmetic (default: float64 for float32/float64
inputs, float32 for half types; the tests also run it in the inputs' own dtype as the baseline).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .scaling import RopeScaling


def default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def default_positions(batch: int, nq: int, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """k at 0..Nk-1 and q at the last Nq of those (bottom-right aligned, as in flash-attn)."""
    k_positions = torch.arange(nk, device=device).expand(batch, nk)
    q_positions = torch.arange(nk - nq, nk, device=device).expand(batch, nq)
    return q_positions, k_positions


def row_lengths(k_positions: torch.Tensor) -> list[int]:
    """Each batch row's length for length-dependent schedules: its largest key position + 1 (<= 0 when every key
    sits at a negative position, which `RopeScaling.frequencies` takes as short / the L0 base, docs/DESIGN.md §3.7)."""
    if k_positions.shape[1] == 0:
        return [0] * k_positions.shape[0]
    return [int(x) + 1 for x in k_positions.max(dim=1).values.tolist()]


def angles(rope: RopeScaling, positions: torch.Tensor, seq_len: int | None, *, far: str | None = None,
           rerope_window: int | None = None, rerope_leak: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 angles (N, R/2) and per-position attention factors (N,) for one batch row."""
    inv_freq, factor = rope.frequencies(seq_len)
    inv_freq = inv_freq.to(positions.device)
    pos = positions.to(torch.float64)
    scale = torch.full_like(pos, factor)
    if far == "q":
        pos = torch.full_like(pos, float(rerope_window)) if rerope_leak is None else \
            pos / rerope_leak + rerope_window * (1 - 1 / rerope_leak)
    elif far == "k":
        pos = torch.zeros_like(pos) if rerope_leak is None else pos / rerope_leak
    angle = pos[:, None] * inv_freq[None, :]
    if rope.n_hat and far is None:
        early = positions < rope.n_hat
        unscaled = positions.to(torch.float64)[:, None] * rope.unscaled_frequencies().to(positions.device)[None, :]
        angle = torch.where(early[:, None], unscaled, angle)
        scale = torch.where(early, torch.ones_like(scale), scale)
    return angle, scale


def _rotate_row(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, rope: RopeScaling,
                dtype: torch.dtype) -> torch.Tensor:
    """x (N, H, D) -> rotated, in `dtype`."""
    x = x.to(dtype)
    half = rope.rotary_dim // 2
    cos = torch.cos(angle).to(dtype)[:, None, :]
    sin = torch.sin(angle).to(dtype)[:, None, :]
    m = scale.to(dtype)[:, None, None]
    rot, rest = x[..., :rope.rotary_dim], x[..., rope.rotary_dim:]
    if rope.layout == "half":
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return torch.cat([rotated * m, rest], dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: RopeScaling, *, seq_lens: list[int] | None = None,
           far: str | None = None, rerope_window: int | None = None, rerope_leak: float | None = None,
           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate x (B, N, H, D) at integer positions (B, N); row b uses the frequencies of length seq_lens[b]
    (None: the schedule's default). Returns compute_dtype (default: one precision above x)."""
    dtype = compute_dtype or default_compute_dtype(x.dtype)
    rows = []
    for b in range(x.shape[0]):
        seq_len = None if seq_lens is None else seq_lens[b]
        angle, scale = angles(rope, positions[b], seq_len, far=far, rerope_window=rerope_window,
                              rerope_leak=rerope_leak)
        rows.append(_rotate_row(x[b], angle, scale, rope, dtype))
    return torch.stack(rows)


def xpos_zeta(rotary_dim: int) -> torch.Tensor:
    """xPos's per-pair decay bases zeta_i = (2i + 0.4 R) / (1.4 R), i = 0..R/2-1 (float64; torchscale's scale with
    R the rotary dim): the logit term of pair i is multiplied by zeta_i ** ((P - Q) / xpos_scale_base)."""
    pairs = torch.arange(rotary_dim // 2, dtype=torch.float64)
    return (2 * pairs + 0.4 * rotary_dim) / (1.4 * rotary_dim)


def _pair_columns(rope: RopeScaling) -> list[list[int]]:
    """The two columns of each rotation pair: (i, i + R/2) in the half layout, (2i, 2i + 1) interleaved."""
    half = rope.rotary_dim // 2
    return [[i, i + half] if rope.layout == "half" else [2 * i, 2 * i + 1] for i in range(half)]


def _xpos_weights(rope: RopeScaling, base: float, delta: torch.Tensor, dtype: torch.dtype):
    """(columns of pair i, zeta_i ** (delta / base) in dtype) for each pair. delta (B, 1, Nq, Nk) is taken at >= 0:
    xPos is causal, so a key after its query is masked and its weight never used (it would overflow)."""
    d = delta.clamp(min=0).to(torch.float64)
    for cols, zeta in zip(_pair_columns(rope), xpos_zeta(rope.rotary_dim).tolist()):
        yield cols, torch.exp(d * (math.log(zeta) / base)).to(dtype)


def _xpos_scores(qr: torch.Tensor, kr: torch.Tensor, rope: RopeScaling, base: float, delta: torch.Tensor,
                 group: int) -> torch.Tensor:
    """(B, Hq, Nq, Nk) sum over columns of q k with each rotation pair's term weighted by its xPos decay (the
    pass-through columns by 1): the relative form, which no centring or chunking of the positions changes."""
    krep = kr.repeat_interleave(group, dim=2)
    rest = slice(rope.rotary_dim, None)
    s = torch.einsum("bqhd,bkhd->bhqk", qr[..., rest], krep[..., rest])
    for cols, w in _xpos_weights(rope, base, delta, qr.dtype):
        s = s + w * torch.einsum("bqhd,bkhd->bhqk", qr[..., cols], krep[..., cols])
    return s


def _xpos_grads(ds: torch.Tensor, qr: torch.Tensor, kr: torch.Tensor, rope: RopeScaling, base: float,
                delta: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the rotated q and k through `_xpos_scores` for the score gradient ds (B, Hq, Nq, Nk)."""
    krep = kr.repeat_interleave(group, dim=2)
    rest = slice(rope.rotary_dim, None)
    dq = torch.zeros_like(qr)
    dk = torch.zeros_like(krep)
    dq[..., rest] = torch.einsum("bhqk,bkhd->bqhd", ds, krep[..., rest])
    dk[..., rest] = torch.einsum("bhqk,bqhd->bkhd", ds, qr[..., rest])
    for cols, w in _xpos_weights(rope, base, delta, qr.dtype):
        dq[..., cols] = torch.einsum("bhqk,bkhd->bqhd", ds * w, krep[..., cols])
        dk[..., cols] = torch.einsum("bhqk,bqhd->bkhd", ds * w, qr[..., cols])
    return dq, _group_sum(dk, group)


def check_xpos(rope, causal: bool, rerope_window) -> None:
    """xPos weights rotation pairs by distance: it needs a rope, causal attention (the weight of a key after its
    query grows without bound) and no ReRoPE (whose far pairs have no single distance to decay by)."""
    if rope is None:
        raise ValueError("xpos_scale_base needs a rope (rope=None means no rotation pairs to scale)")
    if not causal:
        raise ValueError("xpos_scale_base needs causal=True: xPos grows the weight of keys after the query without "
                         "bound")
    if rerope_window is not None:
        raise ValueError("xpos_scale_base cannot be combined with rerope_window")


class _Parts(NamedTuple):
    """What `attention` computes on the way to out and lse, which `attention_backward` reuses."""

    near: tuple[torch.Tensor, torch.Tensor]  # rotated q (B, Nq, Hq, D) and k (B, Nk, Hkv, D), compute dtype
    far: tuple[torch.Tensor, torch.Tensor] | None  # ReRoPE's far rotations
    is_near: torch.Tensor | None  # (B, 1, Nq, Nk) delta < rerope_window
    qscale: torch.Tensor  # (B, Nq): softmax_scale * g(P)
    p: torch.Tensor  # (B, Hq, Nq, Nk) softmax over the allowed keys, 0 elsewhere
    lse: torch.Tensor  # (B, Hq, Nq), -inf on rows with no allowed key
    vr: torch.Tensor  # v in the compute dtype, repeated to Hq heads
    dtype: torch.dtype
    group: int


def _attention_parts(q, k, v, rope, *, causal, q_positions, k_positions, window, softmax_scale, rerope_window,
                     rerope_leak, logn_base, xpos_scale_base, compute_dtype) -> _Parts:
    batch, nq, hq, dim = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    dtype = compute_dtype or default_compute_dtype(q.dtype)
    if q_positions is None or k_positions is None:
        dq_pos, dk_pos = default_positions(batch, nq, nk, q.device)
        q_positions = dq_pos if q_positions is None else q_positions
        k_positions = dk_pos if k_positions is None else k_positions
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    group = hq // hkv

    def rotated(far_q: str | None, far_k: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if rope is None:
            return q.to(dtype), k.to(dtype)
        lens = row_lengths(k_positions)
        return (rotate(q, q_positions, rope, seq_lens=lens, far=far_q, rerope_window=rerope_window,
                       rerope_leak=rerope_leak, compute_dtype=dtype),
                rotate(k, k_positions, rope, seq_lens=lens, far=far_k, rerope_window=rerope_window,
                       rerope_leak=rerope_leak, compute_dtype=dtype))

    def scores(qr: torch.Tensor, kr: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bqhd,bkhd->bhqk", qr, kr.repeat_interleave(group, dim=2))

    delta = q_positions.to(torch.int64)[:, None, :, None] - k_positions.to(torch.int64)[:, None, None, :]
    near = rotated(None, None)
    if xpos_scale_base is not None:
        check_xpos(rope, causal, rerope_window)
        s = _xpos_scores(*near, rope, xpos_scale_base, delta, group)
    else:
        s = scores(*near)
    far = is_near = None
    if rerope_window is not None:
        far = rotated("q", "k")
        is_near = delta < rerope_window
        s = torch.where(is_near, s, scores(*far))
    qscale = torch.full((batch, nq), scale, dtype=torch.float64, device=q.device)
    if logn_base is not None:
        qpos = q_positions.to(torch.float64)
        # P + 1 taken at >= 1 as the kernels do: a negative position gets factor 1, not a NaN in its gradient
        qscale = qscale * torch.clamp(torch.log((qpos + 1).clamp(min=1)) / math.log(logn_base), min=1.0)
    qscale = qscale.to(dtype)
    s = s * qscale[:, None, :, None]
    allowed = torch.ones_like(delta, dtype=torch.bool)
    if causal:
        allowed = allowed & (delta >= 0)
    if window is not None:
        allowed = allowed & (delta < window)
    allowed = allowed.expand_as(s)
    nonempty = allowed.any(dim=-1)
    # rows with no allowed key get finite filler so that autograd stays NaN-free; their p is zeroed below
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~nonempty[..., None], 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).masked_fill(~allowed, 0.0)
    lse = lse.masked_fill(~nonempty, float("-inf"))
    vr = v.to(dtype).repeat_interleave(group, dim=2)
    return _Parts(near, far, is_near, qscale, p, lse, vr, dtype, group)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeScaling | None, *, causal: bool = True,
              q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
              window: int | None = None, softmax_scale: float | None = None, rerope_window: int | None = None,
              rerope_leak: float | None = None, logn_base: float | None = None,
              xpos_scale_base: float | None = None,
              compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled-RoPE attention, docs/DESIGN.md §3. q (B, Nq, Hq, D); k, v (B, Nk, Hkv, D), unrotated.

    Returns (out (B, Nq, Hq, D) in q's dtype, lse (B, Hq, Nq) float32); rows with no allowed key give 0 and -inf.
    Arguments are assumed valid (the public API validates them).
    """
    parts = _attention_parts(q, k, v, rope, causal=causal, q_positions=q_positions, k_positions=k_positions,
                             window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                             rerope_leak=rerope_leak, logn_base=logn_base, xpos_scale_base=xpos_scale_base,
                             compute_dtype=compute_dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", parts.p, parts.vr)
    return out.to(q.dtype), parts.lse.to(torch.float32)


def _group_sum(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, N, Hq, D) -> (B, N, Hkv, D): the sum over the query heads that share a key head."""
    return x.unflatten(2, (x.shape[2] // group, group)).sum(3)


def _rotate_transposed(x: torch.Tensor, positions: torch.Tensor, rope: RopeScaling, seq_lens: list[int], far,
                       rerope_window, rerope_leak) -> torch.Tensor:
    """The transpose of `rotate` (angles negated, same scale), in x's dtype."""
    rows = []
    for b in range(x.shape[0]):
        angle, scale = angles(rope, positions[b], seq_lens[b], far=far, rerope_window=rerope_window,
                              rerope_leak=rerope_leak)
        rows.append(_rotate_row(x[b], -angle, scale, rope, x.dtype))
    return torch.stack(rows)


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeScaling | None,
                       dout: torch.Tensor, dlse: torch.Tensor | None = None, *, causal: bool = True,
                       q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
                       window: int | None = None, softmax_scale: float | None = None,
                       rerope_window: int | None = None, rerope_leak: float | None = None,
                       logn_base: float | None = None, xpos_scale_base: float | None = None,
                       compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention` for the gradients dout of out and dlse (or None) of lse, written out
    (docs/DESIGN.md §3.8) for where autograd cannot run (the reference inside a custom op): with Delta =
    rowsum(dout * out), dS = P (dout v^T - Delta + dlse) times the row's scale, split into its near and far parts
    for ReRoPE, and each part's gradients of the rotated q and k mapped back by its rotation's transpose."""
    parts = _attention_parts(q, k, v, rope, causal=causal, q_positions=q_positions, k_positions=k_positions,
                             window=window, softmax_scale=softmax_scale, rerope_window=rerope_window,
                             rerope_leak=rerope_leak, logn_base=logn_base, xpos_scale_base=xpos_scale_base,
                             compute_dtype=compute_dtype)
    dtype, group, p = parts.dtype, parts.group, parts.p
    d_out = dout.to(dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", p, parts.vr)
    dv = _group_sum(torch.einsum("bhqk,bqhd->bkhd", p, d_out), group)
    dp = torch.einsum("bqhd,bkhd->bhqk", d_out, parts.vr)
    row = (d_out * out).sum(-1).transpose(1, 2)
    if dlse is not None:
        row = row - torch.where(torch.isneginf(parts.lse), 0.0, dlse.to(dtype))
    ds = p * (dp - row[..., None]) * parts.qscale[:, None, :, None]
    sides = [(None, parts.near, ds)]
    if parts.far is not None:
        sides = [(None, parts.near, ds * parts.is_near), ("far", parts.far, ds * ~parts.is_near)]
    batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    if q_positions is None or k_positions is None:
        dq_pos, dk_pos = default_positions(batch, nq, nk, q.device)
        q_positions = dq_pos if q_positions is None else q_positions
        k_positions = dk_pos if k_positions is None else k_positions
    lens = row_lengths(k_positions) if rope is not None else None
    dq = dk = 0
    for far, (qr, kr), ds_side in sides:
        if xpos_scale_base is not None:
            delta = q_positions.to(torch.int64)[:, None, :, None] - k_positions.to(torch.int64)[:, None, None, :]
            dqr, dkr = _xpos_grads(ds_side, qr, kr, rope, xpos_scale_base, delta, group)
        else:
            dqr = torch.einsum("bhqk,bkhd->bqhd", ds_side, kr.repeat_interleave(group, dim=2))
            dkr = _group_sum(torch.einsum("bhqk,bqhd->bkhd", ds_side, qr), group)
        if rope is not None:
            dqr = _rotate_transposed(dqr, q_positions, rope, lens, far and "q", rerope_window, rerope_leak)
            dkr = _rotate_transposed(dkr, k_positions, rope, lens, far and "k", rerope_window, rerope_leak)
        dq, dk = dq + dqr, dk + dkr
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def apply_scaled_rope(x: torch.Tensor, rope: RopeScaling, positions: torch.Tensor | None = None, *,
                      seq_lens: list[int] | None = None, inverse: bool = False) -> torch.Tensor:
    """Rotate x (B, N, H, D) at positions (default 0..N-1); inverse applies the transpose. Returns x's dtype."""
    batch, n = x.shape[:2]
    if positions is None:
        positions = torch.arange(n, device=x.device).expand(batch, n)
    if inverse:
        dtype = default_compute_dtype(x.dtype)
        rows = []
        for b in range(batch):
            angle, scale = angles(rope, positions[b], None if seq_lens is None else seq_lens[b])
            rows.append(_rotate_row(x[b], -angle, scale, rope, dtype))
        return torch.stack(rows).to(x.dtype)
    return rotate(x, positions, rope, seq_lens=seq_lens).to(x.dtype)
