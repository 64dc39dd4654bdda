"""Standalone rotation kernels (Triton `rotate`, CUDA `cuda_rotate`) against the float64 definition of the tables,
and `apply_scaled_rope` (its plan, every backend) against the reference.

Definition (team interfaces, "Rotation tables"): T = p * turns + offset (int64, wrapping), angle = T * 2pi / 2**64,
pair -> m' (x1 cos - x2 sin, x1 sin + x2 cos); m' = 1 and turns_unscaled below n_hat; inverse = the transpose.
CPU tier: Triton interpreter (TRITON_INTERPRET=1), float32 and float16. GPU tier: both kernels, all dtypes.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import assert_close_to_gold
from scaled_rope import BackendUnsupported, RopeScaling, apply_scaled_rope, reference
from scaled_rope.tables import RotaryTables, frequency_to_turns

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from scaled_rope._cuda import cuda_rotate, load_extension  # noqa: E402
from scaled_rope.triton_kernels.rope import rope_cos_sin, rotate  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_tier = pytest.mark.skipif(not INTERPRET, reason="CPU tier runs the Triton interpreter (TRITON_INTERPRET=1)")
ANGLE_PER_UNIT = 2 * math.pi / 2.0 ** 64
FAR = 2 ** 21  # the precision rule holds for every position up to here


# ---- the definition ---------------------------------------------------------------------------------------
def fixed_point(positions: torch.Tensor, turns: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """p * turns + offset modulo 2**64 (numpy uint64 arithmetic wraps by definition), as int64."""
    t = positions.cpu().numpy().astype(np.uint64) * turns.cpu().numpy().astype(np.uint64)
    if offset is not None:
        t = t + offset.cpu().numpy().astype(np.uint64)
    return torch.from_numpy(t.view(np.int64))


def definition(x: torch.Tensor, positions: torch.Tensor, tables: RotaryTables, *, inverse: bool = False,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The rotation computed in `dtype` (float64: gold; the inputs' dtype: baseline) on the CPU."""
    x = x.cpu()
    batch, seqlen, _, _ = x.shape
    half = tables.rotary_dim // 2
    pos = positions.cpu().to(torch.int64).expand(batch, seqlen)[:, :, None]
    turns = tables.turns.cpu().expand(batch, half)[:, None, :]
    factor = tables.attention_factor.cpu().double().expand(batch)[:, None, None].expand(batch, seqlen, 1)
    offset = None if tables.offset is None else tables.offset.cpu().expand(batch, half)[:, None, :]
    if tables.n_hat:
        short = pos < tables.n_hat
        turns = torch.where(short, tables.turns_unscaled.cpu()[None, None, :], turns)
        factor = torch.where(short, torch.ones_like(factor), factor)
    angle = fixed_point(*torch.broadcast_tensors(pos, turns), None if offset is None else
                        offset.expand(batch, seqlen, half)).double() * ANGLE_PER_UNIT
    angle = angle.to(dtype)
    cos = (torch.cos(angle) * factor.to(dtype))[:, :, None, :]
    sin = (torch.sin(angle) * factor.to(dtype))[:, :, None, :]
    if inverse:
        sin = -sin
    y = x.to(dtype).clone()
    r = tables.rotary_dim
    i1, i2 = (slice(0, r, 2), slice(1, r, 2)) if tables.interleaved else (slice(0, half), slice(half, r))
    x1, x2 = y[..., i1].clone(), y[..., i2].clone()
    y[..., i1] = x1 * cos - x2 * sin
    y[..., i2] = x1 * sin + x2 * cos
    return y


def make_tables(batch: int, head_dim: int, rotary_dim: int, *, interleaved: bool = False, offset: bool = False,
                n_hat: int = 0, shared_row: bool = False, device="cpu", seed: int = 0) -> RotaryTables:
    """Per-row frequencies <= 1 (a base-10000 spectrum times per-row factors) and per-row attention factors."""
    g = torch.Generator().manual_seed(seed)
    half = rotary_dim // 2
    base = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    rows = 1 if shared_row else batch
    freq = base[None, :] / (1 + 3 * torch.rand(rows, half, generator=g, dtype=torch.float64))
    turns = frequency_to_turns(freq)
    off = frequency_to_turns(torch.rand(rows, half, generator=g, dtype=torch.float64) * 100) if offset else None
    unscaled = frequency_to_turns(base) if n_hat else None
    factor = 1 + 0.5 * torch.rand(rows, generator=g, dtype=torch.float64)
    if shared_row:
        turns, factor = turns.expand(batch, half), factor.expand(batch)
        off = None if off is None else off.expand(batch, half)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return RotaryTables(to(turns), to(off), to(unscaled), n_hat, factor.float().to(device), rotary_dim, interleaved)


def make_positions(batch: int, seqlen: int, seed: int, device="cpu", dtype=torch.int64) -> torch.Tensor:
    """Random positions up to 2**21, with 0, 1 and the far end included."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, FAR + 1, (batch, seqlen), generator=g)
    special = torch.tensor([0, 1, FAR - 1, FAR, 5])[: seqlen]
    pos[:, : special.numel()] = special
    return pos.to(device=device, dtype=dtype)


def check(kernel_out: torch.Tensor, x, positions, tables, inverse=False):
    gold = definition(x, positions, tables, inverse=inverse)
    baseline = definition(x, positions, tables, inverse=inverse, dtype=x.dtype)
    assert kernel_out.dtype == x.dtype
    assert_close_to_gold("rotate", kernel_out.cpu(), gold, baseline, x.dtype)


# ---- angle precision --------------------------------------------------------------------------------------
@triton.jit
def _cos_sin_kernel(Pos, Turns, Offset, Cos, Sin, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pos = tl.load(Pos + offs, mask=mask, other=0)
    turns = tl.load(Turns + offs, mask=mask, other=0)
    offset = tl.load(Offset + offs, mask=mask, other=0)
    cos, sin = rope_cos_sin(pos, turns, offset)
    tl.store(Cos + offs, cos, mask=mask)
    tl.store(Sin + offs, sin, mask=mask)


def precision_cases(seed=0):
    """Positions up to 2**21 and frequencies <= 1 (with offsets), and the float64 truth of cos and sin."""
    g = torch.Generator().manual_seed(seed)
    n = 4096
    pos = torch.randint(0, FAR + 1, (n,), generator=g)
    pos[:8] = torch.tensor([FAR, FAR - 1, FAR - 2, 0, 1, 2 ** 20 + 1, 1_000_003, 2_000_000])
    freq = torch.rand(n, generator=g, dtype=torch.float64) ** 4
    freq[:16] = torch.tensor([1.0, 0.9999999, 0.5, 1e-4] * 4, dtype=torch.float64)
    off_angle = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2 * math.pi
    off_angle[: n // 2] = 0
    truth = pos.double() * freq + off_angle  # float64 product: < 3e-10 rad off at 2**21
    return pos, frequency_to_turns(freq), frequency_to_turns(off_angle), torch.cos(truth), torch.sin(truth), freq


def check_precision(cos, sin, truth_cos, truth_sin):
    err = max((cos.cpu().double() - truth_cos).abs().max().item(), (sin.cpu().double() - truth_sin).abs().max().item())
    assert err <= 1e-6, f"cos/sin off by {err:.3e} (> 1e-6)"


def run_cos_sin_kernel(device):
    pos, turns, offset, truth_cos, truth_sin, freq = precision_cases()
    cos = torch.full(pos.shape, float("nan"), device=device)
    sin = torch.full(pos.shape, float("nan"), device=device)
    _cos_sin_kernel[(triton.cdiv(pos.numel(), 1024),)](pos.to(device), turns.to(device), offset.to(device), cos,
                                                       sin, pos.numel(), BLOCK=1024)
    check_precision(cos, sin, truth_cos, truth_sin)
    # the rule has teeth: a float32 product p * w misses it by orders of magnitude
    naive = pos.float() * freq.float()
    assert (torch.cos(naive).double() - torch.cos(pos.double() * freq))[: pos.numel() // 2].abs().max() > 1e-3


def run_unit_vector_rotation(rotate_fn, device, interleaved):
    """Rotating (1, 0) pairs returns (cos, sin) of each angle: the precision rule end to end through a kernel."""
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, FAR + 1, (256,), generator=g)
    pos[:4] = torch.tensor([FAR, FAR - 1, 0, 1])
    freq = torch.rand(64, generator=g, dtype=torch.float64) ** 4
    freq[:4] = torch.tensor([1.0, 0.9999999, 0.5, 1e-4], dtype=torch.float64)
    off = (torch.rand(64, generator=g, dtype=torch.float64) - 0.5) * 2 * math.pi
    truth = pos.double()[:, None] * freq[None, :] + off[None, :]
    half = freq.numel()
    tables = RotaryTables(frequency_to_turns(freq)[None].to(device), frequency_to_turns(off)[None].to(device), None,
                          0, torch.ones(1, device=device), 2 * half, interleaved)
    x = torch.zeros(1, pos.numel(), 1, 2 * half)
    x[..., slice(0, None, 2) if interleaved else slice(0, half)] = 1.0
    y = rotate_fn(x.to(device), pos[None].to(device), tables).cpu()
    c, s = (y[..., 0::2], y[..., 1::2]) if interleaved else (y[..., :half], y[..., half:])
    check_precision(c[0, :, 0], s[0, :, 0], torch.cos(truth), torch.sin(truth))


# ---- CPU tier: Triton interpreter ---------------------------------------------------------------------------
CASES = [  # (batch, seqlen, heads, head_dim, rotary_dim, dtype, options)
    (2, 17, 3, 64, 64, torch.float32, {}),
    (2, 17, 3, 64, 64, torch.float32, {"interleaved": True}),
    (2, 17, 3, 80, 48, torch.float16, {}),
    (1, 5, 3, 80, 48, torch.float16, {"interleaved": True}),
    (2, 9, 2, 128, 32, torch.float32, {"offset": True}),
    (1, 17, 2, 96, 96, torch.float32, {"interleaved": True, "offset": True, "inverse": True}),
    (2, 17, 2, 64, 64, torch.float16, {"n_hat": 1_000_000, "inverse": True}),
    (2, 17, 1, 66, 32, torch.float32, {"interleaved": True, "n_hat": 1_500_000}),
    (3, 1, 4, 64, 64, torch.float32, {"shared_row": True, "int32": True}),
    (2, 17, 2, 128, 128, torch.float16, {"shared_row": True, "offset": True}),
]


def case_inputs(batch, seqlen, heads, head_dim, rotary_dim, dtype, options, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    positions = make_positions(batch, seqlen, seed, device, torch.int32 if options.get("int32") else torch.int64)
    if options.get("shared_row"):
        positions = positions[:1].expand(batch, seqlen)
    tables = make_tables(batch, head_dim, rotary_dim, interleaved=options.get("interleaved", False),
                         offset=options.get("offset", False), n_hat=options.get("n_hat", 0),
                         shared_row=options.get("shared_row", False), device=device, seed=seed)
    return x, positions, tables


@cpu_tier
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[1]}H{c[2]}D{c[3]}R{c[4]}-{str(c[5])[6:]}-"
                         + "-".join(f"{k}" for k in c[6]))
def test_rotate_matches_definition(case):
    *shape, options = case
    x, positions, tables = case_inputs(*shape, options)
    inverse = options.get("inverse", False)
    check(rotate(x, positions, tables, inverse=inverse), x, positions, tables, inverse)


@cpu_tier
def test_rotate_strided_out_and_in_place():
    x_big = torch.randn(2, 17, 6, 72)
    x = x_big[:, :, ::2, :64]  # strides of a fused qkv-like buffer
    positions, tables = make_positions(2, 17, 3), make_tables(2, 64, 48, offset=True, seed=3)
    out = torch.full((2, 6, 17, 64), float("nan")).transpose(1, 2)[:, :, :3]
    gold_in = x.clone()
    result = rotate(x, positions, tables, out=out)
    assert result is out
    check(out, gold_in, positions, tables)
    rotate(x, positions, tables, out=x)  # in place
    check(x, gold_in, positions, tables)
    assert torch.equal(x_big[:, :, 1::2], x_big.clone()[:, :, 1::2])


@cpu_tier
@pytest.mark.parametrize("options", [{}, {"interleaved": True, "n_hat": 1_000_000}], ids=["half", "interleaved-nhat"])
def test_rotate_second_input_in_the_same_launch(options):
    """y (k beside q: other heads, a strided view) rotated with the same tables and positions in x's launch, with
    and without second tables, matches rotating each alone."""
    x, positions, tables = case_inputs(2, 17, 3, 80, 48, torch.float32, options, seed=8)
    y = torch.randn(2, 17, 10, 80)[:, :, ::2]  # 5 heads (more than x's 3), strided
    out, y_out = rotate(x, positions, tables, y=y)
    check(out, x, positions, tables)
    check(y_out, y, positions, tables)
    if not options:
        second = make_tables(2, 80, 48, offset=True, seed=9)
        out, out2, y_out = rotate(x, positions, tables, second_tables=second, y=y)
        check(out, x, positions, tables)
        check(out2, x, positions, second)
        check(y_out, y, positions, tables)


@cpu_tier
@pytest.mark.parametrize("interleaved", [False, True])
def test_inverse_is_transpose(interleaved):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 17, 3, 64, generator=g), torch.randn(2, 17, 3, 64, generator=g)
    positions = make_positions(2, 17, 5)
    tables = make_tables(2, 64, 48, interleaved=interleaved, n_hat=900_000, seed=5)
    lhs = (rotate(x, positions, tables).double() * y.double()).sum()
    rhs = (x.double() * rotate(y, positions, tables, inverse=True).double()).sum()
    assert abs(lhs - rhs) <= 1e-5 * (x.abs() * y.abs()).sum()


@cpu_tier
def test_angle_precision_interpreter():
    run_cos_sin_kernel("cpu")


@cpu_tier
@pytest.mark.parametrize("interleaved", [False, True])
def test_unit_vector_precision_interpreter(interleaved):
    run_unit_vector_rotation(rotate, "cpu", interleaved)


def test_bad_arguments_name_the_argument():
    """The rotation is checked once, by its plan (the launchers check nothing)."""
    rope = RopeScaling.default(64)
    x = torch.randn(2, 5, 2, 64)
    with pytest.raises(ValueError, match="x must be float16"):
        apply_scaled_rope(x.to(torch.int32), rope)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        apply_scaled_rope(torch.randn(2, 5, 64, 2).transpose(2, 3), rope)
    with pytest.raises(ValueError, match="positions must have shape"):
        apply_scaled_rope(x, rope, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="positions must be an int32 or int64"):
        apply_scaled_rope(x, rope, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="head_dim"):
        apply_scaled_rope(x, RopeScaling.default(32))
    with pytest.raises(ValueError, match="seq_lens"):
        apply_scaled_rope(x, rope, seq_lens=torch.tensor([3]))
    with pytest.raises(ValueError, match="seq_lens"):
        apply_scaled_rope(x, rope, seq_lens=2.5)
    with pytest.raises(ValueError, match="backend"):
        apply_scaled_rope(x, rope, backend="fast")
    with pytest.raises(BackendUnsupported, match="float64"):
        apply_scaled_rope(x.double(), rope, backend="triton")
    with pytest.raises(BackendUnsupported, match="CUDA tensors"):
        apply_scaled_rope(x, rope, backend="cuda")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=cpu_tier)])
@pytest.mark.parametrize("seq_lens", [None, 40, -3, "rows"])
def test_apply_scaled_rope_against_the_reference(backend, seq_lens):
    """Each row's frequency set from seq_lens (LongRoPE with separate short and long attention factors; a length
    below 0 is short), an int or an int32 tensor, and the gradient (the transposed rotation)."""
    rope = RopeScaling.longrope(64, 16, 256, [1.0 + 0.05 * i for i in range(32)], [1.5 + 0.3 * i for i in range(32)],
                                short_attention_factor=1.1, long_attention_factor=1.3)
    if seq_lens == "rows":
        seq_lens = torch.tensor([3, 40, -8], dtype=torch.int32)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 9, 2, 64, generator=g, requires_grad=True)
    positions = torch.randint(-50, 300, (3, 9), generator=g)
    grad = torch.randn(3, 9, 2, 64, generator=g)
    y = apply_scaled_rope(x, rope, positions, seq_lens=seq_lens, backend=backend)
    y.backward(grad)
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else None if seq_lens is None else [seq_lens] * 3
    gold = reference.rotate(x.detach(), positions, rope, seq_lens=lens, compute_dtype=torch.float64)
    base = reference.rotate(x.detach(), positions, rope, seq_lens=lens, compute_dtype=torch.float32)
    assert_close_to_gold("rotate", y.detach(), gold, base, torch.float32)
    gold_grad = reference.apply_scaled_rope(grad.double(), rope, positions, seq_lens=lens, inverse=True)
    base_grad = reference.apply_scaled_rope(grad, rope, positions, seq_lens=lens, inverse=True)
    assert_close_to_gold("dx", x.grad, gold_grad, base_grad, torch.float32)


def test_import_never_loads_extension():
    import subprocess
    import sys

    code = "import sys, scaled_rope; assert 'scaled_rope._C' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    module, why = load_extension()
    assert (module is None) != (why is None)
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError)):
            cuda_rotate(x=torch.zeros(1, 1, 1, 2), positions=torch.zeros(1, 1, dtype=torch.int64),
                        tables=make_tables(1, 2, 2))


# ---- GPU tier ---------------------------------------------------------------------------------------------
GPU_CASES = [
    (2, 1025, 5, 128, 128, {}),
    (2, 1025, 5, 128, 128, {"interleaved": True}),
    (1, 257, 4, 80, 48, {}),
    (1, 257, 4, 96, 64, {"interleaved": True, "offset": True}),
    (3, 97, 2, 64, 64, {"n_hat": 1_000_000, "inverse": True}),
    (2, 17, 8, 128, 64, {"shared_row": True, "int32": True, "inverse": True}),
    (8, 1, 32, 128, 128, {}),
    (4, 1, 8, 64, 64, {"interleaved": True}),
]
BACKENDS = {"cuda": cuda_rotate, "triton": rotate}


def gpu_rotate(backend):
    if backend == "cuda":
        module, why = load_extension()
        assert module is not None, why
    return BACKENDS[backend]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"B{c[0]}N{c[1]}H{c[2]}D{c[3]}R{c[4]}-"
                         + "-".join(f"{k}" for k in c[5]))
def test_gpu_rotate_matches_definition(backend, dtype, case):
    *shape, options = case
    x, positions, tables = case_inputs(*shape, dtype, options, device="cuda")
    inverse = options.get("inverse", False)
    check(gpu_rotate(backend)(x, positions, tables, inverse=inverse), x, positions, tables, inverse)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_strided_misaligned_in_place(backend, dtype):
    fn = gpu_rotate(backend)
    positions, tables = make_positions(2, 33, 7, "cuda"), make_tables(2, 128, 128, offset=True, device="cuda")
    # qkv-like strides (vector path) and a buffer shifted by one element (scalar path in CUDA)
    big = torch.randn(2, 33, 6, 128, device="cuda").to(dtype)
    flat = torch.randn(2 * 33 * 3 * 128 + 1, device="cuda").to(dtype)
    for x in (big[:, :, ::2], flat[1:].view(2, 33, 3, 128)):
        gold_in = x.clone()
        out = torch.full((2, 3, 33, 128), float("nan"), device="cuda", dtype=dtype).transpose(1, 2)
        fn(x, positions, tables, out=out)
        check(out, gold_in, positions, tables)
        fn(x, positions, tables, out=x)
        check(x, gold_in, positions, tables)


@pytest.mark.gpu
def test_gpu_angle_precision_triton_helper():
    run_cos_sin_kernel("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_unit_vector_precision(backend, interleaved):
    run_unit_vector_rotation(gpu_rotate(backend), "cuda", interleaved)


@pytest.mark.gpu
def test_gpu_cuda_and_triton_agree():
    x, positions, tables = case_inputs(2, 513, 8, 128, 128, torch.float32, {"offset": True}, device="cuda")
    a, b = cuda_rotate(x, positions, tables), rotate(x, positions, tables)
    assert (a - b).abs().max().item() <= 4e-6 * x.abs().max().item()
