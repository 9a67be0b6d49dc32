"""The `eager` backend: fused ops written as compositions of torch ops.

This is the ground truth every other backend is tested against, and the
fallback that always works. It follows the numerics contract: the epilogue
runs in fp32 (fp64 for double inputs) and rounds once to the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    relu: bool,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    acc = torch.promote_types(y.dtype, torch.float32)
    # `out` is a fresh tensor, so the residual add and ReLU can run in place
    # (fewer passes and allocations; autograd is unaffected).
    out = torch.addcmul(_channel(shift.to(acc)), y.to(acc), _channel(scale.to(acc)))
    if residual is not None:
        out.add_(residual.to(acc))
    if relu:
        out.relu_()
    return out.to(y.dtype)


# autograd records through the torch ops above: ops.conv_bn_act calls it as it
# is, with grad too (no ops/conv_grad.py Function around it)
conv_bn_act.differentiable = True


def batch_norm_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
) -> Tensor:
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    return out
