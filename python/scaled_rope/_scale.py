"""softmax_scale as every kernel takes it, positive, with its sign moved into q (Triton and CUDA launchers)."""
from __future__ import annotations

import math

import torch

_SMALLEST_NORMAL_FP32 = 2.0 ** -126


def fold_scale_sign(softmax_scale: float) -> tuple[float, float]:
    """(sign, scale): the rotated q is multiplied by sign (1, -1 or 0) and the kernels use scale > 0, so that
    scale * <q, k> = |scale| * <sign q, k> and a masked score (-inf) stays -inf after scaling. A scale below
    float32's smallest normal (which the kernels would flush to 0, turning -inf * 0 into NaN) counts as 0; scale 0
    is carried out as q zeroed and scale 1: every score 0, the uniform softmax over the allowed keys. NaN passes
    through for the kernels' own checks."""
    scale = float(softmax_scale)
    if abs(scale) < _SMALLEST_NORMAL_FP32:
        return 0.0, 1.0
    return math.copysign(1.0, scale), abs(scale)


def signed(x: torch.Tensor, source: torch.Tensor, sign: float) -> torch.Tensor:
    """x times sign: in place when x is a launcher's scratch buffer, a copy when it is the caller's tensor (source)."""
    if sign == 1.0:
        return x
    return x * sign if x is source else x.mul_(sign)
