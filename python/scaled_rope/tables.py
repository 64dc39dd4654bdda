"""Rotation tables: the form in which every kernel receives its angles.

A frequency w (radians per position) is carried as 64-bit fixed-point turns, T = round(sfrac(w / 2pi) * 2**64),
stored as int64 (two's complement). For an integer position p the kernels form p * T + offset in int64, which
wraps modulo 2**64 and leaves exactly the fractional turn of p * w (to 2**-43 turns for |p| < 2**21), then
angle = float32(that) * 2pi / 2**64 in [-pi, pi). A float32 product p * w would be off by up to 0.25 rad at
position 2**21; this keeps cos and sin within 1e-6 of an fp64 truth.

`table_set` is what the plan uses: tables that depend only on hashable Python values (the rope, the device, a
fixed length, the ReRoPE window) are built once and kept, and under torch.compile they are constants of the graph
(`torch.compiler.assume_constant_result`); tables that depend on a device tensor (each row's length) are selected
or computed from those with tensor ops, never with a host synchronisation.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._alloc import kept
from .scaling import RopeScaling, rope_from_handle

TWO_POW_64 = 2.0 ** 64
ANGLE_PER_UNIT = 2 * math.pi / TWO_POW_64  # radians per fixed-point unit


class RotaryTables(NamedTuple):
    """Angles for one rotation of q or k, per batch row (a leading dim of 1 serves every row).

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


class TableSet(NamedTuple):
    """The tables of one call: q and k share `near`; ReRoPE adds its far sides. far_q_both is far_q carrying k's
    attention factor as well: plain ReRoPE's far k rotates by angle 0, so <m rot(q, w), m k> = <m^2 rot(q, w), k>
    and a forward can read k itself as the far k. Every table of a set has the same attention factor per row
    (that of the row's frequency set), far_q_both its square."""

    near: RotaryTables
    far_q: RotaryTables | None = None
    far_k: RotaryTables | None = None
    far_q_both: RotaryTables | None = None


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


# ---- frequencies of each row --------------------------------------------------------------------------------
def _fixed_frequencies(rope: RopeScaling, seq_len: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 (1, R/2), float64 (1,)): frequencies and attention factor at one length (any integer: a row whose
    keys all sit at negative positions has a length <= 0, docs/DESIGN.md §3.7)."""
    freq, factor = rope.frequencies(seq_len)
    return freq.to(device)[None, :], torch.full((1,), factor, dtype=torch.float64, device=device)


def _row_frequencies(rope: RopeScaling, lengths: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 (B, R/2), float64 (B,)): each row's frequencies and attention factor at its own length (an int
    tensor (B,) on the device), with tensor ops only, as `RopeScaling.frequencies` does for one length (docs/DESIGN.md
    §3.7): LongRoPE's short set up to L0 (lengths <= 0 included), the long set above; dynamic NTK's base at
    max(length, L0)."""
    if rope_facts(rope).kind == "dynamic_ntk":
        dim, factor, original, base, m = _dynamic_ntk_constants(rope)
        length = lengths.to(device=device, dtype=torch.float64).clamp(min=original)
        row_base = base * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
        return row_base[:, None] ** (-exponent[None, :]), torch.full_like(length, m)
    original = rope.original_max_position
    short, m_short = _fixed_frequencies(rope, original, device)
    long_, m_long = _fixed_frequencies(rope, original + 1, device)
    is_long = lengths.to(device) > original
    return torch.where(is_long[:, None], long_, short), torch.where(is_long, m_long, m_short)


def _dynamic_ntk_constants(rope: RopeScaling) -> tuple[int, float, int, float, float]:
    return _dynamic_ntk_constants_of(rope.handle)


@torch.compiler.assume_constant_result
def _dynamic_ntk_constants_of(handle: str) -> tuple[int, float, int, float, float]:
    """(rotary_dim, factor, original length, base, attention factor) of a dynamic NTK rope (scaling.py's
    formula, evaluated on tensors of lengths in `_row_frequencies`)."""
    rope = rope_from_handle(handle)
    return (rope.rotary_dim, float(rope.param("factor")), rope.param("original_max_position"), rope.base,
            rope.frequencies(None)[1])


def _tables(rope: RopeScaling, freq: torch.Tensor, factor: torch.Tensor, far: str | None = None,
            rerope_window: int | None = None, rerope_leak: float | None = None) -> RotaryTables:
    """Tables from float64 frequencies (rows, R/2) and attention factors (rows,). far: None for the ordinary
    rotation; "q" or "k" for ReRoPE's far side (window w, leak kappa): q at P/kappa + w(1 - 1/kappa), k at
    Q/kappa; with no leak q sits at w and k at 0 (still scaled by m)."""
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
    unscaled = frequency_to_turns(rope.unscaled_frequencies().to(freq.device)) if rope.n_hat else None
    return RotaryTables(turns, offset, unscaled, rope.n_hat, factor.to(torch.float32), rope.rotary_dim,
                        rope.layout == "interleaved")


def build_tables(rope: RopeScaling, batch: int, device: torch.device | str, *,
                 seq_lens: torch.Tensor | int | None = None, far: str | None = None,
                 rerope_window: int | None = None, rerope_leak: float | None = None) -> RotaryTables:
    """Tables for q or k of a batch of `batch` rows, built afresh (the plan uses the cached `table_set`).

    seq_lens: each row's length (largest key position + 1), an int for all rows or an int tensor (B,) on the
    device; it picks LongRoPE's short/long set (and its attention factor) and the dynamic NTK base per row, with
    no host synchronisation. far: see `_tables`.
    """
    device = torch.device(device)
    if far not in (None, "q", "k"):
        raise ValueError(f"far must be None, 'q' or 'k', got {far!r}")
    if far is not None and rerope_window is None:
        raise ValueError("far tables need rerope_window")
    if far is not None and rope.n_hat:
        raise ValueError("rerope_window cannot be combined with n_hat > 0 (rope.n_hat)")
    if isinstance(seq_lens, torch.Tensor) and rope.length_dependent:
        freq, factor = _row_frequencies(rope, seq_lens, device)
    else:
        freq, factor = _fixed_frequencies(rope, seq_lens if isinstance(seq_lens, int) else None, device)
        freq, factor = freq.expand(batch, -1), factor.expand(batch).contiguous()
    return _tables(rope, freq, factor, far, rerope_window, rerope_leak)


# ---- the plan's tables: built once per hashable key, selected per row with tensor ops -------------------------
_TABLE_CACHE: dict = {}
_CACHE_LIMIT = 1024


def _remember(key, device: torch.device, make):
    return kept(_TABLE_CACHE, key, device, make, _CACHE_LIMIT)


def _set_from(rope: RopeScaling, freq: torch.Tensor, factor: torch.Tensor, rerope_window: int | None,
              rerope_leak: float | None) -> TableSet:
    near = _tables(rope, freq, factor)
    if rerope_window is None:
        return TableSet(near)
    far_q = _tables(rope, freq, factor, "q", rerope_window, rerope_leak)
    far_k = _tables(rope, freq, factor, "k", rerope_window, rerope_leak)
    far_q_both = None
    if rerope_leak is None:
        far_q_both = RotaryTables(far_q.turns, far_q.offset, None, 0, far_q.attention_factor.square(),
                                  far_q.rotary_dim, far_q.interleaved)
    return TableSet(near, far_q, far_k, far_q_both)


def _fixed_set(rope: RopeScaling, device: torch.device, seq_len: int | None, rerope_window: int | None,
               rerope_leak: float | None) -> TableSet:
    """The tables of every row at one length (None: the schedule's default), one row each, built once for equal
    ropes. Under torch.compile constants of the graph (guarded on the rope's handle): the constant function hands
    back a flat tuple of tensors (nested tuples of tables are not constants to every torch version), and the
    tables are put together here from it."""
    facts = rope_facts(rope)
    flat = _fixed_set_tensors(rope.handle, device, seq_len, rerope_window, rerope_leak)
    near = RotaryTables(flat[0], None, flat[1], facts.n_hat, flat[2], facts.rotary_dim, facts.interleaved)
    if rerope_window is None:
        return TableSet(near)
    far_q = RotaryTables(flat[3], flat[4], None, 0, flat[2], facts.rotary_dim, facts.interleaved)
    far_k = RotaryTables(flat[5], None, None, 0, flat[2], facts.rotary_dim, facts.interleaved)
    both = None if flat[6] is None else far_q._replace(attention_factor=flat[6])
    return TableSet(near, far_q, far_k, both)


@torch.compiler.assume_constant_result
def _fixed_set_tensors(handle: str, device: torch.device, seq_len: int | None, rerope_window: int | None,
                       rerope_leak: float | None) -> tuple:
    """(near turns, turns_unscaled, attention factor, far q turns, far q offset, far k turns, far q factor with
    both attention factors) of `_fixed_set`; None where a table has no such tensor."""
    def make():
        rope = rope_from_handle(handle)
        freq, factor = _fixed_frequencies(rope, seq_len, device)
        near, far_q, far_k, both = _set_from(rope, freq, factor, rerope_window, rerope_leak)
        if far_q is None:
            return near.turns, near.turns_unscaled, near.attention_factor, None, None, None, None
        return (near.turns, near.turns_unscaled, near.attention_factor, far_q.turns, far_q.offset, far_k.turns,
                None if both is None else both.attention_factor)

    # keyed by the rope's handle, shared by equal ropes (hashing a RopeScaling hashes all its factors)
    return _remember(("set", handle, device, seq_len, rerope_window, rerope_leak), device, make)


class RopeFacts(NamedTuple):
    """What the plan reads from a RopeScaling, as plain values."""

    head_dim: int
    n_hat: int
    kind: str
    length_dependent: bool
    original_max_position: int | None
    rotary_dim: int
    interleaved: bool


_FACTS: dict = {}


def rope_facts(rope: RopeScaling) -> RopeFacts:
    return _facts_of(rope.handle)


@torch.compiler.assume_constant_result
def _facts_of(handle: str) -> RopeFacts:
    facts = _FACTS.get(handle)
    if facts is None:
        if len(_FACTS) >= _CACHE_LIMIT:
            _FACTS.clear()
        rope = rope_from_handle(handle)
        facts = _FACTS[handle] = RopeFacts(rope.head_dim, rope.n_hat, rope.kind, rope.length_dependent,
                                           rope.original_max_position, rope.rotary_dim, rope.layout == "interleaved")
    return facts


def _select(is_long: torch.Tensor, long_: RotaryTables | None, short: RotaryTables | None):
    """Per row: long_ where is_long (B,), else short (tables of one row each; None stays None)."""
    if short is None:
        return None
    offset = None if short.offset is None else torch.where(is_long[:, None], long_.offset, short.offset)
    return RotaryTables(torch.where(is_long[:, None], long_.turns, short.turns), offset, short.turns_unscaled,
                        short.n_hat, torch.where(is_long, long_.attention_factor, short.attention_factor),
                        short.rotary_dim, short.interleaved)


def table_set(rope: RopeScaling, device: torch.device, *, lengths: torch.Tensor | int | None = None,
              added: int = 0, rerope_window: int | None = None, rerope_leak: float | None = None) -> TableSet:
    """The tables of a call whose rows have `lengths` + `added` keys: None (the schedule's default), an int for
    every row (a Python int or, under torch.compile, a symbolic size), or an int tensor (B,) on the device.

    Tensors may be shared between calls and rows may have a leading dim of 1 (read them, never write them);
    per-row selections are fresh tensors (B, ...). No host synchronisation in any case.
    """
    facts = rope_facts(rope)
    if not facts.length_dependent or lengths is None:
        return _fixed_set(rope, device, None, rerope_window, rerope_leak)
    original = facts.original_max_position
    if isinstance(lengths, torch.Tensor):
        if facts.kind != "dynamic_ntk":  # LongRoPE: a row is long when lengths + added > original
            is_long = lengths > original - added
            short = _fixed_set(rope, device, original, rerope_window, rerope_leak)
            long_ = _fixed_set(rope, device, original + 1, rerope_window, rerope_leak)
            return TableSet(*(_select(is_long, a, b) for a, b in zip(long_, short)))
        lengths = lengths + added if added else lengths
    elif facts.kind != "dynamic_ntk":
        # a branch, not a value: under torch.compile a symbolic length becomes a guard and a constant key
        return _fixed_set(rope, device, original + 1 if lengths + added > original else original, rerope_window,
                          rerope_leak)
    elif torch.compiler.is_compiling():  # dynamic NTK at a size that may be symbolic: tensor ops, not a key
        lengths = torch.full((1,), lengths + added, dtype=torch.int64, device=device)
    else:
        return _fixed_set(rope, device, max(lengths + added, original), rerope_window, rerope_leak)
    freq, factor = _row_frequencies(rope, lengths, device)
    return _set_from(rope, freq, factor, rerope_window, rerope_leak)


def xpos_rates(head_dim: int, rotary_dim: int, interleaved: bool, scale_base: float, device: torch.device, *,
               per_pair: bool = False) -> torch.Tensor:
    """xPos's rates log2(zeta_i) / scale_base (reference.xpos_zeta), float32: per column (head_dim,), 0 in the
    pass-through columns, or per rotation pair (R/2,) with per_pair. The kernels weight pair i's term by
    2^(rate_i (P - Q)). Cached per arguments."""
    def make():
        from .reference import xpos_zeta

        rate = torch.log2(xpos_zeta(rotary_dim)) / scale_base
        if not per_pair:
            columns = torch.zeros(head_dim, dtype=torch.float64)
            columns[:rotary_dim] = rate.repeat_interleave(2) if interleaved else rate.repeat(2)
            rate = columns
        return rate.to(device=device, dtype=torch.float32)

    key = ("xpos", head_dim, rotary_dim, interleaved, scale_base, per_pair, str(device))
    return _remember(key, device, make)


def factor_rows(tables: RotaryTables, batch: int) -> RotaryTables:
    """tables with a contiguous attention factor of `batch` rows (the decode kernel indexes it by row), kept
    between calls for the shared one-row tables."""
    factor = tables.attention_factor
    if factor.shape[0] != batch:  # the entry holds factor itself, so that its id is not reused while it lives
        factor = _remember(("rows", id(factor), batch), factor.device,
                           lambda: (factor, factor.expand(batch).contiguous()))[1]
    return tables._replace(attention_factor=factor)
