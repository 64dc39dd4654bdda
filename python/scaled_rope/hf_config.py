"""Read the rotary embedding of a transformers config (5.x `rope_parameters`, 4.x `rope_scaling` + `rope_theta`).

The rules follow transformers 5.17's rope init functions (`transformers.modeling_rope_utils`), which are what a
model built from the config computes:

- `original_max_position_embeddings` (llama3, yarn, longrope): the config attribute when the config has one (Phi-3
  does), else the value in the rope parameters, else `max_position_embeddings`.
- dynamic NTK scales against `max_position_embeddings` (not the original length).
- yarn: `factor` defaults to max_position / original; attention factor from `attention_factor`, else
  0.1 ln(factor) + 1 (or the mscale / mscale_all_dim ratio); beta_fast / beta_slow default to 32 / 1.
- longrope: `factor` defaults to max_position / original; attention factor from `attention_factor`, else
  sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1); the long set is used once the length exceeds the
  original length. Legacy Phi-3 names "su" and "yarn" with short/long factors mean longrope.
- rotary dim = int(head_dim * partial_rotary_factor), head_dim = config.head_dim or hidden_size / heads.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _rope_parameters(config: Any) -> dict:
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
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


def rope_from_hf_config(cls, config: Any):
    params = _rope_parameters(config)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type in ("su", "yarn") and "short_factor" in params and "long_factor" in params:
        rope_type = "longrope"  # Phi-3's legacy names
    base = params.get("rope_theta")
    if base is None:
        base = _get(config, "rope_theta", 10000.0)

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
    if rope_type == "longrope":
        original = need("original_max_position_embeddings", original)
        factor = params.get("factor") or need("max_position_embeddings", max_position) / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return cls.longrope(head_dim, original, max(1, int(round(original * factor))),
                            need("short_factor", params.get("short_factor")),
                            need("long_factor", params.get("long_factor")),
                            attention_factor=attention_factor, **common)
    raise NotImplementedError(f"rope type {rope_type!r} from the config is not supported by RopeScaling.from_hf_config "
                              f"(supported: default, linear, dynamic, yarn, llama3, longrope)")
