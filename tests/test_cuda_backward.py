"""CUDA backward (csrc/flash_bwd_sm90.cu: sm_90a, head_dim 96 and 128, default positions) against the reference
gradients, docs/DESIGN.md §6.1 rule.

GPU tier only, Hopper only (elsewhere `cuda_backward_support` refuses and the tests skip). The kernel takes key
tiles of 128 keys per CTA and query tiles of 64 rows, so the lengths below put partial tiles, diagonal tiles, tiles
skipped by the causal mask or the window, and many query tiles of several q heads per CTA in the tests. out and lse
come from the CUDA forward; dq, dk, dv are compared with the gradients of the float32 reference's (out, lse) for
(dout, dlse), the baseline being the reference in the inputs' dtype. Every output and the dq workspace start
NaN-poisoned (SCALED_ROPE_POISON=1, tests/conftest.py), so an unwritten element fails.
"""
import pytest
import torch

from helpers import GOLD_DTYPE, assert_close_to_gold, random_inputs, reference_grads
from scaled_rope import RopeScaling, scaled_rope_attention
from scaled_rope._cuda_backward import cuda_attention_backward, cuda_backward_support, cuda_flash_backward
from scaled_rope.tables import build_tables

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
SHORT = [1.0 + 0.05 * i for i in range(64)]
LONG = [1.5 + 0.3 * i for i in range(64)]


def longrope(original=4096, dim=128):
    return RopeScaling.longrope(dim, original, 131072, SHORT[:dim // 2], LONG[:dim // 2], n_hat=4)


@pytest.fixture(autouse=True)
def _hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the CUDA backward is an sm_90a kernel (compute capability 9.x)")
    reason = cuda_backward_support(torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16))
    assert reason is None, f"the GPU tier builds sm_90a (tools/gpu_session.sh), yet: {reason}"


def cuda_grads(q, k, v, rope, dout, dlse, *, causal=True, window=None, logn_base=None, softmax_scale=None):
    """The CUDA forward's out and lse, then the CUDA backward."""
    options = dict(causal=causal, window=window, logn_base=logn_base, softmax_scale=softmax_scale)
    with torch.no_grad():
        out, lse = scaled_rope_attention(q, k, v, rope, return_lse=True, backend="cuda", **options)
    # default positions: every row has length Nk; q and k share the tables
    tables = None if rope is None else build_tables(rope, q.shape[0], q.device, seq_lens=k.shape[1])
    options["softmax_scale"] = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return cuda_attention_backward(q, k, v, out, lse, dout, dlse, q_tables=tables, k_tables=tables, **options)


def check_grads(q, k, v, rope, *, seed, with_dlse=True, **options):
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g).to("cuda", dtype)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=g).to("cuda") if with_dlse else None
    gold = reference_grads(q, k, v, rope, dout, dlse, GOLD_DTYPE[dtype], **options)
    base = reference_grads(q, k, v, rope, dout, dlse, dtype, **options)
    mine = cuda_grads(q, k, v, rope, dout, dlse, **options)
    for name, x, gx, bx in zip(("dq", "dk", "dv"), mine, gold, base):
        assert x.dtype == dtype and x.shape == gx.shape, name
        assert_close_to_gold(name, x, gx, bx, dtype)


def check(batch, nq, nk, hq, hkv, dtype, rope, *, seed, with_dlse=True, dim=128, **options):
    q, k, v = random_inputs(batch, nq, nk, hq, hkv, dim, dtype, device="cuda", seed=seed)
    check_grads(q, k, v, rope, seed=seed, with_dlse=with_dlse, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [96, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 17), (17, 17), (97, 97), (97, 257), (257, 97), (1025, 1025),
                                   (65, 1025)])
def test_lengths(dtype, dim, causal, nq, nk):
    """head_dim 96 runs in 128-column tiles whose last 32 columns TMA fills with zeros."""
    check(2, nq, nk, 3, 3, dtype, longrope(dim=dim), seed=nq * 7 + nk, causal=causal, dim=dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [96, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1)])
def test_gqa(dtype, dim, causal, hq, hkv):
    """dk and dv summed over the q heads of a group: each CTA walks the query tiles of every head of its group."""
    check(2, 200, 333, hq, hkv, dtype, longrope(dim=dim), seed=hq + hkv, causal=causal, dim=dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 100, 257])
def test_window(dtype, causal, window):
    check(1, 300, 700, 4, 2, dtype, RopeScaling.yarn(128, 8.0, 256), seed=window, causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [96, 128])
def test_logn(dtype, dim):
    check(1, 300, 1100, 4, 4, dtype, longrope(original=512, dim=dim), seed=33, logn_base=512.0, dim=dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_head_dim_96(dtype):
    check(1, 300, 700, 4, 2, dtype, RopeScaling.yarn(96, 8.0, 256), seed=34, window=100, dim=96)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_dlse", [True, False])
def test_empty_rows(dtype, with_dlse):
    """Nq > Nk, causal: the first queries sit at negative positions and see no key (lse -inf): they contribute
    nothing and get dq 0, whatever dlse says."""
    check(1, 300, 70, 2, 1, dtype, longrope(), seed=36, with_dlse=with_dlse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_causal_gqa(dtype):
    """32 query tiles of 4 q heads per CTA of the first key tiles, 16 key tiles: the stage ring wraps many times."""
    check(1, 2048, 2048, 4, 1, dtype, longrope(original=1024), seed=37)


@pytest.mark.parametrize("scale", [-0.07, 0.0])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_scale_sign_partial_rotary_layouts(scale, layout):
    """softmax_scale's sign rides on q (0 makes every score 0); the transposed rotation of both layouts and of a
    partial rotary dim maps dq and dk back."""
    rope = RopeScaling.yarn(128, 8.0, 256, rotary_dim=64, layout=layout)
    check(1, 129, 257, 2, 2, torch.float16, rope, seed=38, softmax_scale=scale)


def test_no_rope():
    check(2, 100, 150, 2, 1, torch.bfloat16, None, seed=39)


@pytest.mark.parametrize("passes", ["0", "1"])
@pytest.mark.parametrize("dim,rotary_dim,layout", [(128, 128, "half"), (96, 96, "half"), (128, 96, "half"),
                                                   (96, 64, "half"), (128, 32, "half"), (128, 64, "interleaved"),
                                                   (96, 20, "interleaved")])
def test_k_rotated_on_chip_or_by_passes(passes, dim, rotary_dim, layout, monkeypatch):
    """Where rope_on_chip allows, the kernel rotates each key tile on-chip and hands dk and dq back through the
    rotation's transpose (dK in registers, dq in its conversion, with softmax_scale's sign): one rotation pass (q).
    Otherwise, or with SCALED_ROPE_ROTATION_PASSES=1, four (q, k, and the transposes of dq and dk)."""
    import scaled_rope._cuda_backward as cuda_backward

    monkeypatch.setenv("SCALED_ROPE_ROTATION_PASSES", passes)
    passes_run = []
    rotate = cuda_backward.cuda_rotate
    monkeypatch.setattr(cuda_backward, "cuda_rotate", lambda *args, **kw: passes_run.append(1) or rotate(*args, **kw))
    on_chip_layout = rotary_dim % 8 == 0 if layout == "interleaved" else rotary_dim in (64, 96, 128)
    rope = RopeScaling.yarn(dim, 8.0, 256, rotary_dim=rotary_dim, layout=layout)
    check(1, 300, 333, 4, 2, torch.bfloat16, rope, seed=42 + rotary_dim, softmax_scale=-0.09, dim=dim)
    assert len(passes_run) == (1 if passes == "0" and on_chip_layout else 4)


@pytest.mark.parametrize("section_heads", ["1", "3"])
def test_l2_sections_cover_every_tile(section_heads, monkeypatch):
    """CTAs take (batch, kv head) pairs in L2 sections, key tile-major inside one: sections of 3 over 2 x 2 pairs end
    in a partial section and cross batch rows; a key tile left out leaves NaN-poisoned dk and dv."""
    monkeypatch.setenv("SCALED_ROPE_L2_SECTION_HEADS", section_heads)
    check(2, 300, 500, 4, 2, torch.bfloat16, longrope(), seed=40)


def test_strided_and_misaligned_inputs():
    """q and k as views of a packed qkv tensor (head dims of size 1: stride 0 from the launcher), v one element off a
    16-byte boundary (copied to aligned rows before the kernel's TMA reads it)."""
    g = torch.Generator().manual_seed(41)
    qkv = torch.randn(1, 230, 3, 128, generator=g).to("cuda", torch.bfloat16)
    q, k = qkv[:, :, 0:1], qkv[:, :, 1:2]
    v = torch.randn(1, 230, 1, 129, generator=g).to("cuda", torch.bfloat16)[..., 1:]
    assert v.data_ptr() % 16 != 0 and not q.is_contiguous()
    check_grads(q, k, v, longrope(), seed=41)


def test_flash_backward_argument_checks():
    q, k, v = random_inputs(1, 17, 17, 2, 1, 128, torch.bfloat16, device="cuda", seed=42)
    lse = torch.zeros(1, 2, 17, device="cuda")
    common = dict(causal=True, window=None, logn_base=None)
    with pytest.raises(ValueError, match="softmax_scale"):
        cuda_flash_backward(q, k, v, q, lse, q, None, softmax_scale=-1.0, **common)
    with pytest.raises(ValueError, match="lse"):
        cuda_flash_backward(q, k, v, q, lse[:, :1], q, None, softmax_scale=0.1, **common)
    with pytest.raises(ValueError, match="dout"):
        cuda_flash_backward(q, k, v, q, lse, q[:, :3], None, softmax_scale=0.1, **common)


def test_support_names_what_it_does_not_run():
    """Explicit positions, ReRoPE, other head dims and dtypes are refused with a reason (the caller runs the Triton
    backward there), and cuda_attention_backward raises NotImplementedError with it."""
    q = torch.empty(1, 4, 2, 128, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(4, device="cuda")[None]
    cases = [(q, dict(q_positions=positions), "positions"), (q, dict(k_positions=positions), "positions"),
             (q, dict(rerope_window=16), "ReRoPE"), (q[..., :64], {}, "head_dim 64"), (q[..., :80], {}, "head_dim 80"),
             (q.float(), {}, "float32"), (q.cpu(), {}, "CUDA tensors")]
    for x, kwargs, word in cases:
        reason = cuda_backward_support(x, **kwargs)
        assert reason is not None and word in reason, (kwargs, reason)
        with pytest.raises(NotImplementedError, match=word):
            cuda_attention_backward(x, x, x, x, None, x, None, q_tables=None, k_tables=None, causal=True,
                                    window=None, softmax_scale=0.1, logn_base=None, **kwargs)
