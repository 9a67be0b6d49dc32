"""The backward of `ops.conv_bn_act`, so that calls autograd records through
run a backend's fused forward instead of the unfused reference composition.

Those calls are BN-in-eval fine-tuning (FrozenBatchNorm2d backbones, as
torchvision's detection models train them; eval-mode BatchNorm2d whose γ/β
reach `scale`/`shift` through `ops/fold.py`) and eval-mode forwards that want
input gradients. The kernel backends' forwards (an in-place epilogue, a Triton
kernel) have no autograd of their own; this Function gives them one:

    forward:  the backend's implementation, run with grad mode off (autograd
              runs Function.forward so), hence its kernels, not its reference
              fallback. Saved: x and weight (inputs, no new memory), scale,
              and the output only for ReLU's mask.
    backward: g = threshold_backward(grad, out, 0) with ReLU (torch.relu's own
              backward, NaN outputs pass their gradient), else grad;
              residual: g (channels [offset, offset + C_r) of a narrower one);
              shift:    Σ_{n,p,q} g;
              x, weight: convolution_backward of g·scale[k];
              scale:    Σ_{n,p,q} g·conv2d(x, weight) — the one convolution
                        recomputed, and only when scale needs a gradient
                        (with frozen BN it never does).
Sums and the g·scale product run in fp32 (fp64 for double, which gradcheck
uses) and each gradient comes back in its input's dtype. The backward is
made of differentiable torch ops, so double backward (create_graph=True)
and torch.func.grad work through it; the ReLU mask is piecewise constant in
the saved output, so nothing is lost by differentiating it as a constant.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_fused.ops import common


def applies(impl: Callable, x: Tensor, *tensors: Optional[Tensor]) -> bool:
    """Whether `ops.conv_bn_act` runs backend implementation `impl` through
    this Function: autograd records through the call, and
    * impl is not differentiable itself (the eager backend's reference is a
      torch composition autograd records through as it is);
    * the kernels take x's dtype (float64 keeps the reference: their epilogue is fp32);
    * not under torch.compile: Inductor builds the backward from the
      reference composition the kernel backends hand it when grad is
      recorded, and would have to treat this Function as opaque;
    * not under torch.jit.trace: a Python Function is an opaque PythonOp in a
      traced graph, which can then not be saved; the reference is traced instead;
    * no forward-mode AD or torch.func transform (`common.transformed`): this
      Function has no jvp and no batching rule; the reference composition has both."""
    return (
        common.records_grad(x, *tensors)
        and not getattr(impl, "differentiable", False)
        and common.conv_bn_act_kernels_take(x)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not common.transformed()
    )


def conv_bn_act(
    run: Callable, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
    residual_channel_offset: Optional[int],
) -> Tensor:
    """`run(x, weight, scale, shift, residual)`, the forward (a backend's
    implementation with the call's other arguments bound, see
    `ops.conv_bn_act`), with the backward above. `residual` may be narrower
    than the output (`residual_channel_offset`, handled by `run`)."""
    return _ConvBnAct.apply(
        run, x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, residual_channel_offset
    )


def _channel(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


class _ConvBnAct(torch.autograd.Function):
    @staticmethod
    def forward(run, x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, offset):
        return run(x, weight, scale, shift, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, offset = inputs
        ctx.save_for_backward(x, weight, scale, output if relu else None)
        ctx.relu, ctx.conv = relu, (stride, padding, dilation, groups)
        ctx.shift_dtype = shift.dtype
        ctx.residual = None if residual is None else (residual.dtype, residual.shape[1], offset)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale, out = ctx.saved_tensors
        _, need_x, need_weight, need_scale, need_shift, need_residual = ctx.needs_input_grad[:6]
        stride, padding, dilation, groups = ctx.conv
        g = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
        acc = torch.promote_types(g.dtype, torch.float32)
        grad_x = grad_weight = grad_scale = grad_shift = grad_residual = None
        if need_residual:
            dtype, channels, offset = ctx.residual
            grad_residual = (g if offset is None else g[:, offset:offset + channels]).to(dtype)
        if need_shift:
            grad_shift = g.sum((0, 2, 3), dtype=acc).to(ctx.shift_dtype)
        if need_x or need_weight:
            # computed in acc, rounded once to g's dtype
            g_conv = (g * _channel(scale, acc)).to(g.dtype)
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                g_conv, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [need_x, need_weight, False],
            )
        if need_scale:
            y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
            grad_scale = (g.to(acc) * y.to(acc)).sum((0, 2, 3)).to(scale.dtype)
        return None, grad_x, grad_weight, grad_scale, grad_shift, grad_residual, *([None] * 6)
