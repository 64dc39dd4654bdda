"""Read the rotary embedding of a transformers config (5.x `rope_parameters`, 4.x `rope_scaling` + `rope_theta`).

The rules follow transformers 5.17's rope init functions (`transformers.modeling_rope_utils`), which are what a
model built from the config computes; docs/DESIGN.md §4.9 lists them with the formulas. In short:

- Every key of the rope parameters is either honoured or rejected with a `ValueError` naming it; a key whose value
  is None counts as absent. The keys read per rope type are `ROPE_KEYS[rope_type]` plus `COMMON_KEYS`. A rope
  type outside `ROPE_KEYS` raises `NotImplementedError` naming it.
- `original_max_position_embeddings` (llama3, yarn, longrope): the config attribute when the config has one (Phi-3
  does), else the value in the rope parameters, else `max_position_embeddings`.
- dynamic NTK scales against `max_position_embeddings` (not the original length).
- yarn: `factor` defaults to max_position / original; attention factor from `attention_factor`, else the
  mscale / mscale_all_dim ratio when both are nonzero, else 0.1 ln(factor) + 1; beta_fast / beta_slow default to
  32 / 1 (also when 0, as `or` does in transformers); `truncate` defaults to True.
- longrope: `factor` defaults to max_position / original. Attention factors: `short_mscale` and `long_mscale`
  (Phi-3.5-MoE; transformers' PhiMoE rotary embedding and vLLM use them, one per factor set) when given, both
  or neither; else `attention_factor` for both sets; else sqrt(1 + ln(factor) / ln(original)) (1 when
  factor <= 1). `attention_factor` together with the mscales is rejected: transformers' generic longrope would
  use the former, PhiMoE and vLLM the latter. Legacy Phi-3 names "su" and "yarn" with short/long factors mean
  longrope.
- rotary dim = int(head_dim * partial_rotary_factor), head_dim = config.head_dim or hidden_size // heads;
  `partial_rotary_factor` and `rope_theta` from the rope parameters first, then the config. GPT-J / GPT-NeoX
  spellings that transformers' rope functions never read (`rotary_dim`, `rotary_pct`, `rotary_emb_base`) are
  rejected rather than ignored.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"}),
    "llama3": frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
    "longrope": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                           "long_factor", "short_mscale", "long_mscale"}),
}
# config attributes of other rope conventions that transformers' rope init functions do not read
FOREIGN_CONFIG_KEYS = ("rotary_dim", "rotary_pct", "rotary_emb_base")


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _rope_parameters(config: Any) -> dict:
    params = _get(config, "rope_parameters")
    if isinstance(config, Mapping) and config.get("rope_scaling"):
        legacy = config["rope_scaling"]
        if params and dict(params) != dict(legacy):
            raise ValueError("config has both rope_parameters and rope_scaling and they differ; keep one")
        params = legacy
    params = params or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"config.rope_parameters / rope_scaling must be a dict, got {type(params).__name__}")
    layer_types = _get(config, "layer_types") or ()
    nested = [params[t] for t in dict.fromkeys(layer_types) if isinstance(params.get(t), Mapping)]
    if nested:  # one rope per layer type (Gemma-style); supported when they all agree
        first = dict(nested[0])
        if any(dict(other) != first for other in nested[1:]):
            raise NotImplementedError("config.rope_parameters differs between layer types; give `rope=` explicitly "
                                      "(one RopeScaling per model is supported)")
        params = first
    return dict(params)


def _rope_type(params: dict) -> str:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type in ("su", "yarn") and "short_factor" in params and "long_factor" in params:
        rope_type = "longrope"  # Phi-3's legacy names
    if rope_type not in ROPE_KEYS:
        raise NotImplementedError(f"rope type {rope_type!r} from the config is not supported by "
                                  f"RopeScaling.from_hf_config (supported: {', '.join(ROPE_KEYS)})")
    return rope_type


def _check_keys(config: Any, params: dict, rope_type: str) -> None:
    unknown = sorted(k for k, v in params.items()
                     if v is not None and k not in COMMON_KEYS and k not in ROPE_KEYS[rope_type])
    if unknown:
        read = ", ".join(sorted(ROPE_KEYS[rope_type] | COMMON_KEYS))
        raise ValueError(f"config rope parameter(s) {', '.join(map(repr, unknown))} not supported for rope type "
                         f"{rope_type!r} by RopeScaling.from_hf_config (it reads: {read}); rather than ignore "
                         f"them, build the RopeScaling yourself")
    foreign = [k for k in FOREIGN_CONFIG_KEYS if _get(config, k) is not None]
    if foreign:
        raise ValueError(f"config.{foreign[0]} is not read by transformers' rope functions and not supported by "
                         f"RopeScaling.from_hf_config; use partial_rotary_factor / rope_theta, or build the "
                         f"RopeScaling yourself (e.g. rotary_dim=..., layout='interleaved' for GPT-J)")


def _longrope_default_factor(factor: float, original: int) -> float:
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_from_hf_config(cls, config: Any):
    params = _rope_parameters(config)
    rope_type = _rope_type(params)
    _check_keys(config, params, rope_type)
    base = params.get("rope_theta")
    if base is None:
        base = _get(config, "rope_theta", _get(config, "default_theta", 10000.0))

    head_dim = _get(config, "head_dim")
    if head_dim is None:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("config needs head_dim or hidden_size and num_attention_heads")
        head_dim = hidden // heads
    partial = params.get("partial_rotary_factor")
    if partial is None:
        partial = _get(config, "partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * partial)
    if not 0 < partial <= 1 or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"partial_rotary_factor {partial!r} gives rotary dim int({head_dim} * {partial!r}) = "
                         f"{rotary_dim}; it must be an even number in [2, head_dim]")
    max_position = _get(config, "max_position_embeddings")
    original = _get(config, "original_max_position_embeddings")
    if original is None:
        original = params.get("original_max_position_embeddings") or max_position
    common = dict(base=base, rotary_dim=rotary_dim)

    def need(name: str, value: Any) -> Any:
        if value is None:
            raise ValueError(f"rope type {rope_type!r} needs {name} in the config")
        return value

    if rope_type == "default":
        return cls.default(head_dim, **common)
    if rope_type == "linear":
        return cls.linear(head_dim, need("factor", params.get("factor")), **common)
    if rope_type == "dynamic":
        return cls.dynamic_ntk(head_dim, need("factor", params.get("factor")),
                               need("max_position_embeddings", max_position), **common)
    if rope_type == "yarn":
        original = need("original_max_position_embeddings", original)
        factor = params.get("factor") or need("max_position_embeddings", max_position) / original
        return cls.yarn(head_dim, factor, original, beta_fast=params.get("beta_fast") or 32.0,
                        beta_slow=params.get("beta_slow") or 1.0, attention_factor=params.get("attention_factor"),
                        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                        truncate=params.get("truncate", True), **common)
    if rope_type == "llama3":
        return cls.llama3(head_dim, need("factor", params.get("factor")),
                          need("original_max_position_embeddings", original),
                          need("low_freq_factor", params.get("low_freq_factor")),
                          need("high_freq_factor", params.get("high_freq_factor")), **common)
    # longrope
    original = need("original_max_position_embeddings", original)
    factor = params.get("factor") or need("max_position_embeddings", max_position) / original
    attention_factor = params.get("attention_factor")
    short_mscale, long_mscale = params.get("short_mscale"), params.get("long_mscale")
    if (short_mscale is None) != (long_mscale is None):
        given, missing = ("short_mscale", "long_mscale") if long_mscale is None else ("long_mscale", "short_mscale")
        raise ValueError(f"config rope parameter {given!r} is given without {missing!r}: give both (one attention "
                         f"factor per factor set, as Phi-3.5-MoE does) or neither")
    if short_mscale is not None:
        if attention_factor is not None:
            raise ValueError("config rope parameters 'attention_factor' and 'short_mscale' / 'long_mscale' are both "
                             "given: transformers' longrope would use the first, its PhiMoE model and vLLM the "
                             "others; keep one")
        factors = dict(short_attention_factor=short_mscale, long_attention_factor=long_mscale)
    else:
        if attention_factor is None:
            attention_factor = _longrope_default_factor(factor, original)
        factors = dict(attention_factor=attention_factor)
    return cls.longrope(head_dim, original, max(1, int(round(original * factor))),
                        need("short_factor", params.get("short_factor")),
                        need("long_factor", params.get("long_factor")), **factors, **common)
