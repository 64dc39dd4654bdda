"""Output allocation shared by the kernel launchers.

With SCALED_ROPE_POISON=1 (the test suites set it) outputs start as NaN, so an element a kernel forgets to
write fails the comparison instead of passing by luck.
"""
from __future__ import annotations

import os

import torch


def poisoning() -> bool:
    return os.environ.get("SCALED_ROPE_POISON") == "1"


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if poisoning() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
