"""transformers integration: `RopeScaling.from_hf_config` and `patch_model` on tiny random models (no downloads).

Two kinds of comparison with transformers' own models (float64 weights):
- exact (`make_pair(exact=True)`): the patched model uses `RopeScaling.from_inv_freq` with the model's own inv_freq
  and attention factor, the stock model's rotary embedding forms its angles in float64 and, in both models, the
  RMS norms (which transformers computes in float32 whatever the model dtype) run in float64. Stock attention is
  SDPA (eager softmaxes in float32). Both then compute the same function in float64; logits agree to 1e-10.
- from the config: the patched model reads its rope with `from_hf_config` (float64 formulas) and the stock model
  runs untouched. transformers computes inv_freq (rel. error ~1e-7) and the angles p*w in float32: for positions
  < 128 the angle error is below 128 * 2**-24 ~ 1e-5 rad, so logits of order 1 may differ by ~1e-5 (seen: < 1e-6).
  Tolerance 5e-5. Length-dependent schedules (longrope, dynamic) can only be checked this way.
Stock eager attention in float64 returns NaN on padded batches (it softmaxes float64-min masks in float32), so the
padding tests compare against stock SDPA.
"""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, StaticCache)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from scaled_rope import RopeScaling  # noqa: E402
from scaled_rope.integrations import transformers as integration  # noqa: E402
from scaled_rope.integrations.transformers import (LayerAttention, hwfa_layers, is_patched, patch_model,  # noqa: E402
                                                   unpatch_model)

transformers.logging.set_verbosity_error()

VOCAB, HEAD_DIM, ORIGINAL = 97, 16, 32


def short_factors(pairs):
    return [1.0 + 0.4 * i / pairs for i in range(pairs)]


def long_factors(pairs):
    return [1.0 + 7.0 * i / pairs for i in range(pairs)]


SHORT, LONG = short_factors(HEAD_DIM // 2), long_factors(HEAD_DIM // 2)
EXACT, FROM_CONFIG = 1e-10, 5e-5

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),  # every layer sliding
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM,  # q/k norms; layer 0 full, layer 1 sliding
              {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"original_max_position_embeddings": ORIGINAL}),  # fused qkv
}
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": ORIGINAL},
}


def make_config(family="llama", rope="default", attn="eager", head_dim=HEAD_DIM, **overrides):
    """Tiny config: 4 query heads and 2 KV heads of head_dim (hidden = 4 * head_dim), 2 layers."""
    config_cls, _, extra = FAMILIES[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL,
                  initializer_range=0.1, attn_implementation=attn, bos_token_id=None, eos_token_id=None,
                  pad_token_id=0, **extra)
    if family != "phi3":
        kwargs["head_dim"] = head_dim
    kwargs["rope_parameters"] = copy.deepcopy(ROPES[rope])
    if rope == "longrope":
        kwargs["rope_parameters"].update(short_factor=short_factors(head_dim // 2),
                                         long_factor=long_factors(head_dim // 2))
    kwargs.update(overrides)
    return config_cls(**kwargs)


def make_pair(family="llama", rope="default", attn="eager", dtype=torch.float64, seed=0, exact=False,
              **overrides):
    """(stock, patched-to-be) models with the same random weights and separate configs."""
    torch.manual_seed(seed)
    model_cls = FAMILIES[family][1]
    if exact:
        attn = "sdpa"
    stock = model_cls(make_config(family, rope, attn, **overrides)).to(dtype).eval()
    other = model_cls(make_config(family, rope, attn, **overrides)).to(dtype).eval()
    other.load_state_dict(stock.state_dict())
    if exact:
        _exact_angles(stock)
        _float64_norms(stock)
        _float64_norms(other)
    return stock, other


def _float64_norms(model):
    """transformers' RMSNorm casts to float32; run it in the model's dtype so that float64 runs are exact."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            def forward(x, module=module):
                return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))
            module.forward = forward


def tokens(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rotary(model):
    return model.model.rotary_emb


def _exact_angles(model):
    """Make the stock model's rotary embedding form its angles in float64 from its own inv_freq."""
    emb = rotary(model)

    def forward(x, position_ids):
        freqs = position_ids[:, :, None].double() * emb.inv_freq.double()[None, None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        return (angles.cos() * emb.attention_scaling).to(x.dtype), (angles.sin() * emb.attention_scaling).to(x.dtype)

    emb.forward = forward
    return model


def own_rope(model):
    emb = rotary(model)
    return RopeScaling.from_inv_freq(emb.inv_freq, emb.attention_scaling, head_dim=model.config.head_dim
                                     if getattr(model.config, "head_dim", None) else
                                     model.config.hidden_size // model.config.num_attention_heads)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---- RopeScaling.from_hf_config against transformers' rope init functions ------------------------------------
@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_from_hf_config_matches_rope_init_functions(family, rope):
    if family == "phi3" and rope not in ("default", "longrope"):
        pytest.skip("Phi-3 configs accept default and longrope only")
    config = make_config(family, rope)
    ours = RopeScaling.from_hf_config(config)
    for seq_len in (None, 8, ORIGINAL, ORIGINAL + 1, 200):
        if rope == "default":
            inv_freq, factor = type(rotary(FAMILIES[family][1](config))).compute_default_rope_parameters(config)
        else:
            inv_freq, factor = ROPE_INIT_FUNCTIONS[rope](config, None, seq_len=seq_len)
        got, got_factor = ours.frequencies(seq_len)
        assert got.shape == inv_freq.shape
        # transformers computes inv_freq in float32: a few units of 2**-24 relative
        torch.testing.assert_close(got, inv_freq.double(), rtol=3e-7, atol=0)
        assert got_factor == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("params, expect", [
    # yarn without factor: factor = max / original; attention factor 0.1 ln(factor) + 1
    ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 8}, {"factor": 4.0}),
    # yarn with mscale / mscale_all_dim and no truncation
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "mscale": 0.707,
      "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False}, {}),
    # longrope with an explicit factor: the attention factor comes from it, not from max / original
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 3.0,
      "original_max_position_embeddings": 8}, {}),
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "attention_factor": 1.25,
      "original_max_position_embeddings": 8}, {}),
])
def test_from_hf_config_special_cases(params, expect):
    config = make_config("llama", max_position_embeddings=32, rope_parameters=dict(params, rope_theta=10000.0))
    ours = RopeScaling.from_hf_config(config)
    for seq_len in (None, 9):
        inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=seq_len)
        got, got_factor = ours.frequencies(seq_len)
        torch.testing.assert_close(got, inv_freq.double(), rtol=3e-7, atol=0)
        assert got_factor == pytest.approx(factor, rel=1e-12)
    if "factor" in expect:
        assert ours.param("factor") == expect["factor"]


def test_from_hf_config_dicts_and_legacy_names():
    # transformers 4.x layout: rope_scaling + rope_theta, Phi-3's legacy "su"; original length from the config
    legacy = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128,
              "original_max_position_embeddings": ORIGINAL, "rope_theta": 5000.0, "partial_rotary_factor": 0.5,
              "rope_scaling": {"type": "su", "short_factor": SHORT[:4], "long_factor": LONG[:4]}}
    rope = RopeScaling.from_hf_config(legacy)
    assert (rope.kind, rope.rotary_dim, rope.base, rope.original_max_position) == ("longrope", 8, 5000.0, ORIGINAL)
    assert rope.frequencies(ORIGINAL + 1)[1] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(ORIGINAL)))
    # Phi-3: the config attribute wins over the value inside rope_parameters, as in transformers
    config = make_config("phi3", "longrope", max_position_embeddings=128)
    config.rope_parameters["original_max_position_embeddings"] = 999
    assert RopeScaling.from_hf_config(config).original_max_position == ORIGINAL
    with pytest.raises(NotImplementedError, match="proportional"):
        RopeScaling.from_hf_config({"head_dim": 16, "rope_parameters": {"rope_type": "proportional"}})
    per_layer = {"head_dim": 16, "layer_types": ["full_attention", "sliding_attention"],
                 "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    with pytest.raises(NotImplementedError, match="layer types"):
        RopeScaling.from_hf_config(per_layer)


# ---- logits of the patched model equal transformers' own ------------------------------------------------------
@pytest.mark.parametrize("rope", ["default", "linear", "yarn", "llama3"])
def test_prefill_logits_exact(rope):
    stock, patched = make_pair("llama", rope, exact=True)
    patch_model(patched, rope=own_rope(stock), backend="reference")
    ids = tokens(2, 29)
    assert max_diff(logits(patched, ids), logits(stock, ids)) < EXACT


@pytest.mark.parametrize("rope", list(ROPES))
def test_prefill_logits_from_config(rope):
    family = "phi3" if rope == "longrope" else "llama"
    # lengths on both sides of the original length (32): short and long factor sets, dynamic NTK off and on
    for length in (20, 45):
        stock, patched = make_pair(family, rope)
        patch_model(patched, backend="reference")
        ids = tokens(2, length)
        assert max_diff(logits(patched, ids), logits(stock, ids)) < FROM_CONFIG, length


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_prefill_and_decode_exact(family):
    """Prefill, then decode steps over the cache (the decode kernel), logits at every step."""
    overrides = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}} \
        if family == "phi3" else {}
    stock, patched = make_pair(family, exact=True, **overrides)
    patch_model(patched, rope=own_rope(stock), backend="reference")
    if family == "phi3":
        assert patched.model.layers[0].self_attn._scaled_rope_patch.rope.rotary_dim == HEAD_DIM // 2
    ids = tokens(2, 13)
    caches = DynamicCache(config=stock.config), DynamicCache(config=patched.config)
    with torch.no_grad():
        outs = [m(ids, past_key_values=c, use_cache=True).logits for m, c in zip((stock, patched), caches)]
        assert max_diff(*outs) < EXACT
        for step in range(6):  # sliding layers (window 6 / 8) drop keys along the way
            nxt = outs[0][:, -1:].argmax(-1)
            outs = [m(nxt, past_key_values=c, use_cache=True).logits for m, c in zip((stock, patched), caches)]
            assert max_diff(*outs) < EXACT, step


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_identical(family):
    rope = "longrope" if family == "phi3" else "yarn"
    stock, patched = make_pair(family, rope)
    patch_model(patched, backend="reference")
    ids = tokens(2, 11)
    options = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(patched.generate(ids, **options), stock.generate(ids, **options))


@pytest.mark.parametrize("rope", list(ROPES))
def test_greedy_64_tokens_every_rope_float32(rope):
    """float32, 64 greedy tokens: the patched model (cached, keys rotated on the fly with each step's frequencies)
    gives the tokens of the stock model recomputing the whole sequence every step (use_cache=False: the exact
    function; with its cache, stock keeps keys rotated with a length-dependent schedule's old frequencies). One
    layer, so that no cached value depends on the schedule; the prompt (20) ends below LongRoPE's original length
    (32) and generation crosses it."""
    stock, patched = make_pair("llama", rope, dtype=torch.float32, num_hidden_layers=1)
    patch_model(patched, backend="reference")
    ids = tokens(1, 20, seed=11)
    options = dict(max_new_tokens=64, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = patched.generate(ids, **options)
        want = stock.generate(ids, use_cache=False, **options)
    assert torch.equal(got, want)


# ---- StaticCache, CUDA graphs, torch.compile -------------------------------------------------------------------
def _static_cache(model, batch, length):
    return StaticCache(config=model.config, max_cache_len=length)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_static_cache_prefill_and_decode_exact(family):
    """A StaticCache holds the unrotated keys in its fixed buffers; each decode step reads the cache's own length
    tensor. Logits equal stock transformers with its own StaticCache."""
    stock, patched = make_pair(family, exact=True)
    patch_model(patched, rope=own_rope(stock), backend="reference")
    ids = tokens(2, 13)
    caches = _static_cache(stock, 2, 24), _static_cache(patched, 2, 24)
    with torch.no_grad():
        outs = [m(ids, past_key_values=c, use_cache=True).logits for m, c in zip((stock, patched), caches)]
        assert max_diff(*outs) < EXACT
        for step in range(6):
            nxt = outs[0][:, -1:].argmax(-1)
            position = torch.full((2, 1), 13 + step)
            outs = [m(nxt, past_key_values=c, use_cache=True, position_ids=position).logits
                    for m, c in zip((stock, patched), caches)]
            assert max_diff(*outs) < EXACT, step


def test_static_cache_generate_and_limits():
    stock, patched = make_pair("llama", "yarn")
    patch_model(patched, backend="reference")
    ids = tokens(1, 11)
    options = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(patched.generate(ids, cache_implementation="static", **options),
                           stock.generate(ids, **options))
    # rows with padding and sliding-window layers are refused by name, never attended wrongly
    ids2, mask = _left_padded([11, 7], 11)
    with pytest.raises(RuntimeError, match="padded rows"):
        with torch.no_grad():
            patched(ids2, attention_mask=mask, past_key_values=_static_cache(patched, 2, 16), use_cache=True)
    # a second prefill chunk into a filled static cache is refused (checked by the first layer)
    cache = _static_cache(patched, 1, 64)
    with torch.no_grad():
        patched(tokens(1, 20), past_key_values=cache, use_cache=True)
        with pytest.raises(NotImplementedError, match="chunked prefill"):
            patched(tokens(1, 20), past_key_values=cache, use_cache=True)
    _, sliding = make_pair("mistral")
    patch_model(sliding, backend="reference")
    with pytest.raises(NotImplementedError, match="sliding-window"):
        logits(sliding, ids, past_key_values=_static_cache(sliding, 1, 16), use_cache=True)


def test_compiled_static_decode_has_no_graph_break():
    """torch.compile(fullgraph=True) of the patched model's decode step over a StaticCache traces in one graph (the
    attention is a torch.library op) and gives the eager logits."""
    torch._dynamo.reset()
    _, patched = make_pair("llama", "longrope", dtype=torch.float32)
    patch_model(patched, backend="reference")
    ids = tokens(1, 9)
    cache = _static_cache(patched, 1, 16)
    eager_cache = _static_cache(patched, 1, 16)
    step = torch.compile(patched.forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        patched(ids, past_key_values=cache, use_cache=True)
        patched(ids, past_key_values=eager_cache, use_cache=True)
        token = torch.ones(1, 1, dtype=torch.long)
        for i in range(3):
            position = torch.full((1, 1), 9 + i)
            got = step(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True).logits
            want = patched(token, past_key_values=eager_cache, position_ids=position, use_cache=True).logits
            assert max_diff(got, want) < 1e-5, i


# ---- length-dependent schedules: crossing the original length needs no re-prefill -----------------------------
def _generate_logits(model, ids, new_tokens):
    prefills = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(kwargs["input_ids"].shape[1] > 1), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
    finally:
        hook.remove()
    return out.sequences, torch.stack(out.logits, dim=1), sum(prefills)


@pytest.mark.parametrize("family, rope", [("phi3", "longrope"), ("llama", "dynamic")])
def test_crossing_original_length_matches_full_recompute(family, rope):
    """One layer, so that the cached keys and values do not depend on the rope (with more layers, the values of
    layer 2 hold layer-1 outputs computed with the short set, which a full recompute would redo). Each decode
    step after the switch rotates every cached key with the long set: the logits of a full recompute."""
    stock, patched = make_pair(family, rope, num_hidden_layers=1)
    _float64_norms(stock)
    _float64_norms(patched)
    patch_model(patched, backend="reference")
    prompt, new = 27, 12
    sequences, steps, prefills = _generate_logits(patched, tokens(1, prompt), new)
    assert prefills == 1  # the cache is kept across the switch
    recompute = torch.stack([logits(stock, sequences[:, :prompt + i])[:, -1] for i in range(new)], dim=1)
    assert max_diff(steps, recompute) < FROM_CONFIG
    # the stock model decodes wrongly after the switch: Llama keeps keys rotated with the old base; Phi-3 means to
    # re-prefill, but in transformers 5.17 it drops the cache and then runs only the last token, with no context
    _, stock_steps, _ = _generate_logits(stock, tokens(1, prompt), new)
    crossed = slice(ORIGINAL - prompt, None)
    assert max_diff(stock_steps[:, crossed], recompute[:, crossed]) > 1e-3


# ---- left padding ---------------------------------------------------------------------------------------------
def _left_padded(lengths, total, seed=3):
    ids = tokens(len(lengths), total, seed)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, total - length:] = 1
        ids[row, :total - length] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padding_prefill_and_generation(family):
    stock, patched = make_pair(family, exact=True)
    patch_model(patched, rope=own_rope(stock), backend="reference")
    ids, mask = _left_padded([15, 9, 12], 15)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    got = logits(patched, ids, attention_mask=mask, position_ids=positions)
    want = logits(stock, ids, attention_mask=mask, position_ids=positions)
    valid = mask.bool()
    assert max_diff(got[valid], want[valid]) < EXACT
    assert torch.isfinite(got).all()
    # each row alone, unpadded, gives the same logits
    for row in range(3):
        alone = logits(patched, ids[row:row + 1][mask[row:row + 1].bool()][None])
        assert max_diff(alone[0], got[row][valid[row]]) < EXACT
    options = dict(max_new_tokens=9, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(patched.generate(ids, attention_mask=mask, **options),
                           stock.generate(ids, attention_mask=mask, **options))


def test_left_padding_longrope_rows_switch_independently():
    """Rows of one batch on either side of the original length each use their own factor set."""
    _, patched = make_pair("phi3", "longrope")
    patch_model(patched, backend="reference")
    ids, mask = _left_padded([40, 20], 40)
    padded_steps = _generate_logits_masked(patched, ids, mask, 15)
    for row, length in enumerate((40, 20)):
        alone_ids = ids[row:row + 1, 40 - length:]
        _, alone, _ = _generate_logits(patched, alone_ids, 15)
        assert max_diff(padded_steps[row], alone[0]) < EXACT


def _generate_logits_masked(model, ids, mask, new_tokens):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, dim=1)


# ---- ReRoPE / Leaky ReRoPE ------------------------------------------------------------------------------------
def _explicit_rerope_attention(q, k, v, rope, window, leak, scale):
    """Independent form: two explicit score matrices, float64 angles from rope.frequencies(), one row."""
    inv_freq, m = rope.frequencies(q.shape[0])
    half = rope.rotary_dim // 2

    def rot(x, pos):  # x (N, H, D), pos float64 (N,)
        angle = pos[:, None] * inv_freq[None, :]
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        x1, x2, rest = x[..., :half], x[..., half:rope.rotary_dim], x[..., rope.rotary_dim:]
        return torch.cat([m * (x1 * cos - x2 * sin), m * (x1 * sin + x2 * cos), rest], dim=-1)

    n = q.shape[0]
    pos = torch.arange(n, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    near = torch.einsum("qhd,khd->hqk", rot(q, pos), rot(k, pos))
    q_far = torch.full_like(pos, float(window)) if leak is None else pos / leak + window * (1 - 1 / leak)
    k_far = torch.zeros_like(pos) if leak is None else pos / leak
    far = torch.einsum("qhd,khd->hqk", rot(q, q_far), rot(k, k_far))
    delta = pos[:, None] - pos[None, :]
    scores = torch.where(delta < window, near, far) * scale
    scores = scores.masked_fill(delta < 0, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("leak", [None, 4.0, 0.25])
def test_rerope_layer_matches_explicit_form(leak):
    _, patched = make_pair("llama", "linear")
    patch_model(patched, rerope_window=5, rerope_leak=leak, backend="reference")
    rope = RopeScaling.from_hf_config(patched.config)
    attn = patched.model.layers[0].self_attn
    hidden = torch.randn(1, 21, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, _ = attn(hidden, position_ids=torch.arange(21)[None])
        q = attn.q_proj(hidden).view(21, 4, HEAD_DIM)
        k = attn.k_proj(hidden).view(21, 2, HEAD_DIM)
        v = attn.v_proj(hidden).view(21, 2, HEAD_DIM)
        want = attn.o_proj(_explicit_rerope_attention(q, k, v, rope, 5, leak, attn.scaling).reshape(1, 21, 64))
    assert max_diff(got, want) < EXACT


@pytest.mark.parametrize("window, leak, logn", [(5, None, None), (5, 3.0, None), (64, None, None), (5, 1.0, None),
                                               (None, None, 4.0)])
def test_rerope_generation_matches_recompute(window, leak, logn):
    """Cached decode (decode kernel, near/far per key, log-n at the query's own position) equals a full forward on
    the whole sequence; a window beyond the sequence, or leak 1, is plain RoPE and equals transformers' logits."""
    stock, patched = make_pair("qwen2", "default", exact=True)
    patch_model(patched, rope=own_rope(stock), rerope_window=window, rerope_leak=leak, logn_base=logn,
                backend="reference")
    prompt = 10
    sequences, steps, _ = _generate_logits(patched, tokens(1, prompt), 8)
    recompute = torch.stack([logits(patched, sequences[:, :prompt + i])[:, -1] for i in range(8)], dim=1)
    assert max_diff(steps, recompute) < 1e-6  # generate() hands out float32 logits
    plain = logn is None and (window > prompt + 8 or leak == 1.0)
    stock_steps = torch.stack([logits(stock, sequences[:, :prompt + i])[:, -1] for i in range(8)], dim=1)
    assert (max_diff(steps, stock_steps) < 1e-6) == plain


# ---- patching mechanics and errors ----------------------------------------------------------------------------
def test_unpatch_restores_stock_model():
    stock, model = make_pair("llama", "yarn")
    ids = tokens(1, 12)
    patch_model(model, backend="reference")
    assert is_patched(model) and model.config._attn_implementation == "scaled_rope"
    patch_model(model, rerope_window=4, backend="reference")  # re-patching replaces the settings
    unpatch_model(model)
    assert not is_patched(model) and model.config._attn_implementation == "eager"
    assert max_diff(logits(model, ids), logits(stock, ids)) == 0


def test_phi3_keeps_its_cache_and_unpatch_restores_reprefill():
    _, model = make_pair("phi3", "longrope")
    patch_model(model, backend="reference")
    assert "prepare_inputs_for_generation" in vars(model)
    unpatch_model(model)
    assert "prepare_inputs_for_generation" not in vars(model)


def test_training_gradients_match():
    stock, patched = make_pair("llama", "default", exact=True)
    patch_model(patched, rope=own_rope(stock), backend="reference")
    ids = tokens(2, 9)
    for model in (stock, patched):
        model.train()
        model(ids, labels=ids).loss.backward()
    for (name, a), b in zip(stock.named_parameters(), patched.parameters()):
        assert max_diff(a.grad, b.grad) < EXACT, name


def test_errors():
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel"):
        patch_model(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)))
    stock, patched = make_pair("llama")
    with pytest.raises(ValueError, match="head_dim"):
        patch_model(patched, rope=RopeScaling.default(32))
    with pytest.raises(ValueError, match="rerope_leak"):
        patch_model(patched, rerope_leak=2.0)
    patch_model(patched, backend="reference")
    ids = tokens(1, 8)
    with pytest.raises(ValueError, match="position_ids must lie"):
        logits(patched, ids, position_ids=torch.arange(-1, 7)[None])
    with pytest.raises(NotImplementedError, match="packed"):
        logits(patched, ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]))
    with pytest.raises(NotImplementedError, match="4D"):
        logits(patched, ids, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    cache = DynamicCache(config=stock.config)
    with torch.no_grad():
        stock(ids, past_key_values=cache, use_cache=True)  # rotated keys
    with pytest.raises(ValueError, match="did not write"):
        logits(patched, ids[:, :1], past_key_values=cache, use_cache=True)
    stock.config._attn_implementation = "scaled_rope"  # a model whose layers were not patched
    with pytest.raises(NotImplementedError, match="not patched"):
        logits(stock, ids)


# ---- per-layer layouts (HWFA) ---------------------------------------------------------------------------------
def test_hwfa_layers_layout():
    layout = hwfa_layers(5, window=8, full_layers=(1, -1), logn_base=64.0)
    assert [layout[i] for i in range(5)] == [LayerAttention(window=8), LayerAttention(rope=False, logn_base=64.0),
                                             LayerAttention(window=8), LayerAttention(window=8),
                                             LayerAttention(rope=False, logn_base=64.0)]
    rerope = hwfa_layers(3, window=8, full="rerope", rerope_window=8)
    assert rerope[2] == LayerAttention(rerope_window=8) and rerope[0] == LayerAttention(window=8)
    assert hwfa_layers(3, window=8, full="rope")[2] == LayerAttention()
    for kwargs, match in [(dict(full="xpos"), "full"), (dict(full="rerope"), "rerope_window"),
                          (dict(rerope_window=4), "rerope_window"), (dict(full_layers=(3,)), "full_layers")]:
        with pytest.raises(ValueError, match=match):
            hwfa_layers(3, window=8, **kwargs)


@pytest.mark.parametrize("full", ["nope", "rerope"])
def test_patch_model_runs_the_layer_layout_asked(monkeypatch, full):
    """Each layer calls the attention with its own settings (window layers: window and RoPE; full layers: NoPE
    with log-n, or ReRoPE), and cached decoding equals recomputing the whole sequence."""
    _, patched = make_pair("llama", "default", num_hidden_layers=3)
    layout = hwfa_layers(3, window=4, full_layers=(1,), full=full, logn_base=8.0,
                         rerope_window=4 if full == "rerope" else None)
    patch_model(patched, backend="reference", layers=layout)
    seen = []
    for name in ("scaled_rope_attention", "scaled_rope_attention_with_kvcache"):
        real = getattr(integration, name)

        def spy(q, k, v, rope, *args, real=real, **kwargs):
            seen.append((rope is None, kwargs["window"], kwargs["logn_base"], kwargs["rerope_window"]))
            return real(q, k, v, rope, *args, **kwargs)
        monkeypatch.setattr(integration, name, spy)
    ids = tokens(1, 12)
    sequences, steps, _ = _generate_logits(patched, ids, 4)
    full_layer = (True, None, 8.0, None) if full == "nope" else (False, None, 8.0, 4)
    assert seen[:3] == [(False, 4, None, None), full_layer, (False, 4, None, None)]  # prefill, then each step
    assert seen[3:6] == seen[:3]
    recomputed = logits(patched, sequences[:, :-1])[:, 11:]
    assert max_diff(steps.double(), recomputed) < 1e-6  # generate() hands its logits back in float32
    with pytest.raises(ValueError, match="layer indices"):
        patch_model(patched, layers={3: LayerAttention()})
    with pytest.raises(ValueError, match="rerope_window needs a rope"):
        patch_model(patched, layers={0: LayerAttention(rope=False, rerope_window=4)})
    with pytest.raises(TypeError, match="LayerAttention"):
        patch_model(patched, layers={0: dict(window=4)})


def test_layer_layout_through_the_decode_plans(monkeypatch):
    """Triton's decode path keeps one DecodePlan per layer setting within a step: window RoPE layers and a full
    NoPE layer decode as the reference backend does."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, model = make_pair("llama", "default", dtype=torch.float32, num_hidden_layers=3)
    layout = hwfa_layers(3, window=4, full_layers=(1,), logn_base=8.0)
    ids = tokens(1, 10)
    got = {}
    for backend in ("reference", "triton"):
        patch_model(model, backend=backend, layers=layout)
        got[backend] = _generate_logits(model, ids, 3)[1]
    assert max_diff(got["triton"], got["reference"]) < 1e-4


# ---- Triton interpreter (CPU) and GPU tiers -------------------------------------------------------------------
def test_triton_backend_in_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    stock, patched = make_pair("qwen3", "yarn", dtype=torch.float32)
    patch_model(patched, backend="triton")
    ids = tokens(1, 9)
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True)
    with torch.no_grad():
        got, want = patched.generate(ids, **options), stock.generate(ids, **options)
    assert torch.equal(got.sequences, want.sequences)
    assert max_diff(torch.stack(got.logits), torch.stack(want.logits)) < 1e-4


def test_inverse_leaky_rerope_trains_then_infers_with_plain_rope(monkeypatch):
    """Inverse Leaky ReRoPE (seed 004): rerope_leak = 1/16 < 1 stretches far relative positions 16x. A tiny model
    trains a few steps with it through the Triton kernels' fused backward (interpreter), step for step as with the
    reference backend, the loss falls, and the trained model then runs with plain RoPE."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids = tokens(2, 24, seed=3)
    losses = {}
    for backend in ("reference", "triton"):
        _, model = make_pair("llama", "default", dtype=torch.float32, seed=4)
        patch_model(model, rerope_window=6, rerope_leak=1 / 16, backend=backend)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[backend] = []
        for _ in range(4):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
        patch_model(model, backend=backend)  # inference with plain RoPE
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
    assert losses["triton"] == pytest.approx(losses["reference"], rel=1e-4)
    assert losses["reference"][-1] < losses["reference"][0]


def _gpu_pair(family, rope, dtype, **overrides):
    """head_dim 64: the CUDA kernels' smallest (auto picks CUDA, else Triton)."""
    stock, patched = make_pair(family, rope, attn="sdpa", dtype=torch.float32, head_dim=64, intermediate_size=256,
                               **overrides)
    gold = copy.deepcopy(stock).cuda()
    return gold, stock.to("cuda", dtype), patched.to("cuda", dtype)


def _assert_rule(name, got, gold, baseline):
    """docs/DESIGN.md §6.1: err(patched) <= 2 err(stock at the same dtype) + floor, against fp32 stock."""
    err, base = max_diff(got.float(), gold), max_diff(baseline.float(), gold)
    assert err <= 2 * base + 1e-3 * gold.abs().max().item(), (name, err, base)


@pytest.mark.gpu
@pytest.mark.parametrize("family, rope", [("llama", "llama3"), ("qwen3", "yarn"), ("phi3", "longrope")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_prefill_decode_and_padding(family, rope, dtype):
    gold, stock, patched = _gpu_pair(family, rope, dtype)
    patch_model(patched)  # backend="auto": the GPU kernels
    ids, mask = _left_padded([40, 23], 40)
    ids, mask = ids.cuda(), mask.cuda()
    for kwargs in ({}, {"attention_mask": mask}):
        valid = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
        g, s, p = (logits(m, ids, **kwargs)[valid] for m in (gold, stock, patched))
        _assert_rule(f"prefill {kwargs.keys()}", p, g, s)
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    sequences = patched.generate(ids[:1], **options)
    _, steps, _ = _generate_logits(patched, ids[:1], 12)
    recompute = torch.stack([logits(gold, sequences[:, :40 + i])[:, -1] for i in range(12)], dim=1)
    baseline = torch.stack([logits(stock, sequences[:, :40 + i])[:, -1] for i in range(12)], dim=1)
    _assert_rule("decode", steps, recompute, baseline)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_static_cache_decode_step_captured_in_cuda_graph(dtype):
    """A patched decode step over a StaticCache has no host synchronisation and fixed shapes: it is captured in a
    CUDA graph, and replays of the graph give the logits of the same steps run eagerly."""
    _, _, patched = _gpu_pair("llama", "llama3", dtype)
    patch_model(patched)
    ids = tokens(1, 40).cuda()
    graphed_cache, eager_cache = _static_cache(patched, 1, 64), _static_cache(patched, 1, 64)
    token = torch.ones(1, 1, dtype=torch.long, device="cuda")
    position = torch.full((1, 1), 40, dtype=torch.long, device="cuda")
    with torch.no_grad():
        patched(ids, past_key_values=graphed_cache, use_cache=True)
        patched(ids, past_key_values=eager_cache, use_cache=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up step outside the capture (kernels compiled, tables cached)
            warm = patched(token, past_key_values=graphed_cache, position_ids=position, use_cache=True).logits
        torch.cuda.current_stream().wait_stream(side)
        want = patched(token, past_key_values=eager_cache, position_ids=position, use_cache=True).logits
        assert max_diff(warm.float(), want.float()) == 0
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = patched(token, past_key_values=graphed_cache, position_ids=position, use_cache=True).logits
        for step in range(1, 4):
            position.fill_(40 + step)
            token.fill_(step + 1)
            graph.replay()
            want = patched(token, past_key_values=eager_cache, position_ids=position, use_cache=True).logits
            assert max_diff(captured.float(), want.float()) == 0, step


@pytest.mark.gpu
def test_gpu_longrope_crossing_matches_recompute():
    gold, stock, patched = _gpu_pair("phi3", "longrope", torch.bfloat16, num_hidden_layers=1)
    patch_model(patched)
    ids = tokens(2, 27).cuda()
    sequences, steps, prefills = _generate_logits(patched, ids, 12)
    assert prefills == 1
    recompute = torch.stack([logits(gold, sequences[:, :27 + i])[:, -1] for i in range(12)], dim=1)
    baseline = torch.stack([logits(stock, sequences[:, :27 + i])[:, -1] for i in range(12)], dim=1)
    _assert_rule("crossing", steps, recompute, baseline)
