"""Fused scaled-RoPE attention (Triton backend) against what users run today, forward and forward+backward.

Cases (bf16, causal):
  longrope  B4 H32 N4k, B1 H32 N16k, B1 H32 N32k at D128 and B8 H16 N4k at D64; LongRoPE long factors, n_hat = 4
  rerope / leaky   ReRoPE and Leaky ReRoPE (w = 512, kappa = 16) at B1 H32 D128, N 4k, 16k, 64k, 128k (forward;
            forward+backward up to 16k), next to our own plain causal attention at the same shape
  models    the attention shapes and rope types of real models at B1 N16k and B4 N4k, forward and forward+backward:
            Phi-3-mini-128k (D96, MHA 32, LongRoPE long set), Llama-3.1-8B (D128, GQA 32/8, llama3 bands),
            Qwen2.5-7B (D128, GQA 28/4, YaRN x4), Llama-3.2-1B (D64, GQA 32/8, llama3 x32). "ours" is backend
            "auto" as a user calls it (the backend it picked is recorded); the headline peer is what transformers
            runs: eager rope + SDPA with its default backend (cuDNN on Hopper); the ceiling is SDPA cuDNN without rope
Ours (longrope/rerope/leaky): backend="triton" ("ours", forward and forward+backward) and backend="cuda" ("ours
(cuda)"); "ours plain causal" is the Triton plain causal call at a ReRoPE case's shape.
Peers, in the same run (each one that cannot run is recorded as n/a with the reason):
  eager rope + SDPA flash    cos/sin computed per call (as transformers does), q and k rotated eagerly, SDPA flash
  compiled rope + SDPA flash the same rotation under torch.compile
  SDPA flash / SDPA cuDNN / FlexAttention (no rope)   ceilings: attention alone, nothing rotated
  two-matrix                 ReRoPE as published: both score matrices, select, softmax (O(N^2) memory)
  two FlexAttention + merge  near and far parts as two FlexAttention calls merged by their LSE
TFLOP/s = 4*B*H*N^2*D/2 (causal) forward, 3.5x that for forward+backward (backward = 2.5x forward); rope FLOPs not
counted; do_bench medians. Ratio = peer time / our time (> 1: ours is faster). Peak memory of forward+backward
(above the inputs) is measured for every pipeline on the GPU. Prints the GPU, versions, progress and one markdown table; writes
attention-<date>-<gpu>.json to bench/results (or --out, a directory or a .json path); a run without a GPU writes
to bench/results/cpu/ instead, which results_table.py does not read.

    python bench/bench_attention.py [--quick] [--cpu] [--out DIR|PATH] [--budget SECONDS] [--no-autotune]
                                     [--label 'kernel versions'] [--only longrope,rerope,leaky] [--max-n N]

--quick: B4 N4k and B1 N16k plus ReRoPE/Leaky at N4k (about 2 minutes). Without a GPU (or with --cpu) it runs a
small correctness and timing pass on the CPU instead: the reference, eager rope + SDPA (math) and our kernels in
Triton's interpreter, and says so; those times say nothing about GPU performance. Its correctness check holds our
output and gradients to the rule of the tests (README, "Numerics": gold = the float64 reference, baseline = the
float32 reference) and ends with a PASS or FAIL line; the exit status is 1 on FAIL. --budget: seconds after which
peers not yet run are skipped (ours always runs).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _results import today, write_results

import torch

if "--cpu" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be chosen before triton is imported

ORIGINAL, MAXIMUM, N_HAT = 4096, 131072, 4
# the CUDA backend's backward is the Triton one: timed once, in "ours" (the models cases time the pairing itself)
FORWARD_ONLY = {"ours (cuda)"}
WINDOW, LEAK = 512, 16.0


def longrope(dim: int):
    """Phi-3-like LongRoPE: long factors spread 1..~40 over the pairs, n_hat = 4."""
    from scaled_rope import RopeScaling

    pairs = dim // 2
    short = [1.0 + 0.2 * i / pairs for i in range(pairs)]
    long_ = [1.0 + 40.0 * (i / pairs) ** 2 for i in range(pairs)]
    return RopeScaling.longrope(dim, ORIGINAL, MAXIMUM, short, long_, n_hat=N_HAT)


def model_ropes() -> dict:
    """name -> (Hq, Hkv, D, RopeScaling) of the real models the "models" cases copy (Phi-3-like LongRoPE factors:
    the shape of the published ones, 48 pairs, long set spread 1..~40)."""
    from scaled_rope import RopeScaling

    phi_pairs = 48
    phi = RopeScaling.longrope(96, 4096, 131072, [1.0 + 0.2 * i / phi_pairs for i in range(phi_pairs)],
                               [1.0 + 40.0 * (i / phi_pairs) ** 2 for i in range(phi_pairs)])
    return {
        "phi3-mini": (32, 32, 96, phi),
        "llama3.1-8b": (32, 8, 128, RopeScaling.llama3(128, 8.0, 8192, 1.0, 4.0, base=500000.0)),
        "qwen2.5-7b": (28, 4, 128, RopeScaling.yarn(128, 4.0, 32768, base=1000000.0)),
        "llama3.2-1b": (32, 8, 64, RopeScaling.llama3(64, 32.0, 8192, 1.0, 4.0, base=500000.0)),
    }


# ---- the peers' rotation: what a user writes today --------------------------------------------------------------
def rotation_tensors(rope, n: int, device) -> dict:
    """Frequencies (float32, as transformers keeps inv_freq) for the eager rotations."""
    inv_freq, factor = rope.frequencies(n)
    return {"inv_freq": inv_freq.float().to(device), "inv_freq0": rope.unscaled_frequencies().float().to(device),
            "factor": float(factor), "n_hat": rope.n_hat}


def cos_sin(positions, inv_freq, inv_freq0, factor: float, n_hat: int, dtype):
    """transformers-style cos/sin for float positions (N,), computed on every call; n_hat early positions keep the
    unscaled frequencies and factor 1."""
    freqs = positions[:, None] * inv_freq[None, :]
    scale = torch.full_like(positions, factor)
    if n_hat:
        early = positions < n_hat
        freqs = torch.where(early[:, None], positions[:, None] * inv_freq0[None, :], freqs)
        scale = torch.where(early, torch.ones_like(scale), scale)
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = scale[:, None]
    return (emb.cos() * scale).to(dtype)[None, :, None, :], (emb.sin() * scale).to(dtype)[None, :, None, :]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_qk(q, k, q_positions, k_positions, inv_freq, inv_freq0, factor: float, n_hat: int):
    cos_q, sin_q = cos_sin(q_positions, inv_freq, inv_freq0, factor, n_hat, q.dtype)
    if k_positions is q_positions:  # one cos/sin for both, as transformers does
        cos_k, sin_k = cos_q, sin_q
    else:
        cos_k, sin_k = cos_sin(k_positions, inv_freq, inv_freq0, factor, n_hat, k.dtype)
    return apply_rope(q, cos_q, sin_q), apply_rope(k, cos_k, sin_k)


_COMPILED = {}


def compiled_rope_qk():
    if "rope" not in _COMPILED:
        _COMPILED["rope"] = torch.compile(rope_qk, dynamic=False)
    return _COMPILED["rope"]


def sdpa(q, k, v, backend: str):
    """q (B, N, Hq, D), k, v (B, N, Hkv, D) -> (B, N, Hq, D), causal, with one SDPA backend ("default": none forced,
    what transformers gets). GQA through enable_gqa, as transformers calls it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    gqa = q.shape[2] != k.shape[2]
    if backend == "default":
        out = torch.nn.functional.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=gqa)
        return out.transpose(1, 2)
    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "math": SDPBackend.MATH}[backend]
    with sdpa_kernel(chosen):
        out = torch.nn.functional.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=gqa)
    return out.transpose(1, 2)


def flex(q, k, v, mask_mod, with_lse: bool = False):
    """FlexAttention (compiled) over (B, N, H, D) inputs with a block mask from mask_mod; optionally the LSE."""
    from torch.nn.attention import flex_attention as fa

    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(fa.flex_attention, dynamic=False)
    n = q.shape[1]
    key = ("mask", mask_mod.__name__, n, q.device.type)
    if key not in _COMPILED:
        _COMPILED[key] = fa.create_block_mask(mask_mod, None, None, n, n, device=q.device)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if not with_lse:
        return _COMPILED["flex"](*args, block_mask=_COMPILED[key]).transpose(1, 2)
    if hasattr(fa, "AuxRequest"):
        out, aux = _COMPILED["flex"](*args, block_mask=_COMPILED[key], return_aux=fa.AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = _COMPILED["flex"](*args, block_mask=_COMPILED[key], return_lse=True)
    return out.transpose(1, 2), lse


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def near_mask(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def far_mask(b, h, q_idx, kv_idx):
    return q_idx - kv_idx >= WINDOW


def rerope_operands(q, k, rot: dict, leak):
    """Eager near and far rotations (default rope): near at P, Q; far q at P/kappa + w(1 - 1/kappa) (w without a
    leak), far k at Q/kappa (k itself without a leak: rotation by 0, factor 1)."""
    n = q.shape[1]
    pos = torch.arange(n, device=q.device, dtype=torch.float32)
    q_near, k_near = rope_qk(q, k, pos, pos, **rot)
    if leak is None:
        far_q = torch.full_like(pos, float(WINDOW))
        cos, sin = cos_sin(far_q, rot["inv_freq"], rot["inv_freq0"], rot["factor"], 0, q.dtype)
        return q_near, k_near, apply_rope(q, cos, sin), k
    q_far, k_far = rope_qk(q, k, pos / leak + WINDOW * (1 - 1 / leak), pos / leak, **rot)
    return q_near, k_near, q_far, k_far


def rerope_two_matrix(q, k, v, rot: dict, leak):
    """The published form: both score matrices in full, select by distance, causal softmax."""
    q_near, k_near, q_far, k_far = rerope_operands(q, k, rot, leak)
    n, dim = q.shape[1], q.shape[3]
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    s_near = (t(q_near) @ t(k_near).transpose(-1, -2)).float()
    s_far = (t(q_far) @ t(k_far).transpose(-1, -2)).float()
    i = torch.arange(n, device=q.device)
    delta = i[:, None] - i[None, :]
    s = torch.where(delta < WINDOW, s_near, s_far) * dim ** -0.5
    p = torch.softmax(s.masked_fill(delta < 0, float("-inf")), dim=-1).to(v.dtype)
    return (p @ t(v)).transpose(1, 2)


def rerope_two_flex(q, k, v, rot: dict, leak):
    """Near part and far part as two FlexAttention calls, merged by their LSE."""
    q_near, k_near, q_far, k_far = rerope_operands(q, k, rot, leak)
    o1, l1 = flex(q_near, k_near, v, near_mask, with_lse=True)
    o2, l2 = flex(q_far, k_far, v, far_mask, with_lse=True)
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]
    w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
    return (o1.float() * w1 + o2.float() * w2).to(v.dtype)


# ---- measurement -----------------------------------------------------------------------------------------------
def timer(fn, device: str) -> float:
    """Median milliseconds: triton's do_bench on the GPU, wall time of a few runs on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "OOM"
    return text[:160]


class Case:
    """One shape and variant; builds its inputs on first use and runs implementations on them."""

    def __init__(self, kind, batch, heads, n, dim, device, dtype, kv_heads=None, model=None):
        self.kind, self.batch, self.heads, self.n, self.dim = kind, batch, heads, n, dim
        self.kv_heads = heads if kv_heads is None else kv_heads
        self.model = model
        self.device, self.dtype = device, dtype
        self.inputs = None
        self.outputs = {}
        self.reference = None  # CPU pass: f(q, k, v, compute_dtype) -> out, the reference for the correctness check

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def label(self) -> str:
        if self.model is not None:
            return f"{self.model} B{self.batch} H{self.heads}/{self.kv_heads} N{self.n} D{self.dim}"
        return f"{self.kind} B{self.batch} H{self.heads} N{self.n} D{self.dim}"

    def flops(self, backward: bool) -> float:
        forward = 4 * self.batch * self.heads * self.n * self.n * self.dim / 2
        return forward * (3.5 if backward else 1.0)

    def materialize(self):
        if self.inputs is None:
            gen = torch.Generator(device="cpu").manual_seed(0)
            q_shape = (self.batch, self.n, self.heads, self.dim)
            kv_shape = (self.batch, self.n, self.kv_heads, self.dim)
            make = lambda shape: torch.randn(shape, generator=gen).to(self.device, self.dtype)  # noqa: E731
            self.inputs = [make(q_shape), make(kv_shape), make(kv_shape), make(q_shape)]  # q, k, v, dout
        return self.inputs

    def release(self):
        self.inputs, self.outputs = None, {}
        if self.device == "cuda":
            torch.cuda.empty_cache()


def implementations(case: Case) -> dict:
    """name -> f(q, k, v) -> out (B, N, H, D), for this case, in priority order (ours first)."""
    from scaled_rope import RopeScaling, reference, scaled_rope_attention

    on_gpu = case.on_gpu
    backend = "triton"
    if case.kind == "models":
        rope = model_ropes()[case.model][3]
        rot = rotation_tensors(rope, case.n, case.device)
        pos = torch.arange(case.n, device=case.device, dtype=torch.float32)
        impls = {"ours": lambda q, k, v: scaled_rope_attention(q, k, v, rope),
                 "ours (triton)": lambda q, k, v: scaled_rope_attention(q, k, v, rope, backend="triton"),
                 "ours (cuda)": lambda q, k, v: scaled_rope_attention(q, k, v, rope, backend="cuda"),
                 "eager rope + SDPA default": lambda q, k, v: sdpa(*rope_qk(q, k, pos, pos, **rot), v, "default"),
                 "SDPA cuDNN (no rope)": lambda q, k, v: sdpa(q, k, v, "cudnn"),
                 "SDPA default (no rope)": lambda q, k, v: sdpa(q, k, v, "default")}
        return impls
    if case.kind == "longrope":
        rope = longrope(case.dim)
        rot = rotation_tensors(rope, case.n, case.device)
        pos = torch.arange(case.n, device=case.device, dtype=torch.float32)
        impls = {"ours": lambda q, k, v: scaled_rope_attention(q, k, v, rope, backend=backend)}
        if on_gpu:
            impls["ours (cuda)"] = lambda q, k, v: scaled_rope_attention(q, k, v, rope, backend="cuda")
            impls["eager rope + SDPA flash"] = lambda q, k, v: sdpa(*rope_qk(q, k, pos, pos, **rot), v, "flash")
            impls["SDPA flash (no rope)"] = lambda q, k, v: sdpa(q, k, v, "flash")
            impls["SDPA cuDNN (no rope)"] = lambda q, k, v: sdpa(q, k, v, "cudnn")
            impls["FlexAttention (no rope)"] = lambda q, k, v: flex(q, k, v, causal_mask)
            impls["compiled rope + SDPA flash"] = lambda q, k, v: sdpa(
                *compiled_rope_qk()(q, k, pos, pos, **rot), v, "flash")
        else:
            impls["eager rope + SDPA math"] = lambda q, k, v: sdpa(*rope_qk(q, k, pos, pos, **rot), v, "math")
            impls["reference"] = lambda q, k, v: reference.attention(q, k, v, rope)[0]
            case.reference = lambda q, k, v, dtype: reference.attention(q, k, v, rope, compute_dtype=dtype)[0]
        return impls
    leak = LEAK if case.kind == "leaky" else None
    rope = RopeScaling.default(case.dim)
    rot = rotation_tensors(rope, case.n, case.device)
    window = WINDOW if on_gpu else 32
    impls = {
        "ours": lambda q, k, v: scaled_rope_attention(q, k, v, rope, rerope_window=window, rerope_leak=leak,
                                                      backend=backend),
        "ours plain causal": lambda q, k, v: scaled_rope_attention(q, k, v, rope, backend=backend),
    }
    if on_gpu:
        impls["ours (cuda)"] = lambda q, k, v: scaled_rope_attention(q, k, v, rope, rerope_window=window,
                                                                     rerope_leak=leak, backend="cuda")
        impls["two-matrix"] = lambda q, k, v: rerope_two_matrix(q, k, v, rot, leak)
        impls["two FlexAttention + merge"] = lambda q, k, v: rerope_two_flex(q, k, v, rot, leak)
    else:
        impls["reference"] = lambda q, k, v: reference.attention(q, k, v, rope, rerope_window=window,
                                                                 rerope_leak=leak)[0]
        case.reference = lambda q, k, v, dtype: reference.attention(q, k, v, rope, rerope_window=window,
                                                                    rerope_leak=leak, compute_dtype=dtype)[0]
    return impls


def too_big(case: Case, name: str) -> str | None:
    """Skip what cannot fit before allocating it (the two-matrix form holds several fp32 N x N matrices)."""
    if name != "two-matrix" or case.device != "cuda":
        return None
    need = case.batch * case.heads * case.n ** 2 * 4 * 6
    free = torch.cuda.mem_get_info()[0]
    if need > free:
        return f"needs ~{need / 2 ** 30:.0f} GiB of score matrices, {free / 2 ** 30:.0f} GiB free"
    return None


def auto_backend(case: Case, backward: bool) -> str:
    """The backend "auto" takes for this case (explain_backend on a probe of q's shape)."""
    from scaled_rope import explain_backend

    probe = torch.empty((case.batch, 1, case.heads, case.dim), device=case.device, dtype=case.dtype)
    try:
        return explain_backend(probe, needs_grad=backward)[0]
    except TypeError:  # an explain_backend without needs_grad
        return explain_backend(probe)[0]


def run_one(case: Case, name: str, fn, backward: bool) -> dict:
    entry = {"case": case.label, "kind": case.kind, "batch": case.batch, "heads": case.heads,
             "kv_heads": case.kv_heads, "n": case.n, "head_dim": case.dim, "model": case.model,
             "direction": "fwd+bwd" if backward else "fwd", "impl": name}
    if name == "ours" and case.kind == "models":
        entry["backend"] = auto_backend(case, backward)
    reason = too_big(case, name)
    if reason:
        return {**entry, "ms": None, "error": reason}
    try:
        q, k, v, dout = case.materialize()
        if backward:
            q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))

            def step():
                fn(q, k, v).backward(dout)
        else:
            def step():
                return fn(q, k, v)
        with torch.no_grad() if not backward else torch.enable_grad():
            out = fn(q, k, v)  # first call: compilation and autotuning happen here
            if not backward:
                case.outputs[name] = out.detach()
            del out
            ms = timer(step, case.device)
        entry.update(ms=ms, tflops=case.flops(backward) / ms / 1e9)
        if backward and case.device == "cuda":  # every pipeline: the bound is SDPA's peak + one N x H x D
            for x in (q, k, v):
                x.grad = None
            entry["peak_mb"] = peak_memory_mb(step)
    except Exception as exc:  # a peer that cannot run here is recorded, not fatal
        entry.update(ms=None, error=describe(exc))
    return entry


def plan(quick: bool, device: str):
    """[(Case, directions)]"""
    if device != "cuda":
        return [(Case("longrope", 1, 2, 96, 64, "cpu", torch.float32), (False, True)),
                (Case("rerope", 1, 2, 96, 64, "cpu", torch.float32), (False, True)),
                (Case("leaky", 1, 2, 96, 64, "cpu", torch.float32), (False,))]
    bf16 = torch.bfloat16
    main = [(4, 32, 4096, 128), (1, 32, 16384, 128)] if quick else \
        [(4, 32, 4096, 128), (1, 32, 16384, 128), (1, 32, 32768, 128), (8, 16, 4096, 64)]
    cases = [(Case("longrope", b, h, n, d, "cuda", bf16), (False, True)) for b, h, n, d in main]
    for n in [4096] if quick else [4096, 16384, 65536, 131072]:
        for kind in ("rerope", "leaky"):
            directions = (False, True) if n <= 16384 and not quick else (False,)
            cases.append((Case(kind, 1, 32, n, 128, "cuda", bf16), directions))
    for model, (hq, hkv, dim, _) in model_ropes().items():
        for batch, n in [(1, 16384)] if quick else [(1, 16384), (4, 4096)]:
            cases.append((Case("models", batch, hq, n, dim, "cuda", bf16, kv_heads=hkv, model=model), (False, True)))
    return cases


def check(case: Case) -> dict:
    """Largest |ours - peer| / max|peer| over the forward outputs of this case."""
    ours = case.outputs.get("ours")
    diffs = {}
    if ours is None:
        return diffs
    for name, out in case.outputs.items():
        if name in ("ours", "ours plain causal") or "no rope" in name:
            continue
        out = out.float()
        diffs[name] = ((ours.float() - out).abs().max() / out.abs().max().clamp(min=1e-30)).item()
    return diffs


def cpu_check(case: Case, impls: dict, backward: bool) -> list[dict]:
    """The CPU pass's correctness check, the tests' rule (README "Numerics", tests/helpers.py): gold = the reference
    computed in float64, baseline = the reference computed in the inputs' dtype; our error must stay within 2x the
    baseline's on the RMS and 4x on the largest element, plus one ulp of the inputs' dtype at the tensor's scale
    (its RMS, its largest element); for the output and, with backward, dq, dk and dv."""
    q, k, v, dout = case.materialize()

    def run(fn, dtype):
        xs = [x.detach().to(dtype).requires_grad_(backward) for x in (q, k, v)]
        out = fn(*xs)
        if not backward:
            return {"out": out.detach()}
        out.backward(dout.to(out.dtype))
        return {"out": out.detach(), "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}

    gold = run(lambda *x: case.reference(*x, torch.float64), torch.float64)
    base = run(lambda *x: case.reference(*x, case.dtype), case.dtype)
    try:
        ours = run(impls["ours"], case.dtype)
    except Exception as exc:  # ours failing is a FAIL, with the reason
        return [{"case": case.label, "tensor": "out", "ok": False, "error": describe(exc)}]
    verdicts = []
    for name, truth in gold.items():
        err_ours = (ours[name].double() - truth).abs()
        err_base = (base[name].double() - truth).abs()
        ulp = torch.finfo(case.dtype).eps
        rms_floor, max_floor = ulp * truth.square().mean().sqrt().item(), ulp * truth.abs().max().item()
        rms_ours, rms_base = err_ours.square().mean().sqrt().item(), err_base.square().mean().sqrt().item()
        max_ours, max_base = err_ours.max().item(), err_base.max().item()
        ok = bool(torch.isfinite(ours[name]).all()) and rms_ours <= 2 * rms_base + rms_floor \
            and max_ours <= 4 * max_base + max_floor
        verdicts.append({"case": case.label, "tensor": name, "ok": ok, "rms_ours": rms_ours, "rms_reference": rms_base,
                         "max_ours": max_ours, "max_reference": max_base, "rms_floor": rms_floor,
                         "max_floor": max_floor})
    return verdicts


def verdict_table(verdicts: list[dict]) -> str:
    lines = ["| case | tensor | RMS err ours | RMS err baseline | max err ours | max err baseline | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for v in verdicts:
        if "error" in v:
            lines.append(f"| {v['case']} | {v['tensor']} | {v['error']} | | | | FAIL |")
            continue
        lines.append(f"| {v['case']} | {v['tensor']} | {v['rms_ours']:.1e} | {v['rms_reference']:.1e} | "
                     f"{v['max_ours']:.1e} | {v['max_reference']:.1e} | {'pass' if v['ok'] else 'FAIL'} |")
    return "\n".join(lines)


def table(rows: list[dict], checks: dict) -> str:
    lines = ["| case | dir | impl | ms | TFLOP/s | peer / ours | peak MB | max rel diff vs ours |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        ours = next((r for r in rows if r["case"] == row["case"] and r["direction"] == row["direction"]
                     and r["impl"] == "ours"), None)
        if row["ms"] is None:
            lines.append(f"| {row['case']} | {row['direction']} | {row['impl']} | n/a | n/a | {row['error']} | | |")
            continue
        ratio = f"{row['ms'] / ours['ms']:.2f}x" if ours and ours.get("ms") and row is not ours else ""
        peak = f"{row['peak_mb']:.0f}" if "peak_mb" in row else ""
        diff = checks.get(row["case"], {}).get(row["impl"]) if row["direction"] == "fwd" else None
        diff = f"{diff:.1e}" if diff is not None else ""
        lines.append(f"| {row['case']} | {row['direction']} | {row['impl']} | {row['ms']:.3f} | "
                     f"{row['tflops']:.1f} | {ratio} | {peak} | {diff} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short subset (about 2 minutes)")
    parser.add_argument("--cpu", action="store_true", help="CPU correctness and timing pass (interpreter)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory or .json path (default bench/results; bench/results/cpu without a GPU)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which remaining peers are skipped (default 110 quick, 330 full)")
    parser.add_argument("--no-autotune", action="store_true", help="our kernels use their first config")
    parser.add_argument("--label", default="", help="kernel versions measured, recorded as kernel_version")
    parser.add_argument("--only", default="",
                        help="comma-separated case kinds to run (longrope, rerope, leaky, models)")
    parser.add_argument("--max-n", type=int, default=None, help="skip cases longer than this")
    parser.add_argument("--models", default="", help="comma-separated model names of the models cases (default all)")
    args = parser.parse_args()
    if args.no_autotune:
        os.environ["SCALED_ROPE_AUTOTUNE"] = "0"
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"

    import triton

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
           "autotune": not args.no_autotune}
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    if device == "cpu":
        print("No GPU: CPU correctness + timing pass (reference, eager rope + SDPA math, our kernels in Triton's "
              "interpreter, fp32, tiny shapes). These times say nothing about GPU performance.")
    budget = args.budget if args.budget is not None else (110.0 if args.quick else 330.0)
    start = time.time()
    rows, checks, verdicts = [], {}, []
    kinds = {kind for kind in args.only.split(",") if kind}
    unknown = kinds - {"longrope", "rerope", "leaky", "models"}
    if unknown:
        parser.error(f"--only takes longrope, rerope, leaky, models; got {sorted(unknown)}")
    for case, directions in plan(args.quick, device):
        if (kinds and case.kind not in kinds) or (args.max_n is not None and case.n > args.max_n):
            continue
        if args.models and case.model is not None and case.model not in args.models.split(","):
            continue
        impls = implementations(case)
        for backward in directions:
            for name, fn in impls.items():
                if backward and name in FORWARD_ONLY and case.kind != "models":
                    continue
                elapsed = time.time() - start
                if not name.startswith("ours") and elapsed > budget and device == "cuda":
                    entry = {"case": case.label, "direction": "fwd+bwd" if backward else "fwd", "impl": name,
                             "ms": None, "error": f"skipped: time budget ({budget:.0f} s) spent"}
                else:
                    entry = run_one(case, name, fn, backward)
                rows.append(entry)
                shown = f"{entry['ms']:.3f} ms, {entry['tflops']:.1f} TFLOP/s" if entry["ms"] else entry["error"]
                print(f"[{time.time() - start:6.1f}s] {case.label} {entry['direction']}: {name}: {shown}", flush=True)
        checks[case.label] = check(case)
        if device == "cpu":
            verdicts += cpu_check(case, impls, backward=any(directions))
        case.release()

    print()
    print(table(rows, checks))
    extra = {}
    if device == "cpu":
        passed = bool(verdicts) and all(v["ok"] for v in verdicts)
        extra = {"cpu_check": verdicts, "verdict": "PASS" if passed else "FAIL"}
    path = write_results(args.out, "attention", env["device"],
                         {"date": today(), "env": env, "kernel_version": args.label, "quick": args.quick,
                          "seconds": time.time() - start,
                          "flops": "4*B*H*N^2*D/2 forward (causal), 3.5x for forward+backward",
                          "results": rows, "max_rel_diff_vs_ours": checks, **extra},
                         suffix=("-quick" if args.quick else "") + ("-" + "-".join(sorted(kinds)) if kinds else "")
                         + (f"-max{args.max_n}" if args.max_n is not None else ""))
    print(f"\nwrote {path} ({time.time() - start:.0f} s)")
    if device == "cpu":
        print("\nCorrectness of our kernels (Triton interpreter), the tests' rule: error against the reference in "
              "float64 <= 2x the error of the reference in float32 (baseline) on the RMS, 4x on the largest element, "
              "+ one float32 ulp at the tensor's scale:\n")
        print(verdict_table(verdicts))
        failed = sum(not v["ok"] for v in verdicts)
        print(f"\nCPU correctness check: {extra['verdict']} ({len(verdicts) - failed} of {len(verdicts)} checks "
              "passed)" + ("" if verdicts else ": nothing was checked"))
        return 0 if extra["verdict"] == "PASS" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
