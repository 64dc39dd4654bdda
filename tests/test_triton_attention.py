"""Triton attention (forward + backward) against the reference with the docs/DESIGN.md §6 rule.

Interpreter tier: fp32/fp16 at small shapes; without a GPU it runs on the CPU under TRITON_INTERPRET=1 (one
rectangular tile config, 16x32 / 32x16, so short sequences already span many tiles), with a GPU the same tests run
on it. fp32 where each output sums enough terms for the 2x-baseline rule to measure the kernel rather than the luck
of one rounding; masking and lengths in fp16. GPU tier (marked `gpu`): bf16/fp16, long sequences, every feature,
every autotune config.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import LONG, SHORT, assert_close_to_gold, compare_attention, random_inputs, schedules  # noqa: E402
from scaled_rope import BackendUnsupported, RopeScaling, reference, scaled_rope_attention  # noqa: E402
from scaled_rope import _backends, _plan  # noqa: E402
from scaled_rope.triton_kernels import attention as tattn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
def check(batch, nq, nk, hq, hkv, dim, dtype, rope, seed=0, device=DEVICE, **kwargs):
    q, k, v = random_inputs(batch, nq, nk, hq, hkv, dim, dtype, device=device, seed=seed)
    compare_attention(q, k, v, rope, backend="triton", seed=seed, **kwargs)


def tile_kinds(nq, nk, w, block_m, block_n, causal=True, window=None):
    """ReRoPE kinds (near / far / both) of the live (query tile, key tile) pairs at default positions."""
    kinds = set()
    for m0 in range(0, nq, block_m):
        p = torch.arange(m0, min(m0 + block_m, nq)) + nk - nq
        for n0 in range(0, nk, block_n):
            delta = p[:, None] - torch.arange(n0, min(n0 + block_n, nk))[None, :]
            live = torch.ones_like(delta, dtype=torch.bool)
            if causal:
                live &= delta >= 0
            if window is not None:
                live &= delta < window
            if live.any():
                kinds.add("near" if delta.max() < w else "far" if delta.min() >= w else "both")
    return kinds


@pytest.fixture(autouse=True)
def one_config(monkeypatch):
    """On a GPU every test uses the first config that fits (compiling every autotune config for each feature
    would take many minutes); test_gpu_every_config runs each config. The interpreter has one config anyway."""
    monkeypatch.setenv("SCALED_ROPE_AUTOTUNE", "0")


# ---- interpreter tier (CPU without a GPU; the same tests on a GPU when there is one) ----------------------------
@pytest.mark.parametrize("name", list(schedules(32)))
def test_every_scaling_type(name):
    check(1, 40, 40, 2, 1, 32, torch.float32, schedules(32)[name], seed=1)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [48, 32])
def test_layouts_partial_rotary_odd_head_dim(layout, rotary_dim):
    rope = schedules(48, rotary_dim=rotary_dim, layout=layout)["factors"]
    check(1, 33, 33, 2, 2, 48, torch.float32, rope, seed=2)


@pytest.mark.parametrize("nq,nk,causal", [(1, 97, True), (17, 17, False), (17, 97, True), (97, 97, True),
                                          (97, 97, False), (40, 17, True), (257, 257, True)])
def test_awkward_lengths(nq, nk, causal):
    check(1, nq, nk, 2, 1, 16, torch.float16, RopeScaling.yarn(16, 4.0, 32), seed=nq + nk, causal=causal)


@pytest.mark.parametrize("nq,nk,window", [(1, 1, None), (30, 30, 1)])
def test_single_key_rows(nq, nk, window):
    """Every row sees one key: p = 1, so the exact dq and dk are 0 and the reference returns exact zeros, which
    the relative rule cannot compare against; FlashAttention's Delta = rowsum(dO * O) cancels dp to rounding
    instead. Forward and dv by the rule, dq and dk against a roundoff bound."""
    rope = RopeScaling.yarn(16, 4.0, 32)
    check(1, nq, nk, 1, 1, 16, torch.float32, rope, seed=19, window=window, grads=False)
    q, k, v = (x.requires_grad_(True) for x in random_inputs(1, nq, nk, 1, 1, 16, torch.float32, device=DEVICE))
    out = scaled_rope_attention(q, k, v, rope, window=window, backend="triton")
    out.backward(torch.ones_like(out))
    assert torch.allclose(v.grad, torch.ones_like(v.grad))
    for grad in (q.grad, k.grad):
        assert grad.abs().max() < 1e-5


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
def test_gqa_fp16(hq, hkv):
    check(2, 45, 45, hq, hkv, 32, torch.float16, schedules(32)["llama3"], seed=3)


@pytest.mark.parametrize("dim", [64, 80, 128])
def test_head_dims(dim):
    check(1, 35, 35, 1, 1, dim, torch.float32, RopeScaling.linear(dim, 2.0), seed=dim)


@pytest.mark.parametrize("causal,window", [(True, 2), (True, 20), (False, 20), (True, 100)])
def test_sliding_window(causal, window):
    check(1, 70, 70, 2, 1, 32, torch.float32, schedules(32)["ntk"], seed=4, causal=causal, window=window)


@pytest.mark.parametrize("leak", [None, 4.0, 0.25])  # 0.25: inverse Leaky ReRoPE (far side stretched)
@pytest.mark.parametrize("w,window", [(20, None), (45, 70), (5, None)])
def test_rerope_near_far_straddling(leak, w, window):
    cfg = tattn._FWD_CONFIGS[0].kwargs
    if tattn._INTERPRET:  # these windows make every tile kind occur with the interpreter's tiles
        assert tile_kinds(97, 97, w, cfg["BLOCK_M"], cfg["BLOCK_N"], window=window) == {"near", "far", "both"}
    check(1, 97, 97, 2, 1, 32, torch.float32, RopeScaling.default(32), seed=5, rerope_window=w, rerope_leak=leak,
          window=window)


@pytest.mark.parametrize("leak", [None, 3.0])
def test_rerope_interleaved_partial_rotary_attention_factor(leak):
    """Near and far copies written in one rotation pass (pass-through dims in both); plain ReRoPE reads k itself
    as the far k with m^2 on the far q (YaRN: m != 1)."""
    rope = RopeScaling.yarn(48, 4.0, 16, rotary_dim=32, layout="interleaved")
    check(2, 65, 65, 2, 1, 48, torch.float32, rope, seed=9, rerope_window=20, rerope_leak=leak)


def test_rerope_fp16_gqa_noncausal_logn():
    check(1, 64, 80, 4, 2, 32, torch.float16, schedules(32)["yarn"], seed=6, causal=False, rerope_window=24,
          rerope_leak=8.0, logn_base=16.0)


def test_rerope_window_beyond_every_delta_is_plain():
    check(1, 40, 40, 1, 1, 32, torch.float32, RopeScaling.default(32), seed=7, rerope_window=64)


def test_logn_scaling():
    check(1, 90, 90, 2, 2, 32, torch.float32, schedules(32)["yarn"], seed=8, logn_base=8.0)


def test_longrope_rows_switch_sets_in_one_batch():
    """Row 0 is short (length 30 <= 64: short factors), row 1 long (length 140 > 64: long factors)."""
    rope = RopeScaling.longrope(32, 64, 1024, SHORT[:16], LONG[:16], n_hat=4)
    nk = 30
    k_positions = torch.stack([torch.arange(nk), torch.arange(nk) + 110]).to(DEVICE)
    q_positions = k_positions[:, -12:]
    check(2, 12, nk, 2, 1, 32, torch.float32, rope, seed=9, q_positions=q_positions, k_positions=k_positions)


@pytest.mark.parametrize("rerope", [False, True])
def test_explicit_unsorted_positions(rerope):
    gen = torch.Generator().manual_seed(10)
    nq, nk = 37, 75
    k_positions = torch.stack([torch.randperm(nk, generator=gen) * 2 for _ in range(2)]).to(DEVICE)
    q_positions = torch.randint(0, 2 * nk, (2, nq), generator=gen).to(DEVICE, torch.int32)
    kwargs = dict(rerope_window=30, rerope_leak=None if rerope else None, window=90) if rerope else {}
    check(2, nq, nk, 2, 1, 32, torch.float32, schedules(32)["longrope"] if not rerope else RopeScaling.default(32),
          seed=11, q_positions=q_positions, k_positions=k_positions, **kwargs)


@pytest.mark.parametrize("name", ["longrope", "dynamic_ntk"])
def test_negative_positions_with_length_dependent_schedules(name):
    """Row 0 has every key at a negative position (length <= 0: LongRoPE's short set, dynamic NTK at its L0 base,
    docs/DESIGN.md §3.7); row 1 mixes negative and positive positions and is longer than L0 = 16. Both backends
    agree (LongRoPE's n_hat = 4 also takes the negative positions as early ones)."""
    nk = 24
    k_positions = torch.stack([torch.arange(nk) - 40, torch.arange(nk) * 2 - 10]).to(DEVICE)
    check(2, 8, nk, 2, 1, 32, torch.float32, schedules(32)[name], seed=33, q_positions=k_positions[:, -8:],
          k_positions=k_positions)


def test_explicit_positions_fp16_window_noncausal():
    gen = torch.Generator().manual_seed(12)
    k_positions = torch.randint(0, 200, (1, 64), generator=gen).to(DEVICE)
    q_positions = torch.randint(0, 200, (1, 30), generator=gen).to(DEVICE)
    check(1, 30, 64, 2, 2, 32, torch.float16, schedules(32)["factors"], seed=12, causal=False, window=40,
          q_positions=q_positions, k_positions=k_positions)


def test_empty_rows_give_zero_and_minus_inf():
    """Nq > Nk under causal: the first queries sit at negative positions and see nothing; a window of 1 with
    explicit positions empties rows too."""
    check(1, 50, 20, 2, 1, 32, torch.float32, RopeScaling.default(32), seed=13)
    q, k, v = random_inputs(1, 50, 20, 2, 1, 32, torch.float32, device=DEVICE, seed=13)
    q.requires_grad_(True)
    out, lse = scaled_rope_attention(q, k, v, RopeScaling.default(32), return_lse=True, backend="triton")
    out.sum().backward()
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert torch.isneginf(lse[..., :30]).all() and torch.isfinite(lse[..., 30:]).all()
    assert torch.equal(q.grad[:, :30], torch.zeros_like(q.grad[:, :30]))
    positions = torch.arange(20, device=DEVICE)[None] * 3
    check(1, 20, 20, 1, 1, 32, torch.float32, RopeScaling.default(32), seed=14, window=1,
          q_positions=positions + 1, k_positions=positions)


def test_lse_gradient_and_strided_inputs():
    """q, k, v as views of one packed (B, N, 3, H, D) tensor; a loss through both out and lse."""
    dtype, rope = torch.float32, schedules(32)["yarn"]
    gen = torch.Generator().manual_seed(15)
    qkv = torch.randn(2, 41, 3, 2, 32, generator=gen).to(DEVICE, dtype)
    w_out = torch.randn(2, 41, 2, 32, generator=gen).to(DEVICE)
    w_lse = torch.randn(2, 2, 41, generator=gen).to(DEVICE)

    def run(fn, cast):
        x = qkv.to(cast).detach().requires_grad_(True)
        out, lse = fn(x[:, :, 0], x[:, :, 1], x[:, :, 2])
        ((out * w_out.to(out.dtype)).sum() + (lse * w_lse).sum()).backward()
        return out.detach(), lse.detach(), x.grad

    ref = lambda cast: lambda q, k, v: reference.attention(q, k, v, rope, compute_dtype=cast)  # noqa: E731
    gold = run(ref(torch.float64), torch.float64)
    base = run(ref(dtype), dtype)
    got = run(lambda q, k, v: scaled_rope_attention(q, k, v, rope, return_lse=True, backend="triton"), dtype)
    for name, a, g, b in zip(["out", "lse", "dqkv"], got, gold, base):
        assert_close_to_gold(name, a, g, b, dtype)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.7])
def test_softmax_scale_any_sign(scale):
    check(1, 33, 33, 2, 1, 32, torch.float32, RopeScaling.default(32), seed=16, softmax_scale=scale)


def test_scale_sign_folding():
    """Both backends move softmax_scale's sign into q and give the kernels a normal float32 scale > 0."""
    from scaled_rope._scale import fold_scale_sign

    assert fold_scale_sign(0.3) == (1.0, 0.3)
    assert fold_scale_sign(-0.3) == (-1.0, 0.3)
    assert fold_scale_sign(0.0) == (0.0, 1.0)
    assert fold_scale_sign(-1e-40) == (0.0, 1.0)  # a float32 subnormal, flushed to 0 by the kernels
    sign, scale = fold_scale_sign(float("nan"))
    assert scale != scale  # NaN is left to the kernels' own checks


@pytest.mark.parametrize("section_heads", ["1", "3"])
@pytest.mark.parametrize("rerope", [None, 24])
def test_l2_sections_cover_every_tile(section_heads, rerope, monkeypatch):
    """Programs take heads in L2 sections, tile-major inside one: sections of 3 heads over 2 x 4 q heads (GQA 2)
    end in a partial section and cross batch rows; every tile of out and of every gradient is checked (a tile
    left out stays NaN-poisoned)."""
    monkeypatch.setenv("SCALED_ROPE_L2_SECTION_HEADS", section_heads)
    rope = RopeScaling.default(32) if rerope else RopeScaling.yarn(32, 4.0, 64)
    check(2, 70, 90, 4, 2, 32, torch.float32, rope, seed=31, rerope_window=rerope)


@pytest.mark.parametrize("variant", ["longrope", "rerope explicit", "leaky window"])
def test_cuda_backends_backward_from_natural_lse(variant):
    """The CUDA backend's backward (the Triton kernels fed another forward's out and natural-log lse, and the lse
    gradient) gives the gradients of the Triton autograd path, for a loss through out and lse. It runs here on the
    CPU: it needs the Triton kernels only."""
    torch.manual_seed(5)
    dim, n = 32, 80
    rope = RopeScaling.longrope(dim, 48, 512, SHORT[:dim // 2], LONG[:dim // 2], n_hat=2)
    extra = dict(rerope_window=None, rerope_leak=None, window=None, q_positions=None, k_positions=None)
    if variant != "longrope":
        rope = RopeScaling.default(dim)
        extra.update(rerope_window=20)
    if variant == "leaky window":
        extra.update(rerope_leak=8.0, window=50)
    if variant == "rerope explicit":
        pos = torch.randperm(2 * n)[:n].sort().values[None].expand(2, n).to(DEVICE)
        extra.update(q_positions=pos, k_positions=pos)
    q, k, v = random_inputs(2, n, n, 4, 2, dim, torch.float32, device=DEVICE, seed=6)
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    out, lse = scaled_rope_attention(qg, kg, vg, rope, return_lse=True, backend="triton", **extra)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    plan = _plan.attention_plan(q, k, v, rope, causal=True, softmax_scale=None, logn_base=None, backend="triton",
                                **extra)
    grads = _backends.get("cuda").attention_backward(plan.call, out.detach(), lse.detach(), None, dout, dlse)
    for name, mine, want in zip(("dq", "dk", "dv"), grads, (qg.grad, kg.grad, vg.grad)):
        assert torch.allclose(mine, want, rtol=1e-4, atol=1e-5), (name, (mine - want).abs().max().item())
    if variant == "longrope":  # the test has teeth: the lse gradient changes dq
        without_dlse = _backends.get("cuda").attention_backward(plan.call, out.detach(), lse.detach(), None, dout,
                                                                None)
        assert (without_dlse[0] - grads[0]).abs().max() > 1e-3


# xPos (docs/DESIGN.md §3.9): the kernels scale the operands within 128-row periods (query row m by
# 2^(rate (m mod 128)), key n by 2^(-rate (n mod 128))) and each tile pair by one weight per pair from the distance
# of the periods; the reference weights each pair's term by zeta^(distance / base).
@pytest.mark.parametrize("name", ["default", "yarn", "longrope", "dynamic_ntk"])
def test_xpos_every_tile_kind(name):
    check(1, 45, 70, 2, 1, 32, torch.float32, schedules(32)[name], seed=30, xpos_scale_base=32.0)


@pytest.mark.parametrize("layout,rotary_dim", [("half", 48), ("interleaved", 32)])
def test_xpos_layouts_partial_rotary_gqa_fp16(layout, rotary_dim):
    rope = schedules(48, rotary_dim=rotary_dim, layout=layout)["yarn"]
    check(2, 33, 50, 4, 2, 48, torch.float16, rope, seed=31, xpos_scale_base=64.0)


def test_xpos_across_periods():
    """Several 128-row periods on both sides, an offset Nk - Nq that is not a multiple of 128, decay down to 2^-60
    over the far pairs (scale base 32) and a window: forward and gradients."""
    check(1, 230, 333, 2, 1, 32, torch.float32, schedules(32)["longrope"], seed=34, xpos_scale_base=32.0)
    check(1, 300, 300, 2, 2, 32, torch.float32, schedules(32)["default"], seed=35, xpos_scale_base=64.0, window=150)


def test_xpos_window_logn_scale_sign_and_empty_rows():
    check(1, 60, 40, 2, 2, 32, torch.float32, schedules(32)["llama3"], seed=32, xpos_scale_base=40.0, window=17,
          logn_base=16.0, softmax_scale=-0.2)


def test_xpos_is_not_plain_rope():
    """The decay is there: a test against the reference without it fails."""
    q, k, v = random_inputs(1, 40, 40, 2, 2, 32, torch.float32, device=DEVICE, seed=33)
    rope = RopeScaling.default(32)
    out = scaled_rope_attention(q, k, v, rope, xpos_scale_base=32.0, backend="triton")
    plain = reference.attention(q, k, v, rope)[0]
    assert (out - plain).abs().max() > 0.05
    assert (out - reference.attention(q, k, v, rope, xpos_scale_base=32.0)[0]).abs().max() < 1e-5


def test_xpos_routes_and_refusals():
    """Triton runs xPos with default positions; with explicit positions "auto" runs the reference (no kernel
    has them) and backend="triton" says why."""
    q, k, v = random_inputs(1, 8, 8, 1, 1, 16, torch.float32, device=DEVICE, seed=34)
    rope = RopeScaling.default(16)
    pos = torch.arange(8, device=DEVICE)[None]
    explicit = _plan.attention_plan(q, k, v, rope, causal=True, q_positions=pos, k_positions=pos, window=None,
                                    softmax_scale=None, rerope_window=None, rerope_leak=None, logn_base=None,
                                    backend="auto", xpos_scale_base=64.0)
    assert explicit.backend == "reference" and "xPos" in explicit.passed_over["triton"]
    with pytest.raises(BackendUnsupported, match="xPos"):
        scaled_rope_attention(q, k, v, rope, q_positions=pos, k_positions=pos, xpos_scale_base=64.0,
                              backend="triton")
    default = _plan.attention_plan(q, k, v, rope, causal=True, q_positions=None, k_positions=None, window=None,
                                   softmax_scale=None, rerope_window=None, rerope_leak=None, logn_base=None,
                                   backend="triton", xpos_scale_base=64.0)
    assert default.backend == "triton"
    for kwargs, match in [(dict(xpos_scale_base=16.0), ">= 32"), (dict(xpos_scale_base=float("nan")), ">= 32"),
                          (dict(xpos_scale_base=64.0, causal=False), "causal"),
                          (dict(xpos_scale_base=64.0, rerope_window=4), "rerope_window")]:
        with pytest.raises(ValueError, match=match):
            scaled_rope_attention(q, k, v, rope, backend="triton", **kwargs)
    with pytest.raises(ValueError, match="needs a rope"):
        scaled_rope_attention(q, k, v, None, xpos_scale_base=64.0, backend="triton")


def test_no_rotation():
    check(1, 33, 50, 2, 1, 32, torch.float32, None, seed=17, window=25)


def test_nothing_rotated_is_saved_for_backward():
    """The autograd node keeps q, k, v themselves, out, lse, the forward's lse in the backward's form and the
    small rotation tables: no rotated copy of q or k."""
    q, k, v = random_inputs(1, 20, 20, 2, 1, 32, torch.float32, device=DEVICE, seed=18)
    q.requires_grad_(True)
    out = scaled_rope_attention(q, k, v, RopeScaling.default(32), rerope_window=5, backend="triton")
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert saved[0] is q and saved[1] is k and saved[2] is v
    shapes = sorted(tuple(t.shape) for t in saved[3:] if t.numel() > 16)  # tables hold (1, 16) entries
    assert shapes == [(1, 2, 20), (1, 2, 20, 2), tuple(q.shape)]


def test_bad_arguments_are_named():
    q, k, v = random_inputs(1, 4, 4, 1, 1, 16, torch.float32, device=DEVICE)
    rope = RopeScaling.default(16)
    with pytest.raises(BackendUnsupported, match="head_dim"):
        big = torch.zeros(1, 4, 1, 264, device=DEVICE)
        scaled_rope_attention(big, big, big, None, backend="triton")
    with pytest.raises(ValueError, match="q heads"):
        scaled_rope_attention(q.expand(1, 4, 3, 16), k.expand(1, 4, 2, 16), v.expand(1, 4, 2, 16), rope,
                              backend="triton")
    with pytest.raises(ValueError, match="q_positions"):
        scaled_rope_attention(q, k, v, rope, q_positions=torch.zeros(1, 5, dtype=torch.int64, device=DEVICE),
                              backend="triton")
    with pytest.raises(BackendUnsupported, match="float16, bfloat16 or float32"):
        scaled_rope_attention(q.double(), k.double(), v.double(), rope, backend="triton")


# ---- GPU tier -------------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


LONGROPE_128 = RopeScaling.longrope(128, 4096, 131072, SHORT, LONG, n_hat=4)

GPU_FEATURES = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "window": dict(window=300),
    "rerope": dict(rerope_window=512, rope=RopeScaling.default(128)),
    "leaky": dict(rerope_window=200, rerope_leak=16.0, rope=RopeScaling.default(128), window=1500),
    "logn": dict(logn_base=512.0),
    "xpos": dict(xpos_scale_base=512.0, window=1700),
}


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feature", list(GPU_FEATURES))
def test_gpu_features(dtype, feature):
    kwargs = dict(GPU_FEATURES[feature])
    rope = kwargs.pop("rope", LONGROPE_128)
    check(2, 1500, 2100, 8, 2, 128, dtype, rope, seed=20, device="cuda", **kwargs)


@gpu
@pytest.mark.parametrize("dim", [64, 96, 256])
def test_gpu_head_dims(dim):
    rope = RopeScaling.yarn(dim, 8.0, 1024, rotary_dim=dim // 2 * 2 - (32 if dim == 96 else 0), layout="interleaved")
    check(1, 1000, 1000, 4, 4, dim, torch.bfloat16, rope, seed=21, device="cuda")


@gpu
def test_gpu_longrope_row_switch_explicit_positions():
    nk = 3000
    k_positions = torch.stack([torch.arange(nk), torch.arange(nk) + 3000]).cuda()
    q_positions = k_positions[:, -1000:]
    check(2, 1000, nk, 4, 1, 128, torch.bfloat16, LONGROPE_128, seed=22, device="cuda", q_positions=q_positions,
          k_positions=k_positions)
    # ReRoPE excludes n_hat (docs/DESIGN.md §3.5): the same switch with n_hat = 0 and a ReRoPE window
    rope = RopeScaling.longrope(128, 4096, 131072, SHORT, LONG)
    check(2, 1000, nk, 4, 1, 128, torch.bfloat16, rope, seed=23, device="cuda", q_positions=q_positions,
          k_positions=k_positions, rerope_window=700)


@gpu
@pytest.mark.parametrize("rerope", [None, 512])
def test_gpu_16k(rerope):
    rope = RopeScaling.default(128) if rerope else LONGROPE_128
    check(1, 16384, 16384, 1, 1, 128, torch.bfloat16, rope, seed=23, device="cuda", rerope_window=rerope)


@gpu
@pytest.mark.parametrize("feature", ["causal", "rerope"])
def test_gpu_every_config(feature):
    """Each autotune config alone (a one-config autotuner does not benchmark), at lengths that are not tile
    multiples."""
    kernels = (tattn._attn_fwd, tattn._attn_bwd_dkdv, tattn._attn_bwd_dq)
    saved = [kernel.configs for kernel in kernels]
    kwargs = dict(GPU_FEATURES[feature])
    rope = kwargs.pop("rope", LONGROPE_128)
    fitting = [tattn._prune(configs, {}, kind=kind, BLOCK_D=128, HEAD_DIM=128, REROPE="rerope_window" in kwargs)
               for configs, kind in zip(saved, ("fwd", "dkdv", "dq"))]
    try:
        for i in range(max(len(c) for c in fitting)):
            for kernel, configs in zip(kernels, fitting):
                kernel.configs = [configs[i % len(configs)]]
            check(1, 1100, 1300, 4, 2, 128, torch.bfloat16, rope, seed=24 + i, device="cuda", **kwargs)
    finally:
        for kernel, configs in zip(kernels, saved):
            kernel.configs = configs
