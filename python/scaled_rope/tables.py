"""Rotation tables: the form in which every kernel receives its angles.

A frequency w (radians per position) is carried as 64-bit fixed-point turns, T = round(sfrac(w / 2pi) * 2**64),
stored as int64 (two's complement). For an integer position p the kernels form p * T + offset in int64, which
wraps modulo 2**64 and leaves exactly the fractional turn of p * w (to 2**-43 turns for |p| < 2**21), then
angle = float32(that) * 2pi / 2**64 in [-pi, pi). A float32 product p * w would be off by up to 0.25 rad at
position 2**21; this keeps cos and sin within 1e-6 of an fp64 truth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from .scaling import RopeScaling

TWO_POW_64 = 2.0 ** 64
ANGLE_PER_UNIT = 2 * math.pi / TWO_POW_64  # radians per fixed-point unit


@dataclass(frozen=True)
class RotaryTables:
    """Angles for one rotation of q or k, per batch row.

    turns: int64 (B, R/2). offset: int64 (B, R/2) or None, turns added at every position (ReRoPE's far q).
    turns_unscaled: int64 (R/2,) used instead of turns at positions < n_hat (None when n_hat == 0).
    attention_factor: float32 (B,); positions < n_hat use 1. Pair i is (x[i], x[i + R/2]) for the half layout,
    (x[2i], x[2i+1]) when interleaved; dims >= rotary_dim pass through.
    """

    turns: torch.Tensor
    offset: torch.Tensor | None
    turns_unscaled: torch.Tensor | None
    n_hat: int
    attention_factor: torch.Tensor
    rotary_dim: int
    interleaved: bool

    @property
    def batch(self) -> int:
        return self.turns.shape[0]


def frequency_to_turns(freq: torch.Tensor) -> torch.Tensor:
    """float64 radians per position -> int64 fixed-point turns (signed fractional part times 2**64)."""
    turns = freq.double() / (2 * math.pi)
    turns = turns - torch.round(turns)  # in [-0.5, 0.5]; integer turns do not change the angle at integer p
    scaled = torch.round(turns * TWO_POW_64)
    # +0.5 turn maps to -0.5 turn (the same angle) so the value fits in int64
    scaled = torch.where(scaled >= 2.0 ** 63, scaled - TWO_POW_64, scaled)
    return scaled.to(torch.int64)


def turns_to_angle(turns: torch.Tensor) -> torch.Tensor:
    """Inverse of `frequency_to_turns` for checks: int64 fixed-point turns -> float64 radians in [-pi, pi)."""
    return turns.double() * ANGLE_PER_UNIT


@lru_cache(maxsize=256)
def _cached_frequencies(rope: RopeScaling, seq_len: int | None, device: str) -> torch.Tensor:
    return rope.frequencies(seq_len)[0].to(device)


def _row_frequencies(rope: RopeScaling, batch: int, device: torch.device,
                     seq_lens: torch.Tensor | int | None) -> torch.Tensor:
    """float64 (B, R/2) frequencies of each row at its own length, computed without host synchronisation."""
    dev = str(device)
    if rope.kind == "dynamic_ntk":
        dim, factor = rope.rotary_dim, rope.param("factor")
        original = rope.param("original_max_position")
        if seq_lens is None or isinstance(seq_lens, int):
            return _cached_frequencies(rope, seq_lens, dev)[None, :].expand(batch, -1)
        length = seq_lens.to(device=device, dtype=torch.float64).clamp(min=original)
        base = rope.base * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
        return base[:, None] ** (-exponent[None, :])
    if rope.length_dependent and isinstance(seq_lens, torch.Tensor):  # LongRoPE, per-row short/long switch
        original = rope.param("original_max_position")
        short = _cached_frequencies(rope, original, dev)
        long_ = _cached_frequencies(rope, original + 1, dev)
        is_long = (seq_lens.to(device) > original)[:, None]
        return torch.where(is_long, long_[None, :], short[None, :])
    fixed_len = seq_lens if isinstance(seq_lens, int) else None  # the schedule does not depend on the length
    return _cached_frequencies(rope, fixed_len, dev)[None, :].expand(batch, -1)


def build_tables(rope: RopeScaling, batch: int, device: torch.device | str, *,
                 seq_lens: torch.Tensor | int | None = None, far: str | None = None,
                 rerope_window: int | None = None, rerope_leak: float | None = None) -> RotaryTables:
    """Tables for q or k of a batch of `batch` rows.

    seq_lens: each row's length (largest key position + 1), an int for all rows or an int tensor (B,) on the
    device; it picks LongRoPE's short/long set and the dynamic NTK base per row, with no host synchronisation.
    far: None for the ordinary rotation; "q" or "k" for the far side of ReRoPE (window w, leak kappa): q at
    P/kappa + w(1 - 1/kappa), k at Q/kappa; with no leak q sits at w and k at 0 (still scaled by m).
    """
    device = torch.device(device)
    if far not in (None, "q", "k"):
        raise ValueError(f"far must be None, 'q' or 'k', got {far!r}")
    if far is not None and rerope_window is None:
        raise ValueError("far tables need rerope_window")
    if far is not None and rope.n_hat:
        raise ValueError("rerope_window cannot be combined with n_hat > 0 (rope.n_hat)")
    freq = _row_frequencies(rope, batch, device, seq_lens)
    offset = None
    if far is None:
        turns = frequency_to_turns(freq)
    elif rerope_leak is None:  # plain ReRoPE: q at w, k at 0
        turns = torch.zeros_like(freq, dtype=torch.int64)
        offset = frequency_to_turns(freq * float(rerope_window)) if far == "q" else None
    else:
        turns = frequency_to_turns(freq / rerope_leak)
        if far == "q":
            offset = frequency_to_turns(freq * (rerope_window * (1 - 1 / rerope_leak)))
    _, factor = rope.frequencies(None)
    attention_factor = torch.full((batch,), factor, dtype=torch.float32, device=device)
    unscaled = frequency_to_turns(_cached_frequencies_unscaled(rope, str(device))) if rope.n_hat else None
    return RotaryTables(turns, offset, unscaled, rope.n_hat, attention_factor, rope.rotary_dim,
                        rope.layout == "interleaved")


@lru_cache(maxsize=64)
def _cached_frequencies_unscaled(rope: RopeScaling, device: str) -> torch.Tensor:
    return rope.unscaled_frequencies().to(device)


# ---- cached tables for the decode path: no per-call rebuild of what only depends on the rope ------------------
_TABLE_CACHE: dict = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _remember(key, device: torch.device, make):
    """_TABLE_CACHE[key], made by make() on a miss; nothing is stored during a CUDA-graph capture (the capture
    records the kernels that fill a tensor without running them)."""
    found = _TABLE_CACHE.get(key)
    if found is None:
        found = make()
        if not _capturing(device):
            if len(_TABLE_CACHE) >= 1024:
                _TABLE_CACHE.clear()
            _TABLE_CACHE[key] = found
    return found


def far_q_with_both_factors(q_far: RotaryTables, k_far: RotaryTables) -> RotaryTables:
    """q_far's tables carrying k_far's attention factor as well. Plain ReRoPE's far k rotates by angle 0, so
    <m rot(q, w), m k> = <m^2 rot(q, w), k>: with these tables for the far q, the caller's k itself is the far k.
    Kept per pair of tables (keyed by their ids; the entry holds both, so the ids cannot be reused while it lives)."""
    entry = _remember(("far q m^2", id(q_far), id(k_far)), q_far.turns.device,
                      lambda: (q_far, k_far, replace(q_far, attention_factor=q_far.attention_factor
                                                     * k_far.attention_factor)))
    return entry[2]


def cached_tables(rope: RopeScaling, batch: int, device: torch.device | str, *,
                  seq_lens: torch.Tensor | None = None, added: int = 0, far: str | None = None,
                  rerope_window: int | None = None, rerope_leak: float | None = None) -> RotaryTables:
    """`build_tables(rope, batch, device, seq_lens=seq_lens + added, far=..., ...)` with the same values, in at
    most two small launches: the tables of a fixed length are built once per (rope, device, far side) and kept;
    LongRoPE picks each row's short or long set from them with one torch.where. The tensors returned may be
    shared between calls and rows may be stride-0 views: read them, never write them. Dynamic NTK with per-row
    lengths (its base is a function of the length) takes `build_tables`.
    """
    device = torch.device(device)
    length_dependent = rope.length_dependent and seq_lens is not None
    if rope.kind == "dynamic_ntk" and length_dependent:
        lens = seq_lens + added if added else seq_lens
        return build_tables(rope, batch, device, seq_lens=lens, far=far, rerope_window=rerope_window,
                            rerope_leak=rerope_leak)
    options = dict(far=far, rerope_window=rerope_window, rerope_leak=rerope_leak)

    def fixed(seq_len):  # one row's tables at a length; LongRoPE's short set for <= original, long set above
        key = ("fixed", rope, str(device), seq_len, far, rerope_window, rerope_leak)
        return _remember(key, device, lambda: build_tables(rope, 1, device, seq_lens=seq_len, **options))

    attention_factor = _remember(("factor", rope, str(device), batch), device,
                                 lambda: torch.full((batch,), rope.frequencies(None)[1], dtype=torch.float32,
                                                    device=device))
    if length_dependent:  # LongRoPE: a row is long when seq_lens + added > original
        original = rope.param("original_max_position")
        short, long_ = fixed(original), fixed(original + 1)
        is_long = (seq_lens > original - added)[:, None]
        turns = torch.where(is_long, long_.turns, short.turns)
        offset = None if short.offset is None else torch.where(is_long, long_.offset, short.offset)
        base = short
    else:
        base = fixed(None)
        turns = base.turns.expand(batch, -1)
        offset = None if base.offset is None else base.offset.expand(batch, -1)
    return RotaryTables(turns, offset, base.turns_unscaled, base.n_hat, attention_factor, base.rotary_dim,
                        base.interleaved)
