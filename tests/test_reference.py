"""Reference tier (CPU): schedules against published constants, the reference against independent forms."""
import math

import pytest
import torch

from scaled_rope import RopeScaling, reference, scaled_rope_attention
from scaled_rope.tables import build_tables, turns_to_angle

from helpers import GOLD_DTYPE, LONG as LONG64, SHORT as SHORT64, assert_close_to_gold, random_inputs, schedules

SHORT, LONG = SHORT64[:32], LONG64[:32]  # 32 pairs: head_dim 64


# ---- schedules ----------------------------------------------------------------------------------------------
def test_llama31_band_factors_match_published_values():
    rope = RopeScaling.llama3(128, 8.0, 8192, 1.0, 4.0, base=500000.0)
    inv_freq, factor = rope.frequencies()
    ratios = (rope.unscaled_frequencies() / inv_freq)[29:35]
    expected = torch.tensor([1.2075, 1.5534, 2.0263, 2.6945, 3.6843, 5.2573], dtype=torch.float64)
    assert torch.allclose(ratios, expected, atol=5e-5)
    assert factor == 1.0
    assert torch.allclose((rope.unscaled_frequencies() / inv_freq)[:29], torch.ones(29, dtype=torch.float64))
    assert torch.allclose((rope.unscaled_frequencies() / inv_freq)[35:], torch.full((29,), 8.0, dtype=torch.float64))


@pytest.mark.parametrize("scale", [2.0, 16.0, 64.0])
def test_yarn_default_attention_factor(scale):
    assert RopeScaling.yarn(64, scale, 4096).frequencies()[1] == pytest.approx(0.1 * math.log(scale) + 1)


def test_yarn_ramp_keeps_fast_pairs_and_interpolates_slow_pairs():
    rope = RopeScaling.yarn(128, 16.0, 4096)
    inv_freq, _ = rope.frequencies()
    ratio = rope.unscaled_frequencies() / inv_freq
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(16.0)
    assert (ratio[1:] >= ratio[:-1] - 1e-12).all()


def test_longrope_attention_factor_and_set_switch():
    rope = RopeScaling.longrope(64, 4096, 131072, SHORT, LONG)
    assert rope.frequencies()[1] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    w0 = rope.unscaled_frequencies()
    assert torch.allclose(rope.frequencies(4096)[0], w0 / torch.tensor(SHORT, dtype=torch.float64))
    assert torch.allclose(rope.frequencies(4097)[0], w0 / torch.tensor(LONG, dtype=torch.float64))


def test_ntk_and_dynamic_ntk_bases():
    w = RopeScaling.ntk(64, 8.0).frequencies()[0]
    base = 10000.0 * 8.0 ** (64 / 62)
    assert torch.allclose(w, base ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    dyn = RopeScaling.dynamic_ntk(64, 2.0, 100)
    assert torch.allclose(dyn.frequencies(50)[0], RopeScaling.default(64).frequencies()[0])
    base = 10000.0 * (2.0 * 300 / 100 - 1) ** (64 / 62)
    assert torch.allclose(dyn.frequencies(300)[0], base ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64))


def test_giraffe_bases():
    w0 = RopeScaling.default(64).frequencies()[0]
    i = torch.arange(32, dtype=torch.float64)
    assert torch.allclose(RopeScaling.power_basis(64, 2.0).frequencies()[0], w0 * (1 - 2 * i / 64) ** 2)
    c = 2 * math.pi / 500
    w = RopeScaling.truncated_basis(64, 500).frequencies()[0]
    assert ((w == w0) == (w0 >= c)).all()
    mid = (w0 < c) & (w0 >= c / 8)
    assert torch.allclose(w[mid], torch.full_like(w[mid], c / 16)) and (w[w0 < c / 8] == 0).all()


@pytest.mark.parametrize("bad, match", [
    (lambda: RopeScaling.linear(64, -1.0), "factor"),
    (lambda: RopeScaling.default(64, rotary_dim=33), "rotary_dim"),
    (lambda: RopeScaling.default(64, rotary_dim=128), "rotary_dim"),
    (lambda: RopeScaling.default(64, layout="neox"), "layout"),
    (lambda: RopeScaling.longrope(64, 4096, 8192, SHORT[:5], LONG), "short_factors"),
    (lambda: RopeScaling.longrope(64, 4096, 8192, SHORT, LONG[:-1]), "long_factors"),
    (lambda: RopeScaling.from_factors(64, [1.0] * 31 + [0.0]), "factors"),
    (lambda: RopeScaling.llama3(64, 8.0, 8192, 4.0, 1.0), "high_freq_factor"),
    (lambda: RopeScaling.default(64, base=0.0), "base"),
])
def test_bad_schedule_arguments_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_from_hf_config_reads_rope_parameters_and_rope_scaling():
    llama31 = dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192))
    rope = RopeScaling.from_hf_config(llama31)
    assert rope.kind == "llama3" and rope.head_dim == 128 and rope.base == 500000.0
    phi3 = dict(hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
                original_max_position_embeddings=4096, partial_rotary_factor=0.5,
                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 24,
                                     long_factor=[2.0] * 24))
    rope = RopeScaling.from_hf_config(phi3)
    assert rope.kind == "longrope" and rope.rotary_dim == 48 and rope.head_dim == 96
    assert rope.frequencies()[1] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


# ---- angles -------------------------------------------------------------------------------------------------
def test_fixed_point_angles_meet_precision_rule_to_2_pow_21():
    """cos/sin from the int64 tables agree with float64 truth within 1e-6 up to 2**21 for every w <= 1."""
    omega = torch.cat([torch.tensor([1.0, 0.999999, 0.5, 1 / 3]), torch.rand(200, dtype=torch.float64)])
    rope = RopeScaling.from_inv_freq(omega)
    tables = build_tables(rope, 1, "cpu")
    positions = torch.tensor([0, 1, 2 ** 20 + 7, 2 ** 21 - 1, 2 ** 21], dtype=torch.int64)
    angle = turns_to_angle(positions[:, None] * tables.turns[0][None, :])
    truth = positions[:, None].double() * omega[None, :]
    assert (torch.cos(angle) - torch.cos(truth)).abs().max() < 1e-6
    assert (torch.sin(angle) - torch.sin(truth)).abs().max() < 1e-6
    # a float32 product alone is far off at these positions: the rule is not vacuous
    naive = positions[:, None].float() * omega[None, :].float()
    assert (torch.cos(naive.double()) - torch.cos(truth)).abs().max() > 1e-3


def test_tables_follow_each_rows_length():
    rope = RopeScaling.longrope(64, 16, 256, SHORT, LONG)
    tables = build_tables(rope, 2, "cpu", seq_lens=torch.tensor([16, 17]))
    for row, length in enumerate([16, 17]):
        expected = build_tables(RopeScaling.from_inv_freq(rope.frequencies(length)[0]), 1, "cpu").turns[0]
        assert torch.equal(tables.turns[row], expected)
    dyn = RopeScaling.dynamic_ntk(64, 2.0, 16)
    tables = build_tables(dyn, 2, "cpu", seq_lens=torch.tensor([10, 40]))
    for row, length in enumerate([10, 40]):
        angle = turns_to_angle(1000 * tables.turns[row])
        assert torch.allclose(torch.cos(angle), torch.cos(1000 * dyn.frequencies(length)[0]), atol=1e-9)


# ---- reference against independent forms --------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [None, 40])
def test_rotation_matches_complex_multiplication(layout, rotary_dim):
    torch.manual_seed(1)
    rope = RopeScaling.yarn(64, 8.0, 32, rotary_dim=rotary_dim, layout=layout)
    r = rope.rotary_dim
    x = torch.randn(2, 9, 3, 64, dtype=torch.float64)
    pos = torch.randint(0, 2 ** 21, (2, 9))
    out = reference.rotate(x, pos, rope)
    w, m = rope.frequencies()
    if layout == "half":
        z = torch.complex(x[..., : r // 2], x[..., r // 2: r])
    else:
        z = torch.complex(x[..., 0:r:2], x[..., 1:r:2])
    z = z * torch.polar(torch.ones_like(w), pos[..., None].double() * w)[:, :, None, :] * m
    got = torch.complex(out[..., : r // 2], out[..., r // 2: r]) if layout == "half" else \
        torch.complex(out[..., 0:r:2], out[..., 1:r:2])
    assert torch.allclose(got, z, atol=1e-12)
    assert torch.equal(out[..., r:], x[..., r:])


def test_n_hat_positions_use_unscaled_frequencies_and_no_factor():
    rope = RopeScaling.longrope(64, 16, 256, SHORT, LONG, n_hat=4)
    x = torch.randn(1, 8, 1, 64, dtype=torch.float64)
    pos = torch.arange(8)[None]
    out = reference.rotate(x, pos, rope)
    plain = reference.rotate(x, pos, RopeScaling.default(64))
    assert torch.allclose(out[:, :4], plain[:, :4])
    scaled = reference.rotate(x, pos, RopeScaling.from_inv_freq(rope.frequencies()[0], rope.frequencies()[1]))
    assert torch.allclose(out[:, 4:], scaled[:, 4:])


def _relative_scores(q, k, rope, delta_eff):
    """<rot(q, P), rot(k, Q)> written as a function of the relative position only (complex form)."""
    w, m = rope.frequencies()
    h = rope.rotary_dim // 2
    qc = torch.complex(q[..., :h], q[..., h:2 * h])
    kc = torch.complex(k[..., :h], k[..., h:2 * h])
    phase = torch.polar(torch.ones_like(delta_eff)[..., None].expand(*delta_eff.shape, h).contiguous(),
                        delta_eff[..., None] * w)
    s = torch.einsum("bqhi,bkhi,bqki->bhqk", qc, kc.conj(), phase).real * m * m
    return s + torch.einsum("bqhd,bkhd->bhqk", q[..., 2 * h:], k[..., 2 * h:])


@pytest.mark.parametrize("leak", [None, 4.0, 0.25])
def test_rerope_matches_relative_position_formula(leak):
    torch.manual_seed(2)
    rope = RopeScaling.linear(32, 2.0, rotary_dim=24)
    q, k, v = (torch.randn(1, n, 2, 32, dtype=torch.float64) for n in (20, 20, 20))
    window = 6
    out, lse = reference.attention(q, k, v, rope, rerope_window=window, rerope_leak=leak, softmax_scale=0.3)
    delta = (torch.arange(20)[:, None] - torch.arange(20)[None, :]).double()
    eff = torch.where(delta < window, delta, window + (delta - window) / (math.inf if leak is None else leak))
    s = _relative_scores(q, k, rope, eff[None]) * 0.3
    s = s.masked_fill(delta < 0, float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
    assert torch.allclose(out, expected, atol=1e-10)
    assert torch.allclose(lse, torch.logsumexp(s, -1).float())


def test_reference_matches_sdpa_without_rope():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, n, 4, 16, dtype=torch.float64) for n in (5, 9, 9))
    out, _ = reference.attention(q, k, v, None, causal=True, window=3)
    delta = (torch.arange(4, 9)[:, None] - torch.arange(9)[None, :])
    mask = (delta >= 0) & (delta < 3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-12)


def test_logn_scaling_and_empty_rows():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, n, 1, 8, dtype=torch.float64) for n in (3, 3, 3))
    qpos = torch.tensor([[0, 50, 100]])
    kpos = torch.tensor([[60, 40, 99]])
    out, lse = reference.attention(q, k, v, None, q_positions=qpos, k_positions=kpos, logn_base=16.0,
                                   softmax_scale=1.0)
    assert torch.all(out[0, 0] == 0) and torch.isneginf(lse[0, 0, 0])
    g = max(1.0, math.log(101) / math.log(16))
    s = (q[0, 2, 0] @ k[0, :, 0].T) * g
    assert torch.allclose(lse[0, 0, 2].double(), torch.logsumexp(s, 0).float().double())


def test_longrope_rows_switch_independently():
    torch.manual_seed(5)
    rope = RopeScaling.longrope(64, 16, 256, SHORT, LONG)
    q, k, v = (torch.randn(2, n, 2, 64, dtype=torch.float64) for n in (4, 24, 24))
    kpos = torch.stack([torch.arange(24) % 16, torch.arange(24)])  # row 0 length 16 (short), row 1 24 (long)
    qpos = kpos[:, -4:]
    out, _ = reference.attention(q, k, v, rope, q_positions=qpos, k_positions=kpos)
    for row, length in ((0, 16), (1, 24)):
        w, m = rope.frequencies(length)
        fixed = RopeScaling.from_inv_freq(w, m)
        expected, _ = reference.attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], fixed,
                                          q_positions=qpos[row:row + 1], k_positions=kpos[row:row + 1])
        assert torch.allclose(out[row:row + 1], expected)


@pytest.mark.parametrize("layout,rotary_dim", [("half", 24), ("interleaved", 16)])
def test_xpos_matches_torchscale_scaled_operands(layout, rotary_dim):
    """xPos as torchscale applies it, written out here: rotated q pairs times zeta_i^(P / B), rotated k pairs times
    zeta_i^(-Q / B) (centre 0: fine in float64 at these lengths), zeta_i = (2i + 0.4 R) / (1.4 R), then plain
    causal attention; the reference weights each pair's term by zeta_i^((P - Q) / B) instead."""
    rope = RopeScaling.yarn(32, 4.0, 64, rotary_dim=rotary_dim, layout=layout)
    q, k, v = random_inputs(2, 50, 70, 4, 2, 32, torch.float64, seed=40)
    base = 40.0
    out, lse = reference.attention(q, k, v, rope, xpos_scale_base=base, window=45, logn_base=20.0)
    q_pos = torch.arange(20, 70).expand(2, 50)
    k_pos = torch.arange(70).expand(2, 70)
    qr = reference.rotate(q, q_pos, rope, seq_lens=[70, 70])
    kr = reference.rotate(k, k_pos, rope, seq_lens=[70, 70])
    zeta = torch.tensor([(2 * i + 0.4 * rotary_dim) / (1.4 * rotary_dim) for i in range(rotary_dim // 2)],
                        dtype=torch.float64)
    half = rotary_dim // 2
    pair = torch.arange(rotary_dim) % half if layout == "half" else torch.arange(rotary_dim) // 2
    q_scale = torch.ones(50, 32, dtype=torch.float64)
    k_scale = torch.ones(70, 32, dtype=torch.float64)
    q_scale[:, :rotary_dim] = zeta[pair][None, :] ** (q_pos[0, :, None].double() / base)
    k_scale[:, :rotary_dim] = zeta[pair][None, :] ** (-k_pos[0, :, None].double() / base)
    logn = torch.clamp(torch.log(q_pos[0].double() + 1) / math.log(20.0), min=1.0)
    s = torch.einsum("bqhd,bkhd->bhqk", qr * q_scale[None, :, None], (kr * k_scale[None, :, None])
                     .repeat_interleave(2, dim=2)) * 32 ** -0.5 * logn[None, None, :, None]
    delta = q_pos[0, :, None] - k_pos[0, None, :]
    s = s.masked_fill(~((delta >= 0) & (delta < 45)), float("-inf"))
    assert torch.allclose(out, torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.repeat_interleave(2, dim=2)),
                          atol=1e-12)
    assert torch.allclose(lse, torch.logsumexp(s, -1).float())


def test_xpos_depends_on_distance_only_and_stays_finite_at_128k():
    """Shifting every position by 130000 changes nothing (no centre enters), in float32 too: torchscale's
    uncentred zeta^(P / B) would overflow there (zeta_0^(-130000 / 512) ~ 1e138)."""
    rope = RopeScaling.default(32)
    q, k, v = random_inputs(1, 20, 30, 2, 2, 32, torch.float32, seed=41)
    near = dict(q_positions=torch.arange(10, 30)[None], k_positions=torch.arange(30)[None])
    far = {name: pos + 130000 for name, pos in near.items()}
    for dtype in (torch.float32, torch.float64):
        a = reference.attention(q, k, v, rope, xpos_scale_base=512.0, compute_dtype=dtype, **near)
        b = reference.attention(q, k, v, rope, xpos_scale_base=512.0, compute_dtype=dtype, **far)
        assert torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all()
        # the rotation itself is relative too; what differs is its float rounding at large angles
        assert torch.allclose(a[0], b[0], atol=2e-4) and torch.allclose(a[1], b[1], atol=2e-4)


@pytest.mark.parametrize("kind", list(schedules(64)))
def test_gradcheck_float64(kind):
    rope = schedules(16, rotary_dim=12)[kind] if kind != "longrope" else \
        RopeScaling.longrope(16, 16, 256, SHORT[:6], LONG[:6], n_hat=2, rotary_dim=12)
    if kind in ("factors",):
        rope = RopeScaling.from_factors(16, LONG[:6], attention_factor=1.1, rotary_dim=12)
    torch.manual_seed(6)
    q = torch.randn(1, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 1, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 5, 1, 16, dtype=torch.float64, requires_grad=True)
    extra = {} if rope.n_hat else dict(rerope_window=2, rerope_leak=3.0)
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_rope_attention(q, k, v, rope, logn_base=2.0, backend="reference", **extra),
        (q, k, v))


# ---- the public API's argument checks ----------------------------------------------------------------------
def _qkv(dtype=torch.float32):
    return torch.randn(1, 4, 2, 16, dtype=dtype), torch.randn(1, 6, 1, 16, dtype=dtype), \
        torch.randn(1, 6, 1, 16, dtype=dtype)


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=0), "window"),
    (dict(rerope_window=-3), "rerope_window"),
    (dict(rerope_leak=4.0), "rerope_leak"),
    (dict(rerope_window=4, rerope_leak=0.0), "rerope_leak"),
    (dict(rerope_window=4, rerope_leak=-2.0), "rerope_leak"),
    (dict(logn_base=1.0), "logn_base"),
    (dict(softmax_scale=float("nan")), "softmax_scale"),
    (dict(backend="tpu"), "backend"),
    (dict(q_positions=torch.zeros(1, 3, dtype=torch.int64)), "q_positions"),
    (dict(k_positions=torch.zeros(1, 6)), "k_positions"),
    (dict(backend="cuda"), "cuda"),
    (dict(xpos_scale_base=8.0), "xpos_scale_base"),
    (dict(xpos_scale_base=True), "xpos_scale_base"),
    (dict(xpos_scale_base=512.0, causal=False), "causal"),
    (dict(xpos_scale_base=512.0, rerope_window=3), "rerope_window"),
])
def test_bad_arguments_are_named(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        scaled_rope_attention(q, k, v, RopeScaling.default(16), **kwargs)


def test_bad_tensors_are_named():
    q, k, v = _qkv()
    rope = RopeScaling.default(16)
    with pytest.raises(ValueError, match="multiple"):
        scaled_rope_attention(torch.randn(1, 4, 3, 16), torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16), rope)
    with pytest.raises(ValueError, match="rope.head_dim"):
        scaled_rope_attention(q, k, v, RopeScaling.default(32))
    with pytest.raises(ValueError, match="dtype"):
        scaled_rope_attention(q, k.double(), v, rope)
    with pytest.raises(ValueError, match="contiguous"):
        scaled_rope_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, rope)
    with pytest.raises(TypeError, match="rope"):
        scaled_rope_attention(q, k, v, "llama3")
    with pytest.raises(ValueError, match="n_hat"):
        scaled_rope_attention(q, k, v, RopeScaling.from_factors(16, [1.0] * 8, n_hat=2), rerope_window=2)
    with pytest.raises(ValueError, match="rerope_window needs a rope"):
        scaled_rope_attention(q, k, v, None, rerope_window=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rule_catches_one_wrong_row(dtype):
    """The RMS rule has teeth: one query row computed as if at the wrong position fails it."""
    rope = RopeScaling.default(32)
    q, k, v = random_inputs(1, 64, 64, 2, 2, 32, dtype, seed=3)
    gold, _ = reference.attention(q.to(GOLD_DTYPE[dtype]), k.to(GOLD_DTYPE[dtype]), v.to(GOLD_DTYPE[dtype]), rope)
    baseline, _ = reference.attention(q, k, v, rope, compute_dtype=dtype)
    assert_close_to_gold("out", baseline, gold, baseline, dtype)
    shifted = torch.arange(64)[None].clone()
    shifted[0, 40] = 39  # row 40 rotated one position off
    wrong, _ = reference.attention(q, k, v, rope, compute_dtype=dtype, q_positions=shifted,
                                   k_positions=torch.arange(64)[None])
    assert (wrong[0, 40] != baseline[0, 40]).any()
    with pytest.raises(AssertionError, match="out: err"):
        assert_close_to_gold("out", wrong, gold, baseline, dtype)
