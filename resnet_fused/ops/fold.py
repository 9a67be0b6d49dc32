"""BatchNorm over running statistics as a per-channel scale and shift, and
folded into a convolution: the one place these formulas live."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor


def scale_shift(
    weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
    conv_bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """fp32 `(scale, shift)` of an eval-mode BatchNorm over a convolution's
    output without its bias: `scale = γ / sqrt(var + eps)`,
    `shift = β − mean·scale (+ conv_bias·scale)`, differentiable in γ, β and
    the bias. The order ATen's eval-mode batch_norm uses, so `y * scale +
    shift` has its bits; the Triton kernels fold the same formula in their
    epilogue (ops/triton/fold.py `channel_affine`)."""
    scale = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        scale = weight.float() * scale
    shift = -running_mean.float() * scale
    if bias is not None:
        shift = bias.float() + shift
    if conv_bias is not None:
        shift = shift + conv_bias.float() * scale
    return scale, shift


def bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """fp32 `(scale, shift)` of a BatchNorm2d/FrozenBatchNorm2d over running
    stats, from the module's current tensors (see `scale_shift`)."""
    return scale_shift(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def conv_scale_shift(conv: nn.Conv2d, bn: Optional[nn.Module]) -> tuple[Tensor, Tensor]:
    """(scale, shift) of `bn(conv(x))` over `conv(x)` without its bias: the
    conv bias, if any, scaled into the shift. No `bn` (a plain convolution,
    e.g. a feature pyramid's): scale 1, shift the conv bias (or 0)."""
    if bn is None:
        w = conv.weight
        bias = conv.bias.float() if conv.bias is not None else w.new_zeros(w.shape[0], dtype=torch.float32)
        return torch.ones_like(bias), bias
    return scale_shift(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, conv.bias)


def folded(conv: nn.Conv2d, bn: Optional[nn.Module]) -> tuple[Tensor, Tensor]:
    """fp32 (BN-scaled conv weight, shift): `bn(conv(x)) == conv2d(x, weight) + shift`
    (no `bn`: the conv's own weight and bias)."""
    scale, shift = conv_scale_shift(conv, bn)
    if bn is None:
        return conv.weight.float(), shift
    return conv.weight.float() * scale.view(-1, 1, 1, 1), shift
