"""torch.compile(fullgraph=True) of the public entry points, and torch.library.opcheck of their custom ops.

CPU tier: the reference backend and the Triton interpreter, small shapes, the aot_eager compiler (Dynamo, the fake
implementations and AOT autograd, which is what decides graph breaks; no code generation). GPU tier (marked): the
default compiler, CUDA graphs (mode="reduce-overhead") for a decode step.
"""
import os

import pytest
import torch

from helpers import LONG, SHORT, random_inputs
from scaled_rope import (RopeScaling, apply_scaled_rope, scaled_rope_attention, scaled_rope_attention_with_kvcache)
from scaled_rope import _ops, _plan

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET,
                                                                                 reason="needs TRITON_INTERPRET=1"))]
LONGROPE = RopeScaling.longrope(32, 16, 256, SHORT[:16], LONG[:16], short_attention_factor=1.1,
                                long_attention_factor=1.2)
DYNAMIC = RopeScaling.dynamic_ntk(32, 2.0, 16)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _loss(q, k, v, rope, backend, **kwargs):
    out, lse = scaled_rope_attention(q, k, v, rope, return_lse=True, backend=backend, **kwargs)
    return (out * out).sum() + lse.sum()


def _grads(fn, q, k, v, *args, **kwargs):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    loss = fn(*leaves, *args, **kwargs)
    loss.backward()
    return [loss.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rope, positions", [(LONGROPE, "rows"), (DYNAMIC, None)])
def test_attention_forward_and_backward(backend, rope, positions):
    """One graph for forward and backward; the same loss and gradients as eager. LongRoPE with explicit positions
    picks each row's set with tensor ops; dynamic NTK's lengths change between calls (a symbolic size the second
    time: its tables are tensor ops then), with ReRoPE."""
    kwargs = dict(rerope_window=7) if rope.kind == "dynamic_ntk" else {}
    fn = compiled(_loss)
    for nk in (12, 15):
        q, k, v = random_inputs(2, nk, nk, 2, 1, 32, torch.float32, seed=nk)
        if positions == "rows":  # row 0 short, row 1 long
            pos = torch.arange(nk)[None] + torch.tensor([[-5], [10]])
            kwargs.update(q_positions=pos, k_positions=pos)
        got = _grads(fn, q, k, v, rope, backend, **kwargs)
        want = _grads(_loss, q, k, v, rope, backend, **kwargs)
        for name, a, b in zip(("loss", "dq", "dk", "dv"), got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max().item())


def test_dynamic_shapes():
    """torch.compile(dynamic=True): every size symbolic from the start (the head dim and the ReRoPE window become
    constants through a guard), batch and lengths changing between calls without recompiling the plan away."""
    fn = torch.compile(_loss, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch, n in ((2, 9), (3, 11)):
        q, k, v = random_inputs(batch, n, n, 2, 1, 32, torch.float32, seed=n)
        got = _grads(fn, q, k, v, DYNAMIC, "reference", rerope_window=4)
        want = _grads(_loss, q, k, v, DYNAMIC, "reference", rerope_window=4)
        for name, a, b in zip(("loss", "dq", "dk", "dv"), got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name


def _decode_step(q, k_cache, v_cache, rope, seqlens, k_new, v_new, backend):
    return scaled_rope_attention_with_kvcache(q, k_cache, v_cache, rope, cache_seqlens=seqlens, k_new=k_new,
                                              v_new=v_new, return_lse=True, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rope", [LONGROPE, DYNAMIC])
def test_kvcache_step_appends_in_place(backend, rope):
    """A decode step (append + attention) compiles to one graph whose op mutates the caches, as eager does; the
    step crosses LongRoPE's original length in row 0 with no recompilation (lengths are a tensor)."""
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(2, 40, 2, 32, generator=g), torch.randn(2, 40, 2, 32, generator=g)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    fn = compiled(_decode_step)
    for step in range(3):
        q, k_new, v_new = (torch.randn(2, 1, h, 32, generator=g) for h in (4, 2, 2))
        seqlens = torch.tensor([15 + step, 30 + step])  # int64
        got = fn(q, k_cache, v_cache, rope, seqlens, k_new, v_new, backend)
        want = _decode_step(q, eager_k, eager_v, rope, seqlens, k_new, v_new, backend)
        assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _rotation_loss(x, rope, seq_lens, backend):
    return apply_scaled_rope(x, rope, seq_lens=seq_lens, backend=backend).square().sum()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rotation_forward_and_backward(backend):
    fn = compiled(_rotation_loss)
    for seq_lens in (torch.tensor([3, 40], dtype=torch.int32), 30):
        x = torch.randn(2, 7, 3, 32, requires_grad=True)
        loss = fn(x, LONGROPE, seq_lens, backend)
        loss.backward()
        grad = x.grad
        x.grad = None
        _rotation_loss(x, LONGROPE, seq_lens, backend).backward()
        assert torch.allclose(grad, x.grad, rtol=1e-6, atol=1e-6)


def test_bad_arguments_still_raise_under_compile():
    """A check that fails while tracing stops compilation with the check's message (fullgraph reports it as an
    unsupported observed exception; eager raises the ValueError itself)."""
    q, k, v = random_inputs(1, 5, 5, 2, 1, 32, torch.float32)
    with pytest.raises(Exception, match="window|Observed exception"):
        compiled(lambda q, k, v: scaled_rope_attention(q, k, v, LONGROPE, window=-1, backend="reference"))(q, k, v)


# ---- opcheck ------------------------------------------------------------------------------------------------------
def _attention_args(backend, **kwargs):
    q, k, v = random_inputs(2, 6, 6, 2, 1, 32, torch.float32, seed=4)
    options = dict(causal=True, q_positions=None, k_positions=None, window=None, softmax_scale=-0.3,
                   rerope_window=None, rerope_leak=None, logn_base=None)
    options.update(kwargs)
    if options["q_positions"] == "rows":  # explicit positions: per-row tables
        options["q_positions"] = options["k_positions"] = torch.arange(6)[None] + torch.tensor([[-2], [14]])
    plan = _plan.attention_plan(q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), LONGROPE,
                                backend=backend, **options)
    return _ops._attention_args(plan.call, plan.backend)


@pytest.mark.parametrize("backend, kwargs", [
    ("reference", {}), ("reference", dict(rerope_window=3)), ("reference", dict(q_positions="rows")),
    pytest.param("triton", dict(rerope_window=3, window=4, logn_base=4.0), marks=CPU_BACKENDS[1].marks)])
def test_opcheck_attention(backend, kwargs):
    """The forward op with its registered autograd, then the backward op on its own (it has no backward)."""
    args = _attention_args(backend, **kwargs)
    torch.library.opcheck(_ops._attention_op, args)
    with torch.no_grad():
        out, lse, residual = _ops._attention_op(*args)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    inputs = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)
    torch.library.opcheck(_ops._attention_backward_op, (dout, dlse, out, lse, residual, *inputs))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k_new", [False, True])
def test_opcheck_kvcache(backend, k_new):
    g = torch.Generator().manual_seed(6)
    k_cache, v_cache = torch.randn(2, 32, 2, 32, generator=g), torch.randn(2, 32, 2, 32, generator=g)
    new = [torch.randn(2, 2, 2, 32, generator=g) for _ in range(2)] if k_new else [None, None]
    plan = _plan.kvcache_plan(torch.randn(2, 2, 4, 32, generator=g), k_cache, v_cache, LONGROPE,
                              cache_seqlens=torch.tensor([5, 20], dtype=torch.int32), k_new=new[0], v_new=new[1],
                              block_table=None, causal=True, window=None, softmax_scale=None, rerope_window=None,
                              rerope_leak=None, logn_base=None, backend=backend)
    torch.library.opcheck(_ops._kvcache_op, _ops._kvcache_args(plan.call, plan.backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_rotate(backend):
    x = torch.randn(2, 5, 3, 32, requires_grad=True)
    plan = _plan.rotation_plan(x, LONGROPE, None, seq_lens=torch.tensor([3, 40]), inverse=False, backend=backend)
    torch.library.opcheck(_ops._rotate_op, _ops._rotation_args(plan.call, plan.backend))


# ---- GPU tier -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_gpu_compiled_training_step(backend):
    """The default compiler, forward and backward through out and lse, on the Triton kernels ("auto" with a
    gradient) and on the CUDA forward with the Triton backward. The loss's own arithmetic may be fused at another
    precision than eager's, so the results agree to float16 rounding rather than bit for bit."""
    rope = RopeScaling.longrope(128, 1024, 8192, SHORT, LONG)
    q, k, v = random_inputs(2, 300, 300, 8, 2, 128, torch.float16, device="cuda", seed=7)
    fn = torch.compile(_loss, fullgraph=True)
    got = _grads(fn, q, k, v, rope, backend)
    want = _grads(_loss, q, k, v, rope, backend)
    for name, a, b in zip(("loss", "dq", "dk", "dv"), got, want):
        a, b = a.float(), b.float()
        assert (a - b).abs().max() <= 1e-2 * b.abs().max(), name


@pytest.mark.gpu
def test_gpu_decode_step_in_a_cuda_graph():
    """mode="reduce-overhead": the compiled decode step replays as a CUDA graph (no host synchronisation, no
    allocation that changes between steps) and matches eager step by step while row 0 crosses the original
    length."""
    rope = RopeScaling.longrope(128, 1024, 8192, SHORT, LONG)
    g = torch.Generator().manual_seed(9)
    k_cache = torch.randn(2, 2048, 2, 128, generator=g).to("cuda", torch.bfloat16)
    v_cache = torch.randn(2, 2048, 2, 128, generator=g).to("cuda", torch.bfloat16)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    for cache in (k_cache, v_cache):  # as transformers' StaticCache does: graphs may then mutate them
        torch._dynamo.mark_static_address(cache)
    fn = torch.compile(_decode_step, fullgraph=True, mode="reduce-overhead")
    for step in range(6):
        q, k_new, v_new = (torch.randn(2, 1, h, 128, generator=g).to("cuda", torch.bfloat16) for h in (8, 2, 2))
        seqlens = torch.tensor([1021 + step, 1500 + step], dtype=torch.int32, device="cuda")
        got = fn(q, k_cache, v_cache, rope, seqlens, k_new, v_new, "triton")
        want = _decode_step(q, eager_k, eager_v, rope, seqlens, k_new, v_new, "triton")
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(k_cache, eager_k), step
