"""Read the rotary embedding of a transformers config (4.x `rope_scaling` + `rope_theta`, 5.x `rope_parameters`)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def rope_from_hf_config(cls, config: Any):
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"config.rope_parameters / rope_scaling must be a dict, got {type(params).__name__}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = params.get("rope_theta", _get(config, "rope_theta", 10000.0))

    head_dim = _get(config, "head_dim")
    if head_dim is None:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("config needs head_dim or hidden_size and num_attention_heads")
        head_dim = hidden // heads
    partial = params.get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    max_position = _get(config, "max_position_embeddings")
    original = params.get("original_max_position_embeddings", _get(config, "original_max_position_embeddings"))
    common = dict(base=base, rotary_dim=rotary_dim)

    if rope_type == "default":
        return cls.default(head_dim, **common)
    if rope_type == "linear":
        return cls.linear(head_dim, params["factor"], **common)
    if rope_type == "dynamic":
        # transformers scales against max_position_embeddings for dynamic NTK
        return cls.dynamic_ntk(head_dim, params["factor"], max_position, **common)
    if rope_type == "yarn":
        factor = params["factor"]
        if original is None:
            original = max_position
        return cls.yarn(head_dim, factor, original, beta_fast=params.get("beta_fast") or 32.0,
                        beta_slow=params.get("beta_slow") or 1.0, attention_factor=params.get("attention_factor"),
                        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                        truncate=params.get("truncate", True), **common)
    if rope_type == "llama3":
        return cls.llama3(head_dim, params["factor"], params["original_max_position_embeddings"],
                          params["low_freq_factor"], params["high_freq_factor"], **common)
    if rope_type == "longrope":
        # transformers: with original_max_position_embeddings on the config, the scale is max/original
        if original is None:
            original = max_position
            maximum = int(round(max_position * params.get("factor", 1.0)))
        else:
            maximum = max_position
        return cls.longrope(head_dim, original, maximum, params["short_factor"], params["long_factor"],
                            attention_factor=params.get("attention_factor"), **common)
    raise NotImplementedError(f"rope type {rope_type!r} from the config is not supported")
