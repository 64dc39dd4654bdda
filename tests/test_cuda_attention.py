"""CUDA attention (csrc/flash_fwd.cu forward, Triton backward) against the reference, docs/DESIGN.md §6 rule.

GPU tier only. The kernels work on tiles of 128 queries x 64 keys (sm_80) or 128 x 128 (sm_90a on compute capability
9.x: head_dim 64, 96 (in 128-column tiles, the last 32 columns zero-filled by TMA) and 128), so the lengths below put
partial tiles, diagonal tiles and (for ReRoPE windows of 64-200) near, far and straddling tiles in every test.
test_kernel_paths_head_dim_128 runs every kernel path on one device; head_dim 96 has the sm_90a kernel only.
"""
import pytest
import torch

from helpers import assert_close_to_gold, compare_attention, random_inputs
from scaled_rope import BackendUnsupported, RopeScaling, explain_backend, reference, scaled_rope_attention
from scaled_rope import _cuda

pytestmark = pytest.mark.gpu

SHORT = [1.0 + 0.05 * i for i in range(64)]
# Switches read by the extension on every call (no-ops where the sm_90a kernel does not apply).
KERNEL_PATHS = {"default": {}, "sm80": {"SCALED_ROPE_FLASH_SM80": "1"},
                # tile order: L2 sections of 3 heads (a partial last section, sections across batch rows), head by head
                "sections-3": {"SCALED_ROPE_L2_SECTION_HEADS": "3"}, "sections-1": {"SCALED_ROPE_L2_SECTION_HEADS": "1"},
                # q rotated by a pass of its own instead of on-chip in the sm_90a kernel
                "rotation-passes": {"SCALED_ROPE_ROTATION_PASSES": "1"}}
LONG = [1.5 + 0.3 * i for i in range(64)]
DTYPES = [torch.bfloat16, torch.float16]


def longrope(dim, original=4096, n_hat=4):
    return RopeScaling.longrope(dim, original, 131072, SHORT[:dim // 2], LONG[:dim // 2], n_hat=n_hat)


def check(batch, nq, nk, hq, hkv, dim, dtype, rope, seed=0, grads=False, **kwargs):
    q, k, v = random_inputs(batch, nq, nk, hq, hkv, dim, dtype, device="cuda", seed=seed)
    compare_attention(q, k, v, rope, backend="cuda", grads=grads, seed=seed, **kwargs)


def needs_sm90(dim):
    """head_dim 96 runs on the sm_90a kernel only: skip it where that does not run (the test of that refusal is
    test_head_dim_96_needs_the_sm90a_kernel)."""
    if dim in _cuda.SM90_ONLY_HEAD_DIMS and not _cuda.sm90_kernel_applies(torch.device("cuda"), torch.bfloat16, dim):
        pytest.skip(f"head_dim {dim} runs on the sm_90a kernel only")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 96, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 17), (17, 17), (97, 97), (97, 257), (257, 97), (1025, 1025)])
def test_lengths(dtype, dim, causal, nq, nk):
    needs_sm90(dim)
    check(2, nq, nk, 3, 3, dim, dtype, longrope(dim), seed=nq * 7 + nk, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [96, 128])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 1)])
def test_gqa(dtype, dim, hq, hkv):
    needs_sm90(dim)
    check(2, 200, 333, hq, hkv, dim, dtype, longrope(dim), seed=hq + hkv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 100, 257])
def test_window(dtype, causal, window):
    check(1, 300, 700, 4, 2, 64, dtype, RopeScaling.yarn(64, 8.0, 256), seed=window, causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 96, 128])
@pytest.mark.parametrize("leak", [None, 16.0, 1 / 16])
@pytest.mark.parametrize("causal", [True, False])
def test_rerope(dtype, dim, leak, causal):
    needs_sm90(dim)
    check(2, 450, 600, 4, 2, dim, dtype, RopeScaling.default(dim), seed=31, causal=causal, rerope_window=100,
          rerope_leak=leak)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rerope_with_window_and_logn(dtype):
    check(1, 700, 900, 2, 1, 128, dtype, RopeScaling.default(128), seed=32, rerope_window=150, rerope_leak=8.0,
          window=500, logn_base=256.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 96, 128])
def test_logn(dtype, dim):
    needs_sm90(dim)
    check(1, 300, 1100, 4, 4, dim, dtype, longrope(dim, original=512), seed=33, logn_base=512.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_explicit_unsorted_positions_with_empty_rows(dtype, causal):
    """Shuffled positions spread keys of every tile over the whole range; causal rows below every key are empty."""
    nq, nk = 150, 333
    g = torch.Generator().manual_seed(5)
    k_positions = torch.stack([torch.randperm(nk, generator=g) + 40, torch.randperm(nk, generator=g) * 3])
    q_positions = torch.stack([torch.randint(0, 400, (nq,), generator=g), torch.randint(0, 1000, (nq,), generator=g)])
    q_positions[0, :10] = torch.arange(10)  # below every key of row 0: empty when causal
    check(2, nq, nk, 4, 2, 128, dtype, longrope(128, original=256), seed=34, causal=causal,
          q_positions=q_positions.cuda(), k_positions=k_positions.cuda(), window=200 if causal else None,
          rerope_window=None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_positions_rerope_straddling(dtype):
    nq, nk = 200, 500
    g = torch.Generator().manual_seed(6)
    k_positions = torch.randperm(nk, generator=g)[None, :] * 2
    q_positions = torch.randint(0, 2 * nk, (1, nq), generator=g)
    check(1, nq, nk, 2, 2, 64, dtype, RopeScaling.default(64), seed=35, q_positions=q_positions.cuda(),
          k_positions=k_positions.cuda(), rerope_window=120, rerope_leak=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_default_positions(dtype):
    """Nq > Nk, causal: queries at negative positions see no key (out 0, lse -inf)."""
    check(1, 300, 70, 2, 1, 64, dtype, longrope(64), seed=36)


def test_longrope_per_row_switch():
    """Row 0 stays within the original length (short factors), row 1 crosses it (long factors)."""
    nk = 1500
    k_positions = torch.stack([torch.arange(nk), torch.arange(nk) + 3000]).cuda()
    q_positions = k_positions[:, -400:]
    check(2, 400, nk, 4, 1, 128, torch.bfloat16, longrope(128, original=2048), seed=37, q_positions=q_positions,
          k_positions=k_positions)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_partial_rotary_layouts_and_scale(layout):
    rope = RopeScaling.yarn(128, 8.0, 256, rotary_dim=64, layout=layout)
    check(1, 129, 257, 2, 2, 128, torch.float16, rope, seed=38, softmax_scale=-0.07)


def test_no_rope():
    check(2, 100, 150, 2, 1, 64, torch.bfloat16, None, seed=39)


@pytest.mark.parametrize("passes", ["0", "1"])
@pytest.mark.parametrize("dim,rotary_dim,layout", [(128, 128, "half"), (96, 96, "half"), (64, 64, "half"),
                                                   (128, 96, "half"), (128, 32, "half"), (128, 64, "interleaved"),
                                                   (96, 24, "interleaved"), (64, 20, "interleaved")])
def test_q_rotated_on_chip_or_by_a_pass(passes, dim, rotary_dim, layout, monkeypatch):
    """The sm_90a kernel rotates q on-chip (and signs it: softmax_scale < 0 here, also on pass-through columns) where
    its layout allows, k going through one rotation pass; with other tables or SCALED_ROPE_ROTATION_PASSES=1 both go
    through passes. The number of passes tells which path ran; both match the reference, with explicit positions
    and the LongRoPE per-row switch too."""
    needs_sm90(dim)
    monkeypatch.setenv("SCALED_ROPE_ROTATION_PASSES", passes)
    passes_run = []
    rotate = _cuda.cuda_rotate
    monkeypatch.setattr(_cuda, "cuda_rotate", lambda *args, **kw: passes_run.append(1) or rotate(*args, **kw))
    on_chip_layout = rotary_dim % 8 == 0 if layout == "interleaved" else rotary_dim in (64, 96, 128)
    on_chip = passes == "0" and on_chip_layout and _cuda.sm90_kernel_applies(torch.device("cuda"), torch.bfloat16,
                                                                               dim)
    rope = RopeScaling.yarn(dim, 8.0, 256, rotary_dim=rotary_dim, layout=layout)
    check(2, 200, 333, 4, 2, dim, torch.bfloat16, rope, seed=60 + rotary_dim, softmax_scale=-0.09)
    assert len(passes_run) == (1 if on_chip else 2)
    nk = 700
    k_positions = torch.stack([torch.arange(nk), torch.arange(nk) + 1500]).cuda()
    check(2, 300, nk, 2, 1, dim, torch.float16, longrope(dim, original=1024), seed=61, q_positions=k_positions[:, -300:],
          k_positions=k_positions)


def test_strided_and_misaligned_inputs():
    """q/k as views of a packed qkv tensor, v starting one element off a 16-byte boundary (called directly:
    compare_attention clones its inputs, which would make them contiguous)."""
    g = torch.Generator().manual_seed(40)
    qkv = torch.randn(2, 130, 3 * 4, 64, generator=g).to("cuda", torch.bfloat16)
    q, k = qkv[:, :, 0:4], qkv[:, :, 4:6]
    v = torch.randn(2, 130, 2, 65, generator=g).to("cuda", torch.bfloat16)[..., 1:]
    assert v.data_ptr() % 16 != 0 and not q.is_contiguous()
    rope = longrope(64)
    out, lse = scaled_rope_attention(q, k, v, rope, return_lse=True, backend="cuda")
    gold = reference.attention(q.float(), k.float(), v.float(), rope, compute_dtype=torch.float32)
    base = reference.attention(q, k, v, rope, compute_dtype=torch.bfloat16)
    for name, x, gx, bx in (("out", out, gold[0], base[0]), ("lse", lse, gold[1], base[1])):
        assert_close_to_gold(name, x, gx, bx, torch.bfloat16)


@pytest.mark.parametrize("path", ["default", "sm80"])
def test_strided_head_dim_128(path, monkeypatch):
    """k and v as views of a packed (B, N, 3 H, 128) tensor (row stride 3 H D: the tensor maps of the sm_90a kernel;
    plain ReRoPE reads k itself as the far k, with its own strides), with one batch row, one key head and one query
    row (dimensions of size 1 get stride 0 from the launcher). YaRN's attention factor != 1 checks that the far q
    carries both factors when the far k is k itself."""
    for name, value in KERNEL_PATHS[path].items():
        monkeypatch.setenv(name, value)
    g = torch.Generator().manual_seed(44)
    yarn = RopeScaling.yarn(128, 4.0, 256)
    for nq, nk, rope, extra in ((1, 300, longrope(128), {}), (200, 300, longrope(128), {}),
                                (200, 300, yarn, dict(rerope_window=100)), (1, 300, yarn, dict(rerope_window=64))):
        qkv = torch.randn(1, nk, 3 * 2, 128, generator=g).to("cuda", torch.bfloat16)
        q = torch.randn(1, nq, 2, 128, generator=g).to("cuda", torch.bfloat16)
        k, v = qkv[:, :, 2:3], qkv[:, :, 4:5]
        out, lse = scaled_rope_attention(q, k, v, rope, return_lse=True, backend="cuda", **extra)
        gold = reference.attention(q.float(), k.float(), v.float(), rope, compute_dtype=torch.float32, **extra)
        base = reference.attention(q, k, v, rope, compute_dtype=torch.bfloat16, **extra)
        for name, x, gx, bx in (("out", out, gold[0], base[0]), ("lse", lse, gold[1], base[1])):
            assert_close_to_gold(name, x, gx, bx, torch.bfloat16)


@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_kernel_paths_head_dim_128(path, monkeypatch):
    """Explicit unsorted positions with straddling Leaky ReRoPE tiles, GQA + window + log-n, non-causal with a
    partial last key tile, and Nq > Nk with empty rows, on the default path and each switched path."""
    for name, value in KERNEL_PATHS[path].items():
        monkeypatch.setenv(name, value)
    nq, nk = 300, 700
    g = torch.Generator().manual_seed(50)
    k_positions = torch.randperm(nk, generator=g)[None, :] * 2
    q_positions = torch.randint(-3, 2 * nk, (1, nq), generator=g)
    check(1, nq, nk, 2, 1, 128, torch.bfloat16, RopeScaling.default(128), seed=51, q_positions=q_positions.cuda(),
          k_positions=k_positions.cuda(), rerope_window=150, rerope_leak=4.0)
    check(2, 257, 385, 4, 2, 128, torch.float16, longrope(128), seed=52, window=200, logn_base=64.0)
    check(1, 97, 1025, 2, 2, 128, torch.bfloat16, longrope(128), seed=53, causal=False)
    check(1, 500, 300, 2, 2, 128, torch.bfloat16, RopeScaling.default(128), seed=54, rerope_window=64)


def test_16k_causal_longrope():
    check(1, 16384, 16384, 1, 1, 128, torch.bfloat16, longrope(128), seed=41)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grads_through_triton_backward(dtype):
    check(1, 200, 300, 4, 2, 128, dtype, longrope(128), seed=42, grads=True)
    check(1, 200, 300, 2, 2, 64, dtype, RopeScaling.default(64), seed=43, grads=True, rerope_window=100)


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dim_96_positions_window_leaky_and_grads(dtype):
    """head_dim 96 (columns 96..127 of every tile zero-filled) with explicit unsorted positions and Leaky ReRoPE
    straddling tiles, GQA with a window and log-n, and gradients (Triton's backward for ReRoPE, the sm_90a one for
    the default positions)."""
    needs_sm90(96)
    nq, nk = 300, 700
    g = torch.Generator().manual_seed(46)
    k_positions = torch.randperm(nk, generator=g)[None, :] * 2
    q_positions = torch.randint(-3, 2 * nk, (1, nq), generator=g)
    check(1, nq, nk, 2, 1, 96, dtype, RopeScaling.default(96), seed=47, q_positions=q_positions.cuda(),
          k_positions=k_positions.cuda(), rerope_window=150, rerope_leak=4.0)
    check(2, 257, 385, 4, 2, 96, dtype, longrope(96), seed=48, window=200, logn_base=64.0, grads=True)
    check(1, 200, 300, 2, 2, 96, dtype, RopeScaling.default(96), seed=49, grads=True, rerope_window=100)


def test_head_dim_96_needs_the_sm90a_kernel(monkeypatch):
    """With the sm_80 kernel forced, head_dim 96 is refused with the reason, never run on a kernel without its
    tiles."""
    monkeypatch.setenv("SCALED_ROPE_FLASH_SM80", "1")
    q, k, v = random_inputs(1, 17, 17, 2, 2, 96, torch.bfloat16, device="cuda")
    assert "sm_90a" in _cuda.attention_support(q.device, q.dtype, 96)
    with pytest.raises(BackendUnsupported, match="sm_90a"):
        scaled_rope_attention(q, k, v, RopeScaling.default(96), backend="cuda")


def test_lse_gradient():
    """A loss through out and lse: the CUDA backend's backward takes the lse gradient (the Triton backward fed the
    CUDA forward's out and lse), by the rule for every gradient."""
    dtype, rope = torch.bfloat16, longrope(128)
    g = torch.Generator().manual_seed(45)
    q, k, v = random_inputs(2, 200, 300, 4, 2, 128, dtype, device="cuda", seed=45)
    w_out = torch.randn(2, 200, 4, 128, generator=g).cuda()
    w_lse = torch.randn(2, 4, 200, generator=g).cuda()

    def run(fn, cast):
        x = [t.to(cast).detach().requires_grad_(True) for t in (q, k, v)]
        out, lse = fn(*x)
        ((out.float() * w_out).sum() + (lse * w_lse).sum()).backward()
        return [out.detach(), lse.detach()] + [t.grad for t in x]

    gold = run(lambda *x: reference.attention(*x, rope, compute_dtype=torch.float32), torch.float32)
    base = run(lambda *x: reference.attention(*x, rope, compute_dtype=dtype), dtype)
    got = run(lambda *x: scaled_rope_attention(*x, rope, return_lse=True, backend="cuda"), dtype)
    for name, a, gx, bx in zip(("out", "lse", "dq", "dk", "dv"), got, gold, base):
        assert_close_to_gold(name, a, gx, bx, dtype)


def test_unsupported_head_dim_and_dtype():
    for dim, dtype, word in ((80, torch.bfloat16, "head_dim 80"), (64, torch.float32, "float32")):
        q, k, v = random_inputs(1, 17, 17, 2, 2, dim, dtype, device="cuda")
        assert word in _cuda.attention_support(q.device, q.dtype, dim)
        with pytest.raises(BackendUnsupported, match=word):
            scaled_rope_attention(q, k, v, RopeScaling.default(dim), backend="cuda")


def test_auto_order():
    """"auto" takes the CUDA backend where the sm_90a kernels run (head_dim 96 and 128 on a Hopper GPU), for a forward
    and for training (its backward: the sm_90a one, or Triton's), Triton for head_dim 64 (the measurements behind
    it: scaled_rope._backends.auto_order)."""
    q = torch.empty(1, 1, 2, 128, device="cuda", dtype=torch.bfloat16)
    on_sm90 = _cuda.sm90_kernel_applies(q.device, q.dtype, 128)
    if torch.cuda.get_device_capability()[0] == 9:
        assert on_sm90, "the GPU tier builds sm_90a (tools/gpu_session.sh): the sm_90a kernel should apply"
    assert explain_backend(q)[0] == ("cuda" if on_sm90 else "triton")
    assert explain_backend(q, needs_grad=True)[0] == ("cuda" if on_sm90 else "triton")
    assert explain_backend(torch.empty(1, 1, 2, 64, device="cuda", dtype=torch.bfloat16))[0] == "triton"
    q96 = torch.empty(1, 1, 2, 96, device="cuda", dtype=torch.bfloat16)
    assert explain_backend(q96)[0] == ("cuda" if on_sm90 else "triton")
    assert explain_backend(q96, needs_grad=True)[0] == ("cuda" if on_sm90 else "triton")
