"""`RopeScaling`: an immutable description of a rotary position embedding and its context-extension schedule.

Frequencies follow the conventions of transformers' rope init functions (same formulas, evaluated in float64).
Pair i of the rotary dims has unscaled frequency w0_i = base**(-2i/R); a schedule gives scaled frequencies w_i
and an attention factor m that multiplies both q and k. Every formula is written out in docs/DESIGN.md §4.
"""
from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

LAYOUTS = ("half", "interleaved")
KINDS = ("default", "linear", "ntk", "dynamic_ntk", "yarn", "llama3", "longrope", "factors",
         "power_basis", "truncated_basis", "inv_freq")


# rope handles (RopeScaling._register): equal ropes share one; weak, so that ropes made by the thousand (a factor
# search) are not kept alive
_HANDLES: "weakref.WeakKeyDictionary[RopeScaling, str]" = weakref.WeakKeyDictionary()
_BY_HANDLE: "dict[str, list[weakref.ref]]" = {}  # every live rope of a handle
_HANDLE_COUNTER = itertools.count()


def rope_from_handle(handle: str) -> "RopeScaling":
    """A live rope that `handle` stands for (all of them are equal)."""
    for ref in _BY_HANDLE.get(handle, ()):
        rope = ref()
        if rope is not None:
            return rope
    raise KeyError(f"no live RopeScaling has handle {handle}")


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_position(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_factor_list(name: str, values: Sequence[float], pairs: int) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in values)
    except TypeError as exc:
        raise ValueError(f"{name} must be a sequence of {pairs} positive numbers") from exc
    if len(values) != pairs:
        raise ValueError(f"{name} must have rotary_dim/2 = {pairs} entries, got {len(values)}")
    if not all(math.isfinite(x) and x > 0 for x in values):
        raise ValueError(f"{name} must hold positive finite numbers")
    return values


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeScaling:
    """A rotary embedding: head_dim, rotary_dim (partial rotary), base, layout, schedule and its parameters.

    Build it with a constructor (`default`, `linear`, `ntk`, `dynamic_ntk`, `yarn`, `llama3`, `longrope`,
    `from_factors`, `power_basis`, `truncated_basis`, `from_inv_freq`, `from_hf_config`), then ask
    `frequencies(seq_len)` for `(inv_freq float64 [rotary_dim/2], attention_factor)`.
    """

    kind: str
    head_dim: int
    rotary_dim: int
    base: float = 10000.0
    layout: str = "half"
    n_hat: int = 0
    params: tuple[tuple[str, Any], ...] = field(default=())

    # ---- validation -------------------------------------------------------------------------------------
    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        _check_position("head_dim", self.head_dim, 2)
        _check_position("rotary_dim", self.rotary_dim, 2)
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {self.rotary_dim}")
        if self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be <= head_dim ({self.head_dim})")
        _check_positive("base", self.base)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be 'half' or 'interleaved', got {self.layout!r}")
        _check_position("n_hat", self.n_hat, 0)
        self._register()

    def _register(self) -> None:
        """Give this rope its handle: a short name shared by equal ropes, which caches and torch.compile key on
        instead of the object (hashing a rope hashes all its factors; some torch versions cannot pass a frozen
        dataclass into a function whose result the compiler takes as a constant)."""
        handle = _HANDLES.get(self)
        if handle is None:
            handle = _HANDLES[self] = f"rope{next(_HANDLE_COUNTER)}"  # a str: never a symbolic size to compile
        object.__setattr__(self, "_handle", handle)
        refs = [ref for ref in _BY_HANDLE.get(handle, ()) if ref() is not None]
        refs.append(weakref.ref(self))
        _BY_HANDLE[handle] = refs

    @property
    def handle(self) -> str:
        """A short name that equal ropes share (within one process)."""
        return self._handle

    def __getstate__(self):  # a handle means nothing in another process: registered again on unpickling
        state = dict(self.__dict__)
        state.pop("_handle", None)
        return state

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._register()

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    @property
    def pairs(self) -> int:
        return self.rotary_dim // 2

    @property
    def length_dependent(self) -> bool:
        """True when the frequencies depend on the sequence length (LongRoPE short/long sets, dynamic NTK)."""
        if self.kind == "dynamic_ntk":
            return True
        return self.kind == "longrope" and (
            self.param("short_factors") != self.param("long_factors")
            or self.param("short_attention_factor") != self.param("long_attention_factor"))

    @property
    def original_max_position(self) -> int | None:
        return self.param("original_max_position")

    # ---- constructors -----------------------------------------------------------------------------------
    @classmethod
    def _make(cls, kind, head_dim, *, base=10000.0, rotary_dim=None, layout="half", n_hat=0, **params):
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        return cls(kind=kind, head_dim=head_dim, rotary_dim=rotary_dim, base=float(base), layout=layout,
                   n_hat=n_hat, params=tuple(sorted(params.items())))

    @classmethod
    def default(cls, head_dim: int, *, base: float = 10000.0, rotary_dim: int | None = None,
                layout: str = "half") -> "RopeScaling":
        """Plain RoPE (docs/DESIGN.md §4.1): w_i = base**(-2i/R)."""
        return cls._make("default", head_dim, base=base, rotary_dim=rotary_dim, layout=layout)

    @classmethod
    def linear(cls, head_dim: int, factor: float, *, base: float = 10000.0, rotary_dim: int | None = None,
               layout: str = "half") -> "RopeScaling":
        """Position interpolation (docs/DESIGN.md §4.2): w_i = w0_i / factor."""
        return cls._make("linear", head_dim, base=base, rotary_dim=rotary_dim, layout=layout,
                         factor=_check_positive("factor", factor))

    @classmethod
    def ntk(cls, head_dim: int, factor: float, *, base: float = 10000.0, rotary_dim: int | None = None,
            layout: str = "half") -> "RopeScaling":
        """Static NTK-aware base change (docs/DESIGN.md §4.3): base' = base * factor**(R/(R-2)), w_i =
        base'**(-2i/R) = w0_i * factor**(-2i/(R-2)). The fastest pair (i = 0) keeps w0 and the slowest
        (i = R/2-1) is divided by exactly `factor`. It equals transformers' "dynamic" schedule frozen at
        seq_len = factor * original length. Projects mean different formulas by "ntk": vLLM's `ntk` rope type is
        base * factor with every frequency then divided by factor**(2/R), i.e. w0_i * factor**(-(2i+2)/R) (pair 0
        scaled too); build that one with `from_factors([factor**((2*i+2)/R) for i in range(R//2)])`."""
        return cls._make("ntk", head_dim, base=base, rotary_dim=rotary_dim, layout=layout,
                         factor=_check_positive("factor", factor))

    @classmethod
    def dynamic_ntk(cls, head_dim: int, factor: float, original_max_position: int, *, base: float = 10000.0,
                    rotary_dim: int | None = None, layout: str = "half") -> "RopeScaling":
        """Dynamic NTK (docs/DESIGN.md §4.4): base' = base * (factor*L/L0 - (factor-1))**(R/(R-2)) with
        L = max(seq_len, L0), evaluated per batch row at its own length."""
        return cls._make("dynamic_ntk", head_dim, base=base, rotary_dim=rotary_dim, layout=layout,
                         factor=_check_positive("factor", factor),
                         original_max_position=_check_position("original_max_position", original_max_position))

    @classmethod
    def yarn(cls, head_dim: int, factor: float, original_max_position: int, *, beta_fast: float = 32.0,
             beta_slow: float = 1.0, attention_factor: float | None = None, mscale: float | None = None,
             mscale_all_dim: float | None = None, truncate: bool = True, base: float = 10000.0,
             rotary_dim: int | None = None, layout: str = "half") -> "RopeScaling":
        """YaRN (docs/DESIGN.md §4.5): a ramp between interpolated (w0/factor) and kept frequencies; m is
        `attention_factor`, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are given and
        nonzero, else 0.1*ln(factor) + 1, with mscale(s, c) = 0.1*c*ln(s) + 1 (1 for s <= 1)."""
        factor = _check_positive("factor", factor)
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        return cls._make("yarn", head_dim, base=base, rotary_dim=rotary_dim, layout=layout, factor=factor,
                         original_max_position=_check_position("original_max_position", original_max_position),
                         beta_fast=_check_positive("beta_fast", beta_fast),
                         beta_slow=_check_positive("beta_slow", beta_slow),
                         attention_factor=_check_positive("attention_factor", attention_factor),
                         truncate=bool(truncate))

    @classmethod
    def llama3(cls, head_dim: int, factor: float, original_max_position: int, low_freq_factor: float,
               high_freq_factor: float, *, base: float = 10000.0, rotary_dim: int | None = None,
               layout: str = "half") -> "RopeScaling":
        """Llama-3.1 bands (docs/DESIGN.md §4.7): long wavelengths divided by factor, short kept, a smooth ramp
        between."""
        low = _check_positive("low_freq_factor", low_freq_factor)
        high = _check_positive("high_freq_factor", high_freq_factor)
        if high <= low:
            raise ValueError(f"high_freq_factor ({high}) must exceed low_freq_factor ({low})")
        return cls._make("llama3", head_dim, base=base, rotary_dim=rotary_dim, layout=layout,
                         factor=_check_positive("factor", factor),
                         original_max_position=_check_position("original_max_position", original_max_position),
                         low_freq_factor=low, high_freq_factor=high)

    @classmethod
    def longrope(cls, head_dim: int, original_max_position: int, max_position: int,
                 short_factors: Sequence[float], long_factors: Sequence[float], *, n_hat: int = 0,
                 attention_factor: float | None = None, short_attention_factor: float | None = None,
                 long_attention_factor: float | None = None, base: float = 10000.0, rotary_dim: int | None = None,
                 layout: str = "half") -> "RopeScaling":
        """LongRoPE (docs/DESIGN.md §4.6): w_i = w0_i / lambda_i with the short set (`short_factors`, attention
        factor m_short) while seq_len <= original_max_position, the long set (`long_factors`, m_long) beyond;
        positions < n_hat keep w0 and m = 1.

        Attention factors: `attention_factor` gives both sets one value; `short_attention_factor` /
        `long_attention_factor` give each set its own (Phi-3.5-MoE's `short_mscale` / `long_mscale`), and a set
        given none of them gets the default sqrt(1 + ln(s) / ln(L0)) with s = max_position / L0 (1 when s <= 1).
        `attention_factor` together with a per-set one is rejected as ambiguous."""
        rotary_dim_ = head_dim if rotary_dim is None else rotary_dim
        pairs = rotary_dim_ // 2
        original = _check_position("original_max_position", original_max_position)
        maximum = _check_position("max_position", max_position)
        if attention_factor is not None and (short_attention_factor is not None
                                             or long_attention_factor is not None):
            raise ValueError("give attention_factor (one value for both sets) or short_attention_factor / "
                             "long_attention_factor, not both")
        scale = maximum / original
        default = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
        if attention_factor is not None:
            default = _check_positive("attention_factor", attention_factor)
        short_m = default if short_attention_factor is None else \
            _check_positive("short_attention_factor", short_attention_factor)
        long_m = default if long_attention_factor is None else \
            _check_positive("long_attention_factor", long_attention_factor)
        return cls._make("longrope", head_dim, base=base, rotary_dim=rotary_dim, layout=layout, n_hat=n_hat,
                         original_max_position=original, max_position=maximum,
                         short_factors=_check_factor_list("short_factors", short_factors, pairs),
                         long_factors=_check_factor_list("long_factors", long_factors, pairs),
                         short_attention_factor=short_m, long_attention_factor=long_m)

    @classmethod
    def from_factors(cls, head_dim: int, factors: Sequence[float], *, n_hat: int = 0,
                     attention_factor: float = 1.0, base: float = 10000.0, rotary_dim: int | None = None,
                     layout: str = "half") -> "RopeScaling":
        """Any per-pair rescale: w_i = w0_i / factors[i]."""
        pairs = (head_dim if rotary_dim is None else rotary_dim) // 2
        return cls._make("factors", head_dim, base=base, rotary_dim=rotary_dim, layout=layout, n_hat=n_hat,
                         factors=_check_factor_list("factors", factors, pairs),
                         attention_factor=_check_positive("attention_factor", attention_factor))

    @classmethod
    def power_basis(cls, head_dim: int, power: float, *, base: float = 10000.0, rotary_dim: int | None = None,
                    layout: str = "half") -> "RopeScaling":
        """Giraffe power basis: w_i = w0_i * (1 - 2i/R)**power."""
        return cls._make("power_basis", head_dim, base=base, rotary_dim=rotary_dim, layout=layout,
                         power=_check_positive("power", power))

    @classmethod
    def truncated_basis(cls, head_dim: int, cutoff_length: float, *, base: float = 10000.0,
                        rotary_dim: int | None = None, layout: str = "half") -> "RopeScaling":
        """Giraffe truncated basis, c = 2pi/cutoff_length: w0_i kept when >= c, c/16 when in [c/8, c), else 0."""
        return cls._make("truncated_basis", head_dim, base=base, rotary_dim=rotary_dim, layout=layout,
                         cutoff_length=_check_positive("cutoff_length", cutoff_length))

    @classmethod
    def from_inv_freq(cls, inv_freq: Sequence[float] | torch.Tensor, attention_factor: float = 1.0, *,
                      head_dim: int | None = None, n_hat: int = 0, layout: str = "half") -> "RopeScaling":
        """Frequencies given outright (rotary_dim = 2*len(inv_freq)); n_hat > 0 then needs no unscaled set
        and is rejected."""
        if isinstance(inv_freq, torch.Tensor):
            inv_freq = inv_freq.detach().double().cpu().tolist()
        try:
            values = tuple(float(x) for x in inv_freq)
        except TypeError as exc:
            raise ValueError("inv_freq must be a 1-D sequence of non-negative numbers") from exc
        if not values or not all(math.isfinite(x) and x >= 0 for x in values):
            raise ValueError("inv_freq must be a non-empty sequence of non-negative finite numbers")
        if n_hat:
            raise ValueError("n_hat is not supported with from_inv_freq: there is no unscaled set to fall back on")
        rotary_dim = 2 * len(values)
        return cls._make("inv_freq", rotary_dim if head_dim is None else head_dim, rotary_dim=rotary_dim,
                         layout=layout, inv_freq=values,
                         attention_factor=_check_positive("attention_factor", attention_factor))

    @classmethod
    def from_hf_config(cls, config: Any) -> "RopeScaling":
        """Read a transformers config (object or dict): `rope_parameters` (transformers 5) or `rope_scaling`
        + `rope_theta` (4.x), `head_dim` or hidden_size/num_attention_heads, `partial_rotary_factor`,
        `max_position_embeddings`, `original_max_position_embeddings`."""
        from .hf_config import rope_from_hf_config

        return rope_from_hf_config(cls, config)

    def with_layout(self, layout: str) -> "RopeScaling":
        return replace(self, layout=layout)

    # ---- frequencies ------------------------------------------------------------------------------------
    def unscaled_frequencies(self) -> torch.Tensor:
        """w0_i = base**(-2i/R), float64."""
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
        return 1.0 / (self.base ** exponent)

    def uses_long_factors(self, seq_len: int | None) -> bool:
        """True when LongRoPE's long set (factors and attention factor) applies at this length."""
        return self.kind == "longrope" and seq_len is not None and seq_len > self.param("original_max_position")

    def frequencies(self, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq float64 [rotary_dim/2], attention_factor) for a sequence of `seq_len` tokens, as transformers'
        rope init functions return them. LongRoPE: the short set and its factor for seq_len None or <=
        original_max_position, the long set and its factor above. Dynamic NTK: the base of max(seq_len, L0).
        Any integer length is accepted: a row whose keys all sit at negative positions has a length <= 0, which
        is short (docs/DESIGN.md §3.7)."""
        if seq_len is not None:
            if isinstance(seq_len, bool) or int(seq_len) != seq_len:
                raise ValueError(f"seq_len must be an integer or None, got {seq_len!r}")
            seq_len = int(seq_len)
        kind, dim = self.kind, self.rotary_dim
        inv_freq = self.unscaled_frequencies()
        factor = self.param("factor")
        attention_factor = float(self.param("attention_factor", 1.0))
        if kind == "default":
            pass
        elif kind == "linear":
            inv_freq = inv_freq / factor
        elif kind == "ntk":
            base = self.base * factor ** (dim / (dim - 2)) if dim > 2 else self.base
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        elif kind == "dynamic_ntk":
            original = self.param("original_max_position")
            length = original if seq_len is None else max(int(seq_len), original)
            base = self.base * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        elif kind == "yarn":
            inv_freq = self._yarn_frequencies(inv_freq)
        elif kind == "llama3":
            inv_freq = self._llama3_frequencies(inv_freq)
        elif kind == "longrope":
            which = "long" if self.uses_long_factors(seq_len) else "short"
            inv_freq = inv_freq / torch.tensor(self.param(f"{which}_factors"), dtype=torch.float64)
            attention_factor = float(self.param(f"{which}_attention_factor"))
        elif kind == "factors":
            inv_freq = inv_freq / torch.tensor(self.param("factors"), dtype=torch.float64)
        elif kind == "power_basis":
            i = torch.arange(self.pairs, dtype=torch.float64)
            inv_freq = inv_freq * (1 - 2 * i / dim) ** self.param("power")
        elif kind == "truncated_basis":
            cutoff = 2 * math.pi / self.param("cutoff_length")
            inv_freq = torch.where(inv_freq >= cutoff, inv_freq,
                                   torch.where(inv_freq >= cutoff / 8, torch.full_like(inv_freq, cutoff / 16),
                                               torch.zeros_like(inv_freq)))
        elif kind == "inv_freq":
            inv_freq = torch.tensor(self.param("inv_freq"), dtype=torch.float64)
        return inv_freq, attention_factor

    def _yarn_frequencies(self, inv_freq0: torch.Tensor) -> torch.Tensor:
        dim, factor = self.rotary_dim, self.param("factor")
        original = self.param("original_max_position")

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(self.base))

        low, high = correction_dim(self.param("beta_fast")), correction_dim(self.param("beta_slow"))
        if self.param("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        return (inv_freq0 / factor) * (1 - extrapolation) + inv_freq0 * extrapolation

    def _llama3_frequencies(self, inv_freq0: torch.Tensor) -> torch.Tensor:
        factor, original = self.param("factor"), self.param("original_max_position")
        low, high = self.param("low_freq_factor"), self.param("high_freq_factor")
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq0
        scaled = torch.where(wavelen > low_wavelen, inv_freq0 / factor, inv_freq0)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params if not isinstance(v, tuple))
        extra = f", n_hat={self.n_hat}" if self.n_hat else ""
        partial = f", rotary_dim={self.rotary_dim}" if self.rotary_dim != self.head_dim else ""
        return (f"RopeScaling.{self.kind}(head_dim={self.head_dim}{partial}, base={self.base:g}, "
                f"layout={self.layout!r}{extra}{', ' + shown if shown else ''})")
