"""The `cpu` backend's module-level inference op: one oneDNN (or Winograd)
call per conv+BN pair on cached, folded weights (`onednn`), with the residual
and ReLU as post-ops.

`resnet_fused.layers.conv_norm_act` calls `conv_bn_act_module` when the
forward's plan (`resnet_fused.plan.Plan.cpu_inference`) says the cpu backend
serves it and the norm uses running statistics; None sends the pair to
`ops.conv_bn_act` (the composed path).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from resnet_fused import ops
from resnet_fused.ops import common, extension
from resnet_fused.ops.cpu import onednn


def conv_bn_act_module(
    conv: nn.Conv2d, norm: Optional[nn.Module], x: Tensor, residual: Optional[Tensor], relu: bool,
    autocast: Optional[torch.dtype], consume_residual: bool,
) -> Optional[Tensor]:
    """`act(norm(conv(x)) + residual)` as one call, for a CPU `x` with no
    gradient recorded through the call (`norm` None: a plain convolution
    with its bias, `layers.conv_add`). oneDNN's blocked-weight convolutions
    and the Winograd kernel work in channels_last: any other layout is
    copied to it and the output back to NCHW (the layout out is the layout
    in, and the values are those of a channels_last call: a traced graph or a
    hooked model given NCHW gives the bits of the model's own forward). `autocast`: the CPU autocast dtype
    in force, or None. None where the path does not apply: dtypes other
    than fp32/bf16, and NaN or infinity in x, the residual or the folded
    weights — the composed path keeps them where torch would, oneDNN's ReLU
    post-op and Winograd do not (one summing pass over x and the residual
    looks)."""
    if x.dim() != 4:
        return None
    if common.records_grad(x, residual, conv.weight, conv.bias, getattr(norm, "weight", None), getattr(norm, "bias", None)):
        return None
    dtype = x.dtype if autocast is None else autocast
    if dtype not in onednn.DTYPES or (autocast is None and conv.weight.dtype != x.dtype):
        return None
    # Bad input gets the errors every backend gives (not oneDNN's): the full
    # checks run whenever a cheap look finds something off, and raise.
    w = conv.weight
    if x.shape[1] != w.shape[1] * conv.groups or not x.is_floating_point():
        ops.check_conv(x, w, conv.stride, conv.padding, conv.dilation, conv.groups, autocast=False)
    out_shape = ops.conv_out_shape(x, w, conv.stride, conv.padding, conv.dilation)
    if out_shape[2] < 1 or out_shape[3] < 1:
        ops.check_conv(x, w, conv.stride, conv.padding, conv.dilation, conv.groups, autocast=False)
    if residual is not None and (
        not isinstance(residual, Tensor) or tuple(residual.shape) != out_shape or residual.device != x.device
        or not residual.is_floating_point()
    ):
        ops.check_residual(residual, out_shape, x)
    packed = onednn.pack(conv, norm, dtype, tuple(x.shape))
    if not (packed.finite and onednn.all_finite(x) and (residual is None or onednn.all_finite(residual))):
        return None
    if x.is_contiguous(memory_format=torch.channels_last):
        return onednn.conv_bn_act(x.to(dtype), packed, residual, relu, consume_residual)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    return onednn.conv_bn_act(x, packed, residual, relu).contiguous()


def max_pool(pool: nn.MaxPool2d, x: Tensor) -> Optional[Tensor]:
    """The stem's max-pool for channels_last fp32/bf16 CPU activations with no
    gradient recorded: the extension's kernel, which gives the same values
    without computing the indices ATen's max_pool2d makes and drops (a
    quarter of the time); None where it does not apply."""
    if (
        pool.return_indices
        or common.records_grad(x)
        or x.dtype not in onednn.DTYPES
        or x.dim() != 4
        or not x.is_contiguous(memory_format=torch.channels_last)
        or not extension.has_kernel("max_pool2d", "CPU")
    ):
        return None
    return extension.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
