"""Argument checks shared by the rotation launchers (Triton `rotate` and CUDA `cuda_rotate`).

Batch-indexed inputs (positions, turns, offset, attention_factor) may have a leading dim of 1 or a stride of 0
(expanded views): the launchers pass their batch strides, so one row is read by every batch row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _alloc

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class RotationArgs:
    x: torch.Tensor
    out: torch.Tensor
    positions: torch.Tensor          # (B, N) int32/int64 (stride_pb may be 0)
    turns: torch.Tensor              # (B, R/2) int64, last dim contiguous
    offset: torch.Tensor | None      # (B, R/2) int64, last dim contiguous
    turns_unscaled: torch.Tensor | None  # (R/2,) int64, contiguous
    factor: torch.Tensor             # (B,) float32
    rotary_dim: int
    n_hat: int
    interleaved: bool
    stride_pb: int
    stride_tb: int
    stride_offb: int
    stride_fb: int


def _rows(name: str, t: torch.Tensor, batch: int, width: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, int]:
    """Check a (B or 1, width) table of `dtype`; returns it with a contiguous last dim and its row stride."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 1:
        t = t[None, :]
    if t.dim() != 2 or t.shape[1] != width or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape ({batch}, {width}) or ({width},), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if width > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] == batch and batch > 1 else 0)


def check_rotation_args(x: torch.Tensor, positions: torch.Tensor, tables, out: torch.Tensor | None) -> RotationArgs:
    """Validate the inputs of a rotation kernel (ValueError/TypeError naming the argument)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, N, H, D), got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32 for the rotation kernels, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dimension, got strides {x.stride()}")
    batch, seqlen, _, head_dim = x.shape
    device = x.device

    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.dim() != 2 or positions.shape[1] != seqlen or positions.shape[0] not in (1, batch):
        raise ValueError(f"positions must have shape ({batch}, {seqlen}), got {tuple(positions.shape)}")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device} but x is on {device}")
    stride_pb = positions.stride(0) if positions.shape[0] == batch and batch > 1 else 0

    rotary_dim = int(tables.rotary_dim)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"tables.rotary_dim must be even, positive and <= head_dim {head_dim}, got {rotary_dim}")
    half = rotary_dim // 2
    n_hat = int(tables.n_hat)
    if n_hat < 0:
        raise ValueError(f"tables.n_hat must be >= 0, got {n_hat}")
    turns, stride_tb = _rows("tables.turns", tables.turns, batch, half, torch.int64, device)
    offset, stride_offb = None, 0
    if tables.offset is not None:
        offset, stride_offb = _rows("tables.offset", tables.offset, batch, half, torch.int64, device)
    turns_unscaled = None
    if n_hat > 0:
        if tables.turns_unscaled is None:
            raise ValueError("tables.turns_unscaled is required when tables.n_hat > 0")
        turns_unscaled, _ = _rows("tables.turns_unscaled", tables.turns_unscaled, 1, half, torch.int64, device)
        if tables.offset is not None:
            raise ValueError("tables.offset must be None when tables.n_hat > 0")
    factor = tables.attention_factor
    if not isinstance(factor, torch.Tensor) or factor.dim() != 1 or factor.shape[0] not in (1, batch):
        raise ValueError(f"tables.attention_factor must be a ({batch},) tensor")
    if factor.device != device:
        raise ValueError(f"tables.attention_factor is on {factor.device} but x is on {device}")
    factor = factor.to(torch.float32)
    stride_fb = factor.stride(0) if factor.shape[0] == batch and batch > 1 else 0

    if out is None:
        out = _alloc.empty(x.shape, x.dtype, device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != x.shape or out.dtype != x.dtype or out.device != device:
            raise ValueError(f"out must match x ({tuple(x.shape)}, {x.dtype}, {device}), got "
                             f"({tuple(out.shape)}, {out.dtype}, {out.device})")
        if head_dim > 1 and out.stride(-1) != 1:
            raise ValueError(f"out must have a contiguous last dimension, got strides {out.stride()}")
    return RotationArgs(x, out, positions, turns, offset, turns_unscaled, factor, rotary_dim, n_hat,
                        bool(tables.interleaved), stride_pb, stride_tb, stride_offb, stride_fb)
