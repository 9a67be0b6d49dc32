"""BatchNorm over running statistics as a per-channel scale and shift, and
folded into a convolution: the one place these formulas live."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """fp32 `(scale, shift)` of a BatchNorm2d/FrozenBatchNorm2d over running stats.

    `scale = γ / sqrt(var + eps)`, `shift = β − mean·scale`, computed from the
    module's current tensors (differentiable in γ and β). The order ATen's
    eval-mode batch_norm uses, so `y * scale + shift` has its bits.
    """
    var = bn.running_var.float()
    mean = bn.running_mean.float()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.float() * scale
    shift = -mean * scale
    if bn.bias is not None:
        shift = bn.bias.float() + shift
    return scale, shift


def conv_scale_shift(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of `bn(conv(x))` over `conv(x)` without its bias: the
    conv bias, if any, scaled into the shift."""
    scale, shift = bn_scale_shift(bn)
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    return scale, shift


def folded(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """fp32 (BN-scaled conv weight, shift): `bn(conv(x)) == conv2d(x, weight) + shift`."""
    scale, shift = conv_scale_shift(conv, bn)
    return conv.weight.float() * scale.view(-1, 1, 1, 1), shift
