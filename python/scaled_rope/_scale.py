"""softmax_scale as every kernel takes it, positive, with its sign moved into q: the plan folds it once per call,
the launchers apply the sign to the rotated q with `signed`."""
from __future__ import annotations

import math

from .triton_kernels._host import signed  # noqa: F401  (the CUDA launchers apply the sign with the same helper)

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
