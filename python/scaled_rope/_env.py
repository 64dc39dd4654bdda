"""Every environment switch that scaled_rope reads at run time, each read here and nowhere else.

The README's "Environment switches" table documents them. Each function reads its switch when called, so tests and
tools may change a switch between calls; the Triton kernel modules call `triton_interpret()` once at import,
because it decides how their kernels are built (Triton itself reads TRITON_INTERPRET when a kernel is defined).
Two switches are also read by the CUDA extension itself at each launch (csrc: flash_fwd_sm90.cu, flash_common.cuh):
SCALED_ROPE_FLASH_SM80 and SCALED_ROPE_L2_SECTION_HEADS. The build-time switches SCALED_ROPE_CUDA_ARCHS and
SCALED_ROPE_SKIP_CUDA belong to setup.py, which cannot import the package.

Nothing here imports the rest of the package: the kernel modules import it.
"""
from __future__ import annotations

import os

_KERNEL_CONFIG_SWITCHES = {"fwd": "SCALED_ROPE_FWD_CONFIG", "dkdv": "SCALED_ROPE_DKDV_CONFIG",
                           "dq": "SCALED_ROPE_DQ_CONFIG"}


def _flag(value: str | None) -> bool:
    """Set means a value other than "" or one starting with "0"."""
    return bool(value) and not value.startswith("0")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in Triton's CPU interpreter (CPU tensors; tests only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def direct_launch() -> bool:
    """SCALED_ROPE_JIT_LAUNCH=1: a DecodePlan launches through Triton's JIT call every time instead of the compiled
    kernel's own launcher after its first call (measurements of the launch's host cost)."""
    return not _flag(os.environ.get("SCALED_ROPE_JIT_LAUNCH"))


def poison_outputs() -> bool:
    """SCALED_ROPE_POISON=1: kernel outputs start as NaN, so an element a kernel forgets to write fails a test."""
    return os.environ.get("SCALED_ROPE_POISON") == "1"


def autotune() -> bool:
    """SCALED_ROPE_AUTOTUNE=0: the Triton attention kernels use the first config that fits, without tuning."""
    return os.environ.get("SCALED_ROPE_AUTOTUNE", "1") != "0"


def forced_config(kernel: str) -> tuple[str, str]:
    """(name, value) of SCALED_ROPE_FWD_CONFIG / SCALED_ROPE_DKDV_CONFIG / SCALED_ROPE_DQ_CONFIG for kernel "fwd",
    "dkdv" or "dq": "BLOCK_M,BLOCK_N,num_warps,num_stages" forces that one Triton config ("" when unset)."""
    name = _KERNEL_CONFIG_SWITCHES[kernel]
    return name, os.environ.get(name, "")


def l2_section_heads() -> int | None:
    """SCALED_ROPE_L2_SECTION_HEADS=N: heads per L2 section of the attention tile order (both backends), for
    measurements; None when unset."""
    text = os.environ.get("SCALED_ROPE_L2_SECTION_HEADS")
    if not text:
        return None
    try:
        heads = int(text)
    except ValueError:
        heads = 0
    if heads < 1:
        raise ValueError(f"SCALED_ROPE_L2_SECTION_HEADS must be an integer >= 1, got {text!r}")
    return heads


def flash_sm80() -> bool:
    """SCALED_ROPE_FLASH_SM80=1: the CUDA attention runs its sm_80 kernel on a Hopper GPU too."""
    return _flag(os.environ.get("SCALED_ROPE_FLASH_SM80"))


def rotation_passes() -> bool:
    """SCALED_ROPE_ROTATION_PASSES=1: the CUDA attention rotates q and k in passes of their own (csrc/rope.cu) where
    its sm_90a kernels would rotate them on-chip (measurements, and the tests of that path)."""
    return _flag(os.environ.get("SCALED_ROPE_ROTATION_PASSES"))
