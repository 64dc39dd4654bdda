"""Backends as plug-ins: what a backend receives (the calls), what it provides, and the one choice policy.

A backend (reference, triton, cuda) says which inputs it can run (`*_support`, a reason or None) and provides
the forward and backward of attention, attention over a KV cache, and the standalone rotation. Every entry point
picks its backend with `choose`: an explicitly requested backend that cannot run the inputs raises
`BackendUnsupported` naming why; "auto" takes the first backend of the measured order (`auto_order`) that can,
and the reference otherwise. Calls are checked by the plan (scaled_rope._plan) before they get here.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from . import _env
from .scaling import RopeScaling
from .tables import RotaryTables, TableSet

NAMES = ("auto", "cuda", "triton", "reference")


class BackendUnsupported(NotImplementedError, ValueError):
    """An explicitly requested backend cannot run these inputs (catchable as either exception type)."""


# ---- what a backend receives ----------------------------------------------------------------------------------
class AttentionCall(NamedTuple):
    """One `scaled_rope_attention` call, checked. Positions None: the default (k = 0..Nk-1, q = the last Nq of
    those). tables: the kernels' rotation tables (None without a rope, and for the reference, which rotates from
    `rope` itself). softmax_scale = q_sign * kernel_scale with kernel_scale > 0 (scaled_rope._scale)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_positions: torch.Tensor | None
    k_positions: torch.Tensor | None
    tables: TableSet | None
    rope: RopeScaling | None
    causal: bool
    window: int | None
    rerope_window: int | None
    rerope_leak: float | None
    logn_base: float | None
    softmax_scale: float
    q_sign: float
    kernel_scale: float
    xpos_scale_base: float | None = None


class KVCacheCall(NamedTuple):
    """One `scaled_rope_attention_with_kvcache` call, checked: row b has cache_seqlens[b] + Nnew keys after the
    append; tables are those of the rows at these lengths (None without a rope, and for the reference)."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    k_new: torch.Tensor | None
    v_new: torch.Tensor | None
    block_table: torch.Tensor | None
    tables: TableSet | None
    rope: RopeScaling | None
    causal: bool
    window: int | None
    rerope_window: int | None
    rerope_leak: float | None
    logn_base: float | None
    softmax_scale: float
    xpos_scale_base: float | None = None


class RotationCall(NamedTuple):
    """One `apply_scaled_rope` call, checked. positions None: 0..N-1; tables: the kernels' (None for the
    reference); seq_lens: each row's length for the frequency set (an int, an int tensor (B,) or None)."""

    x: torch.Tensor
    positions: torch.Tensor | None
    tables: RotaryTables | None
    rope: RopeScaling
    seq_lens: torch.Tensor | int | None
    inverse: bool


# ---- what a backend provides ----------------------------------------------------------------------------------
class Backend:
    """A backend's operations; the support checks take plain values so that they can be decided once per input
    kind (and be constants under torch.compile)."""

    name = ""
    needs_tables = True  # whether its calls carry rotation tables (the reference rotates from the rope itself)
    # xPos (xpos_scale_base) per op: the position modes it runs, "default" (no positions given) and/or "explicit"
    xpos_modes: dict = {}

    def attention_support(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        raise NotImplementedError

    def attention_forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out (B, Nq, Hq, D), lse (B, Hq, Nq) float32 natural log, residual): residual (float32,
        `residual_shape`, or None when that is (0,)) is what the backward takes besides out and lse."""
        raise NotImplementedError

    def residual_shape(self, q: torch.Tensor) -> tuple[int, ...]:
        """The residual's shape for queries like q (B, Nq, Hq, D)."""
        return (0,)

    def attention_backward(self, call: AttentionCall, out: torch.Tensor, lse: torch.Tensor, residual: torch.Tensor,
                           dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(dq, dk, dv) for the unrotated inputs, given the gradients of out and (or None) of lse."""
        raise NotImplementedError

    def kvcache_support(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        return f"backend={self.name!r} has no KV-cache kernel"

    def attention_with_kvcache(self, call: KVCacheCall) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def rotation_support(self, device: torch.device, dtype: torch.dtype) -> str | None:
        raise NotImplementedError

    def rotate(self, call: RotationCall) -> torch.Tensor:
        raise NotImplementedError

    def support(self, op: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                xpos: str | None = None) -> str | None:
        if op == "attention":
            reason = self.attention_support(device, dtype, head_dim)
        elif op == "kvcache":
            reason = self.kvcache_support(device, dtype, head_dim)
        else:
            return self.rotation_support(device, dtype)
        if reason is None and xpos is not None and xpos not in self.xpos_modes.get(op, ()):
            positions = "explicit positions" if xpos == "explicit" else "default positions"
            reason = f"backend={self.name!r} has no xPos kernel (xpos_scale_base) for {op} with {positions}"
        return reason


_LOADED: dict = {}


def get(name: str) -> Backend:
    """The backend called `name` (its module is imported on first use: triton need not be installed)."""
    backend = _LOADED.get(name)
    if backend is None:
        if name == "reference":
            from ._backend_reference import ReferenceBackend as cls
        elif name == "triton":
            from ._backend_triton import TritonBackend as cls
        elif name == "cuda":
            from ._backend_cuda import CudaBackend as cls
        else:
            raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
        backend = _LOADED[name] = cls()
    return backend


# ---- the choice policy ----------------------------------------------------------------------------------------
_CUDA_FIRST_HEAD_DIMS = (96, 128)  # where the sm_90a kernels beat Triton's (auto_order says by how much)


def auto_order(op: str, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool) -> tuple:
    """The backends "auto" tries, fastest first; the reference comes after them.

    attention, by measurement (bench/results/attention-2026-11-22-*-{longrope,leaky-rerope}.json, H100, bf16
    causal forward): where the sm_90a CUDA kernel runs the inputs its forward beats Triton's at every measured shape
    (LongRoPE B1 H32 N16k D128: 550 vs 493 TFLOP/s, B4 N4k 1.34 vs 1.40 ms; ReRoPE N4k-128k 0.93-0.97x of its time).
    The same holds with a gradient: the CUDA backend's backward is the sm_90a backward where it runs the inputs
    (head_dim 96 or 128, default positions, no ReRoPE), else Triton's on the CUDA forward's out and lse, so training
    keeps the faster forward (bench/results/attention-2026-12-04-nvidia-h200-models.json: "ours (cuda)" against
    "ours (triton)"). head_dim 96 runs the sm_90a forward and backward in 128-column tiles: Phi-3's shape at B1
    N16k, 3.90 vs 4.22 ms forward and 14.60 vs 19.13 forward + backward against Triton
    (attention-2026-12-05-nvidia-h100-80gb-hbm3-models.json). Triton goes first for head_dim 64: the sm_90a
    kernel there is no faster than Triton's (same file, Llama-3.2-1B's heads: 2.80 vs 2.66 ms at B1 N16k) and the
    sm_80 one slower (210 vs 338 TFLOP/s at B8 H16 N4k), and on other GPUs.
    KV cache: only Triton has a decode kernel. Rotation: the CUDA kernel, then Triton's.
    """
    if op == "attention":
        from ._cuda import sm90_kernel_applies

        if device.type == "cuda" and head_dim in _CUDA_FIRST_HEAD_DIMS and sm90_kernel_applies(device, dtype, head_dim):
            return ("cuda", "triton")
        return ("triton", "cuda")
    if op == "kvcache":
        return ("triton", "cuda")
    return ("cuda", "triton")


class Choice(NamedTuple):
    backend: str | None  # None: the requested backend cannot run the inputs
    passed_over: dict  # backend name -> why it was not taken (read-only: shared between calls)
    needs_tables: bool = False  # the chosen backend's calls carry rotation tables


@lru_cache(maxsize=1024)
def _choose(op: str, requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool,
            xpos: str | None, switches: tuple) -> Choice:
    """`choose` for one kind of input; `switches` (the environment switches that decide it) is part of the key
    only, so that a changed switch is seen."""
    if requested != "auto":
        reason = get(requested).support(op, device, dtype, head_dim, xpos)
        return Choice(requested, {}, get(requested).needs_tables) if reason is None else \
            Choice(None, {requested: reason})
    passed_over = {}
    for name in auto_order(op, device, dtype, head_dim, needs_grad):
        reason = get(name).support(op, device, dtype, head_dim, xpos)
        if reason is None:
            return Choice(name, passed_over, get(name).needs_tables)
        passed_over[name] = reason
    return Choice("reference", passed_over, get("reference").needs_tables)


@torch.compiler.assume_constant_result
def choose(op: str, requested: str, device: torch.device, dtype: torch.dtype, head_dim: int,
           needs_grad: bool = False, xpos: str | None = None) -> Choice:
    """The backend for op ("attention", "kvcache" or "rotation") on inputs of this device, dtype and head dim
    (xpos: None, or xPos with "default" or "explicit" positions), and why each backend tried before it was passed
    over. A constant under torch.compile."""
    switches = (_env.triton_interpret(), _env.flash_sm80())
    return _choose(op, requested, device, dtype, head_dim, needs_grad, xpos, switches)


def resolve(op: str, requested: str, device: torch.device, dtype: torch.dtype, head_dim: int,
            needs_grad: bool = False, xpos: str | None = None) -> Choice:
    """`choose`, raising BackendUnsupported when the requested backend cannot run the inputs."""
    choice = choose(op, requested, device, dtype, head_dim, needs_grad, xpos)
    if choice.backend is None:
        raise BackendUnsupported(f"backend={requested!r} cannot run these inputs: {choice.passed_over[requested]}")
    return choice
