"""`RopeScaling.from_hf_config` against transformers' own rope code, evaluated in float64 (docs/DESIGN.md §4.9).

transformers computes inv_freq in float32. To compare formulas rather than roundings, its rope init functions run
here with float32 mapped to float64: the module's `torch` is swapped for a proxy whose `float` / `float32` are
float64, and `Tensor.float` is `Tensor.double` for the duration (`transformers_in_float64`; each comparison checks
that the result really is float64). inv_freq and attention factors must then agree to 1e-12 relative.
Also here: LongRoPE's separate short/long attention factors, and every unsupported key rejected by name.
"""
import contextlib
import copy
import dataclasses
import math
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import transformers.modeling_rope_utils as rope_utils  # noqa: E402
from transformers import LlamaConfig, Phi3Config, PhimoeConfig  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402
from transformers.models.phimoe import modeling_phimoe  # noqa: E402

from scaled_rope import RopeScaling  # noqa: E402
from scaled_rope.hf_config import COMMON_KEYS, ROPE_KEYS  # noqa: E402

transformers.logging.set_verbosity_error()

RTOL = 1e-12


class _Torch64(types.ModuleType):
    """`torch` with float32 spelled float64."""

    float = torch.float64
    float32 = torch.float64

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def transformers_in_float64(*modules):
    modules = (rope_utils,) + modules
    saved = [(m, m.torch) for m in modules]
    tensor_float = torch.Tensor.float
    try:
        for m in modules:
            m.torch = _Torch64()
        torch.Tensor.float = torch.Tensor.double
        yield
    finally:
        torch.Tensor.float = tensor_float
        for m, t in saved:
            m.torch = t


def transformers_frequencies(config, rope_type, seq_len):
    """(inv_freq float64, attention factor) from transformers' code for this config and length."""
    with transformers_in_float64(modeling_llama, modeling_phi3):
        if rope_type == "default":
            # Phi-3's default function honours partial_rotary_factor (Llama's ignores it)
            inv_freq, factor = modeling_phi3.Phi3RotaryEmbedding.compute_default_rope_parameters(config)
        else:
            inv_freq, factor = rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
    assert inv_freq.dtype == torch.float64, "the float64 harness did not take effect"
    return inv_freq, factor


def assert_matches_transformers(ours, config, rope_type, lengths):
    for seq_len in lengths:
        inv_freq, factor = transformers_frequencies(config, rope_type, seq_len)
        got, got_factor = ours.frequencies(seq_len)
        assert got.dtype == torch.float64 and got.shape == inv_freq.shape, (seq_len, got.shape, inv_freq.shape)
        torch.testing.assert_close(got, inv_freq, rtol=RTOL, atol=0, msg=lambda m: f"seq_len={seq_len}: {m}")
        assert got_factor == pytest.approx(factor, rel=RTOL, abs=0), (seq_len, got_factor, factor)


def pairs_of(head_dim, partial=1.0):
    return int(head_dim * partial) // 2


def short_factors(n):
    return [1.0 + 0.03 * i for i in range(n)]


def long_factors(n):
    return [1.0 + 0.9 * i ** 1.3 for i in range(n)]


# name -> (config class, config kwargs, rope parameters); kwargs hold head_dim, max_position_embeddings, ...
CASES = {
    "default": (LlamaConfig, dict(head_dim=64), dict(rope_type="default", rope_theta=10000.0)),
    "default-theta1e6-D128": (LlamaConfig, dict(head_dim=128), dict(rope_type="default", rope_theta=1e6)),
    "default-partial0.5": (Phi3Config, dict(partial_rotary_factor=0.5), dict(rope_type="default", rope_theta=1e4)),
    "default-partial0.75-in-params": (LlamaConfig, dict(head_dim=64),
                                      dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.75)),
    "linear": (LlamaConfig, dict(head_dim=64), dict(rope_type="linear", rope_theta=1e4, factor=4.0)),
    "linear-4.5-D96": (LlamaConfig, dict(head_dim=96), dict(rope_type="linear", rope_theta=5e5, factor=4.5)),
    "dynamic": (LlamaConfig, dict(head_dim=64), dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
    "dynamic-8-partial": (LlamaConfig, dict(head_dim=128),
                          dict(rope_type="dynamic", rope_theta=1e6, factor=8.0, partial_rotary_factor=0.5)),
    "yarn": (LlamaConfig, dict(head_dim=64),
             dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=64)),
    "yarn-qwen": (LlamaConfig, dict(head_dim=128, max_position_embeddings=131072),
                  dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768)),
    "yarn-no-factor": (LlamaConfig, dict(head_dim=64),  # transformers requires the key, None allowed
                       dict(rope_type="yarn", rope_theta=1e4, factor=None, original_max_position_embeddings=32)),
    "yarn-attention-factor": (LlamaConfig, dict(head_dim=64),
                              dict(rope_type="yarn", rope_theta=1e4, factor=8.0, attention_factor=0.87,
                                   original_max_position_embeddings=32)),
    "yarn-deepseek-mscale": (LlamaConfig, dict(head_dim=64, max_position_embeddings=163840),
                             dict(rope_type="yarn", rope_theta=1e4, factor=40.0, mscale=1.0, mscale_all_dim=0.707,
                                  beta_fast=32, beta_slow=1, original_max_position_embeddings=4096)),
    "yarn-mscale-only": (LlamaConfig, dict(head_dim=64),
                         dict(rope_type="yarn", rope_theta=1e4, factor=8.0, mscale=0.707,
                              original_max_position_embeddings=32)),
    "yarn-betas-untruncated": (LlamaConfig, dict(head_dim=64),
                               dict(rope_type="yarn", rope_theta=1e4, factor=16.0, beta_fast=16, beta_slow=2,
                                    truncate=False, original_max_position_embeddings=16)),
    "yarn-partial": (LlamaConfig, dict(head_dim=128),
                     dict(rope_type="yarn", rope_theta=1e4, factor=4.0, partial_rotary_factor=0.25,
                          original_max_position_embeddings=64)),
    "llama3.1-8b": (LlamaConfig, dict(head_dim=128, max_position_embeddings=131072),
                    dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)),
    "llama3.2-1b": (LlamaConfig, dict(head_dim=64, max_position_embeddings=131072),
                    dict(rope_type="llama3", rope_theta=5e5, factor=32.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "longrope-phi3-mini": (Phi3Config, dict(hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
                                            original_max_position_embeddings=4096),
                           dict(rope_type="longrope", rope_theta=1e4, short_factor=short_factors(48),
                                long_factor=long_factors(48))),
    "longrope-factor": (LlamaConfig, dict(head_dim=64),
                        dict(rope_type="longrope", rope_theta=1e4, factor=3.0, short_factor=short_factors(32),
                             long_factor=long_factors(32), original_max_position_embeddings=16)),
    "longrope-attention-factor": (LlamaConfig, dict(head_dim=64),
                                  dict(rope_type="longrope", rope_theta=1e4, attention_factor=1.25,
                                       short_factor=short_factors(32), long_factor=long_factors(32),
                                       original_max_position_embeddings=16)),
    "longrope-partial": (Phi3Config, dict(hidden_size=128, partial_rotary_factor=0.5,
                                          original_max_position_embeddings=16),
                         dict(rope_type="longrope", rope_theta=1e4, short_factor=short_factors(8),
                              long_factor=long_factors(8))),
}


def make_config(name, **rope_changes):
    config_cls, kwargs, params = CASES[name]
    kwargs = dict(dict(hidden_size=256, num_attention_heads=4, max_position_embeddings=256, num_hidden_layers=1),
                  **kwargs)
    params = dict(copy.deepcopy(params), **rope_changes)
    return config_cls(rope_parameters=params, **kwargs)


def lengths_of(config):
    original = config.rope_parameters.get("original_max_position_embeddings") or config.max_position_embeddings
    return (None, 1, original - 1, original, original + 1, 3 * original, config.max_position_embeddings + 5)


def as_legacy_dict(config):
    """The same config as a 4.x-style dict: rope_scaling without rope_theta, rope_theta at the top level."""
    params = dict(config.rope_parameters)
    out = {"rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    for key in ("head_dim", "hidden_size", "num_attention_heads", "max_position_embeddings",
                "original_max_position_embeddings", "partial_rotary_factor"):
        if getattr(config, key, None) is not None:
            out[key] = getattr(config, key)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers_in_float64(name):
    config = make_config(name)
    rope_type = config.rope_parameters["rope_type"]
    ours = RopeScaling.from_hf_config(config)
    assert_matches_transformers(ours, config, rope_type, lengths_of(config))
    # both spellings read the same: 5.x rope_parameters (the config object) and 4.x rope_scaling + rope_theta
    assert RopeScaling.from_hf_config(as_legacy_dict(config)) == ours
    assert RopeScaling.from_hf_config({**as_legacy_dict(config), "rope_parameters": None}) == ours


# every key the rope type reads, changed: our result changes with it and still equals transformers'
PERTURB = {
    "default": [("rope_theta", 5e5), ("partial_rotary_factor", 0.5)],
    "linear": [("factor", 2.5)],
    "dynamic": [("factor", 3.0)],
    "yarn-deepseek-mscale": [("factor", 20.0), ("mscale", 0.5), ("mscale_all_dim", 1.0), ("beta_fast", 16),
                             ("beta_slow", 2), ("original_max_position_embeddings", 2048), ("truncate", False),
                             ("attention_factor", 1.5)],
    "llama3.1-8b": [("factor", 4.0), ("low_freq_factor", 2.0), ("high_freq_factor", 8.0),
                    ("original_max_position_embeddings", 4096)],
    "longrope-factor": [("factor", 5.0), ("attention_factor", 1.3), ("short_factor", short_factors(32)[::-1]),
                        ("long_factor", long_factors(32)[::-1]), ("original_max_position_embeddings", 24)],
}


def _outputs(rope, lengths):
    return [(f.tolist(), m) for f, m in (rope.frequencies(n) for n in lengths)]


@pytest.mark.parametrize("name, key, value", [(n, k, v) for n, changes in PERTURB.items() for k, v in changes])
def test_every_key_read_is_honoured(name, key, value):
    base = make_config(name)
    if key == "original_max_position_embeddings" and hasattr(base, "original_max_position_embeddings"):
        pytest.fail("the case's config has the attribute, which would win over the rope parameter")
    changed = make_config(name, **{key: value})
    lengths = lengths_of(changed)
    ours = RopeScaling.from_hf_config(changed)
    assert _outputs(ours, lengths) != _outputs(RopeScaling.from_hf_config(base), lengths), f"{key} had no effect"
    assert_matches_transformers(ours, changed, changed.rope_parameters["rope_type"], lengths)


def test_every_key_of_every_type_is_covered():
    """The honoured-key test above touches each key the reader accepts (so none can be accepted and dropped)."""
    touched = {k for changes in PERTURB.values() for k, _ in changes} | {"short_mscale", "long_mscale"}
    accepted = set().union(*ROPE_KEYS.values()) | COMMON_KEYS
    assert accepted - touched == {"rope_type", "type"}  # the two spellings of the type itself, tested below


def test_type_and_legacy_names():
    config = {"head_dim": 64, "max_position_embeddings": 64, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert RopeScaling.from_hf_config(config) == RopeScaling.linear(64, 2.0)
    phi3 = {"head_dim": 16, "max_position_embeddings": 64, "original_max_position_embeddings": 16,
            "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    assert RopeScaling.from_hf_config(phi3).kind == "longrope"


# ---- LongRoPE: separate short and long attention factors ----------------------------------------------------
PHI35_MSCALE = 1.243163121016122  # Phi-3.5-MoE-instruct's config.json: short_mscale == long_mscale


def phimoe_config(short_mscale, long_mscale, **params):
    pairs = 64
    rope = dict(type="longrope", short_factor=short_factors(pairs), long_factor=long_factors(pairs),
                original_max_position_embeddings=4096, **params)
    if short_mscale is not None:
        rope["short_mscale"] = short_mscale
    if long_mscale is not None:
        rope["long_mscale"] = long_mscale
    return PhimoeConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=1,
                        max_position_embeddings=131072, original_max_position_embeddings=4096, rope_theta=1e4,
                        rope_scaling=rope)


def phimoe_attention_factor(config, seq_len):
    """The factor transformers' PhiMoE rotary embedding multiplies cos and sin by, at a sequence of seq_len."""
    with transformers_in_float64(modeling_phimoe):
        emb = modeling_phimoe.PhimoeRotaryEmbedding(config)
        cos, sin = emb(torch.zeros(1, dtype=torch.float64), torch.arange(seq_len)[None])
    assert cos.dtype == torch.float64
    return (cos[0, -1] ** 2 + sin[0, -1] ** 2).sqrt().mean().item()


def test_phi35_moe_uses_its_mscale_not_the_default():
    config = phimoe_config(PHI35_MSCALE, PHI35_MSCALE)
    rope = RopeScaling.from_hf_config(config)
    default = math.sqrt(1 + math.log(32) / math.log(4096))  # 1.1902: what the mscale replaces
    for seq_len in (None, 4096, 4097, 131072):
        assert rope.frequencies(seq_len)[1] == PHI35_MSCALE
    assert abs(PHI35_MSCALE / default - 1) > 0.04
    for seq_len in (4096, 4097):
        assert phimoe_attention_factor(config, seq_len) == pytest.approx(PHI35_MSCALE, rel=RTOL)


def test_short_and_long_mscale_are_separate():
    config = phimoe_config(1.1, 1.3)
    rope = RopeScaling.from_hf_config(config)
    assert rope.length_dependent
    for seq_len, expect in ((None, 1.1), (1, 1.1), (4096, 1.1), (4097, 1.3), (20000, 1.3)):
        assert rope.frequencies(seq_len)[1] == expect
        if seq_len is not None:
            assert phimoe_attention_factor(config, seq_len) == pytest.approx(expect, rel=RTOL)
    # inv_freq: transformers' longrope function (the set switches at the original length)
    for seq_len in (None, 4096, 4097):
        inv_freq, _ = transformers_frequencies(config, "longrope", seq_len)
        torch.testing.assert_close(rope.frequencies(seq_len)[0], inv_freq, rtol=RTOL, atol=0)


def test_only_the_attention_factors_differ_is_still_length_dependent():
    factors = short_factors(8)
    same = RopeScaling.longrope(16, 16, 64, factors, factors)
    assert not same.length_dependent
    split = RopeScaling.longrope(16, 16, 64, factors, factors, short_attention_factor=1.0, long_attention_factor=1.2)
    assert split.length_dependent
    assert split.frequencies(16)[1] == 1.0 and split.frequencies(17)[1] == 1.2
    torch.testing.assert_close(split.frequencies(16)[0], split.frequencies(17)[0], rtol=0, atol=0)


def test_longrope_constructor_attention_factor_rules():
    s, l8 = short_factors(8), long_factors(8)
    default = math.sqrt(1 + math.log(4) / math.log(16))
    rope = RopeScaling.longrope(16, 16, 64, s, l8)
    assert (rope.frequencies(16)[1], rope.frequencies(17)[1]) == (default, default)
    rope = RopeScaling.longrope(16, 16, 64, s, l8, attention_factor=1.5)
    assert (rope.frequencies(16)[1], rope.frequencies(17)[1]) == (1.5, 1.5)
    rope = RopeScaling.longrope(16, 16, 64, s, l8, long_attention_factor=1.5)  # the other set keeps the default
    assert (rope.frequencies(16)[1], rope.frequencies(17)[1]) == (default, 1.5)
    rope = RopeScaling.longrope(16, 16, 16, s, l8)  # no extension: factor 1
    assert rope.frequencies(17)[1] == 1.0
    with pytest.raises(ValueError, match="attention_factor"):
        RopeScaling.longrope(16, 16, 64, s, l8, attention_factor=1.2, short_attention_factor=1.1)
    with pytest.raises(ValueError, match="long_attention_factor"):
        RopeScaling.longrope(16, 16, 64, s, l8, long_attention_factor=-1.0)
    with pytest.raises(ValueError, match="short_attention_factor"):
        RopeScaling.longrope(16, 16, 64, s, l8, short_attention_factor=float("nan"))


def test_longrope_stays_frozen_and_hashable():
    s, l8 = short_factors(8), long_factors(8)
    a = RopeScaling.longrope(16, 16, 64, s, l8, short_attention_factor=1.1, long_attention_factor=1.3)
    b = RopeScaling.longrope(16, 16, 64, list(s), list(l8), short_attention_factor=1.1, long_attention_factor=1.3)
    c = RopeScaling.longrope(16, 16, 64, s, l8, short_attention_factor=1.1, long_attention_factor=1.4)
    assert a == b and hash(a) == hash(b) and a != c
    assert len({a, b, c}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.base = 5.0


def test_longrope_defaults_without_mscale():
    """Neither mscale nor attention_factor: sqrt(1 + ln(s) / ln(L0)) with s = factor, else max / original.
    (PhimoeConfig itself requires both mscales; Phi-3's config has neither.)"""
    config = Phi3Config(hidden_size=4096, num_attention_heads=32, num_hidden_layers=1, max_position_embeddings=131072,
                        original_max_position_embeddings=4096,
                        rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=short_factors(64),
                                             long_factor=long_factors(64)))
    rope = RopeScaling.from_hf_config(config)
    expect = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    assert rope.frequencies(None)[1] == pytest.approx(expect, rel=1e-15)
    assert rope.frequencies(5000)[1] == pytest.approx(expect, rel=1e-15)
    assert_matches_transformers(rope, config, "longrope", (None, 4096, 4097))


# ---- rejections name the key ----------------------------------------------------------------------------------
def dict_config(params, **top):
    return dict(dict(head_dim=64, max_position_embeddings=64, rope_parameters=params), **top)


LONGROPE = dict(rope_type="longrope", short_factor=[1.0] * 32, long_factor=[2.0] * 32,
                original_max_position_embeddings=16)


@pytest.mark.parametrize("params, key", [
    (dict(rope_type="default", factor=2.0), "factor"),
    (dict(rope_type="default", mrope_section=[8, 12, 12]), "mrope_section"),
    (dict(rope_type="linear", factor=2.0, original_max_position_embeddings=16), "original_max_position_embeddings"),
    (dict(rope_type="dynamic", alpha=2.0), "alpha"),
    (dict(rope_type="dynamic", factor=2.0, attention_factor=1.1), "attention_factor"),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, extrapolation_factor=1.0),
     "extrapolation_factor"),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attn_factor=1.0), "attn_factor"),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, short_mscale=1.1), "short_mscale"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=16, attention_factor=1.1), "attention_factor"),
    (dict(LONGROPE, mscale=1.0), "mscale"),
    (dict(LONGROPE, short_mscale=1.2), "long_mscale"),
    (dict(LONGROPE, long_mscale=1.2), "short_mscale"),
    (dict(LONGROPE, short_mscale=1.2, long_mscale=1.2, attention_factor=1.1), "attention_factor"),
])
def test_unsupported_key_is_named(params, key):
    with pytest.raises(ValueError, match=f"'{key}'"):  # quoted: the key itself, not a longer name holding it
        RopeScaling.from_hf_config(dict_config(params))


def test_none_valued_key_counts_as_absent():
    assert RopeScaling.from_hf_config(dict_config(dict(rope_type="linear", factor=2.0, mscale=None))) == \
        RopeScaling.linear(64, 2.0)


@pytest.mark.parametrize("rope_type", ["ntk", "proportional", "mrope", "deepseek_yarn", "longrope2"])
def test_unsupported_rope_type_is_named(rope_type):
    with pytest.raises(NotImplementedError, match=rope_type):
        RopeScaling.from_hf_config(dict_config(dict(rope_type=rope_type, factor=2.0)))


@pytest.mark.parametrize("top, key", [
    (dict(rotary_dim=32), "rotary_dim"),
    (dict(rotary_pct=0.25), "rotary_pct"),
    (dict(rotary_emb_base=1e4), "rotary_emb_base"),
    (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),  # rotary dim int(64 * 0.3) = 19: odd
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(rope_scaling=dict(rope_type="linear", factor=4.0)), "rope_scaling"),  # differs from rope_parameters
])
def test_unsupported_config_attribute_is_named(top, key):
    with pytest.raises(ValueError, match=key):
        RopeScaling.from_hf_config(dict_config(dict(rope_type="linear", factor=2.0), **top))


def test_any_integer_length_is_accepted():
    """Rows whose keys all sit at negative positions have a length <= 0: short set, L0 base (docs/DESIGN.md §3.7)."""
    split = RopeScaling.longrope(16, 16, 64, short_factors(8), long_factors(8), short_attention_factor=1.0,
                                 long_attention_factor=1.2)
    dyn = RopeScaling.dynamic_ntk(16, 2.0, 16)
    for rope in (split, dyn):
        for length in (-5, torch.tensor(-1)):
            got, m = rope.frequencies(length)
            expect, expect_m = rope.frequencies(0)
            torch.testing.assert_close(got, expect, rtol=0, atol=0)
            assert m == expect_m
    assert split.frequencies(torch.tensor(17))[1] == 1.2
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="seq_len"):
            split.frequencies(bad)
