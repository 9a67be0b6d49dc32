"""conv → BN(batch statistics) [+ residual] → ReLU for training, saving no
convolution output: the convolution is recomputed in backward.

Eager torchvision (and the plain fused path) keeps, per conv+BN pair, the
convolution output for BN's backward. With a true ReLU that tensor cannot be
rebuilt from the block's output (x̂ is lost wherever the ReLU output is 0),
so this op keeps only what the graph holds anyway — the convolution's input
(the previous layer's output, which the convolution needs for its weight
gradient) and this op's output (the next layer's input) — plus 2·C
statistics, and recomputes the convolution in backward: one extra
convolution forward per pair, for one activation tensor fewer per pair.

A backend supplies the BN half as `batch_norm_act_parts`: a (forward,
backward) pair of functions,
    forward(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu)
        -> (out, mean, invstd)          # and updates the running statistics
    backward(grad_out, x, out, weight, mean, invstd, eps, relu, residual_grad)
        -> (grad_x, grad_weight, grad_bias, grad_residual or None)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_fused.ops.common import memory_format


def eager_forward(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu):
    if x.numel() == 0:
        # native_batch_norm refuses an empty batch; F.batch_norm gives an
        # empty output and leaves the running statistics alone
        out = F.batch_norm(x, None, None, weight, bias, True, momentum, eps)
        stats = torch.zeros(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        mean, invstd = stats, stats
    else:
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    return out, mean, invstd


def eager_backward(grad_out, x, out, weight, mean, invstd, eps, relu, residual_grad):
    # torch's ReLU backward: 0 where out <= 0 (a NaN output passes its gradient)
    grad = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    if x.numel() == 0:  # as autograd through F.batch_norm's empty-batch output
        zeros = None if weight is None else torch.zeros_like(weight)
        return torch.zeros_like(x), zeros, zeros, (grad if residual_grad else None)
    grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        grad, x, weight, None, None, mean, invstd, True, eps, [True, weight is not None, weight is not None]
    )
    return grad_x, grad_w, grad_b, (grad if residual_grad else None)


EAGER_PARTS = (eager_forward, eager_backward)


class ConvBatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, residual, parts, running_mean, running_var, momentum, eps,
                relu, stride, padding, dilation, groups):
        bn_forward, bn_backward = parts
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        out, mean, invstd = bn_forward(y, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual, relu)
        del y  # the point of this op: the convolution output is not kept
        ctx.save_for_backward(x, weight, bn_weight, out if relu else None, mean, invstd)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bn_backward, ctx.eps, ctx.relu = bn_backward, eps, relu
        ctx.has_residual = residual is not None
        ctx.bn_dtypes = (None if bn_weight is None else bn_weight.dtype, None if bn_bias is None else bn_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bn_weight, out, mean, invstd = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_g, need_b, need_r = ctx.needs_input_grad[:5]
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups)  # recomputed
        out = y if out is None else out  # unread without ReLU
        grad_y, grad_g, grad_b, grad_r = ctx.bn_backward(
            grad_out.contiguous(memory_format=memory_format(y)), y, out, bn_weight, mean, invstd, ctx.eps, ctx.relu,
            ctx.has_residual and need_r,
        )
        del y
        grad_x = grad_w = None
        if need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_y, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
                [need_x, need_w, False],
            )
        g_dtype, b_dtype = ctx.bn_dtypes
        return (
            grad_x,
            grad_w,
            grad_g.to(g_dtype) if need_g and grad_g is not None else None,
            grad_b.to(b_dtype) if need_b and grad_b is not None else None,
            grad_r if need_r else None,
            None, None, None, None, None, None, None, None, None, None,
        )


def conv_bn_act_train(
    parts, x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
    residual: Optional[Tensor], relu, stride, padding, dilation, groups,
) -> Tensor:
    return ConvBatchNormAct.apply(
        x, weight, bn_weight, bn_bias, residual, parts, running_mean, running_var, momentum, eps,
        relu, stride, padding, dilation, groups,
    )
