"""`apply_scaled_rope`: the standalone rotation (unfused building block) with reference, Triton and CUDA backends."""
from __future__ import annotations

import torch

from . import _ops
from ._plan import rotation_plan
from .scaling import RopeScaling


def apply_scaled_rope(x: torch.Tensor, rope: RopeScaling, positions: torch.Tensor | None = None, *,
                      seq_lens: torch.Tensor | int | None = None, inverse: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """Rotate x (B, N, H, D) by `rope` at integer positions (B, N) (default 0..N-1); returns x's dtype.

    seq_lens (int or (B,) int tensor) picks each row's frequency set for LongRoPE and dynamic NTK (default: the
    schedule's default set; a length below 0 counts as 0). inverse=True applies the transpose (the gradient map).
    Differentiable. backend: "auto" (cuda -> triton -> reference), "cuda", "triton" or "reference"; an explicit
    backend that cannot run x raises BackendUnsupported naming why.
    """
    plan = rotation_plan(x, rope, positions, seq_lens=seq_lens, inverse=inverse, backend=backend)
    return _ops.rotate(plan)
