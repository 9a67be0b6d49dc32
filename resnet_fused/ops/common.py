"""What the kernel backends (`cpu`/`cuda` on `_C`, `triton`) share around
their kernels: memory-format detection, the inference op's reference
fallback, F.batch_norm's running-statistics update, and the train-mode
`batch_norm_act` built from a (forward op, backward op) pair, with its
autograd formula.

A kernel pair has the schemas of `_C`'s `batch_norm_act_fwd`/`_bwd`:
    fwd(x, weight, bias, eps, residual, relu) -> (out, mean, invstd, biased var)
    bwd(grad_out, x, out, weight, mean, invstd, relu, residual_grad)
        -> (grad_x, grad_weight, grad_bias, grad_residual or an empty tensor)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from resnet_fused.ops import reference


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor that is channels_last- but not NCHW-contiguous
    (the layout a kernel writes its output in), else contiguous_format."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def is_channels_last(t: Tensor) -> bool:
    return memory_format(t) == torch.channels_last


def records_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records through a call on `tensors`: grad mode on and
    any of them requiring grad, or a transform is active (`transformed`)
    (the one gradient gate of every fast path)."""
    if transformed():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def transformed() -> bool:
    """Forward-mode AD (an open `torch.autograd.forward_ad.dual_level`) or a
    torch.func transform (jvp, vmap, grad) is active: tangents or batch
    dimensions may ride on any tensor, which the kernels would drop
    silently; the differentiable torch composition serves instead."""
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for `device_type`, or None (autocast off,
    or a device autocast does not know, e.g. meta)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def conv_bn_act_kernels_take(x: Tensor) -> bool:
    """Whether the kernel backends' `conv_bn_act` kernels take x's dtype:
    all but float64 (their scale/shift and epilogue are fp32)."""
    return x.dtype != torch.float64


def conv_bn_act_needs_reference(x: Tensor, *tensors: Optional[Tensor]) -> bool:
    """Whether a kernel backend's `conv_bn_act` implementation hands the call
    to the differentiable reference: float64, or autograd recording through
    the call (the kernels have no autograd of their own). The public
    `ops.conv_bn_act` calls implementations with grad mode off inside the
    Function of `ops/conv_grad.py`, which is their backward, so through it
    only float64, torch.compile and torch.jit.trace reach the reference; a
    direct call of an implementation with grad stays correct by this rule."""
    return not conv_bn_act_kernels_take(x) or records_grad(x, *tensors)


def batch_norm_module_args(bn) -> tuple[Optional[Tensor], Optional[Tensor], float]:
    """(running_mean, running_var, momentum) for a batch-statistics call of
    BatchNorm module `bn`, with the module's own bookkeeping
    (num_batches_tracked) done exactly as
    torch.nn.modules.batchnorm._BatchNorm.forward does it (SyncBatchNorm's
    is the same)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if bn.training and not bn.track_running_stats:
        return None, None, factor
    return bn.running_mean, bn.running_var, factor


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float, count: int
) -> None:
    """F.batch_norm's update: unbiased variance, factor `momentum`, computed
    in the batch statistics' dtype (fp32, fp64 for double) and rounded once.
    An empty batch (count 0) leaves them alone, as F.batch_norm does."""
    if count == 0:
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        if running_mean.dtype == mean.dtype and running_var.dtype == var.dtype:
            # in place: the same rounding, two dispatches fewer per layer
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(unbiased, momentum)
        else:
            running_mean.copy_(torch.lerp(running_mean.to(mean.dtype), mean, momentum))
            running_var.copy_(torch.lerp(running_var.to(var.dtype), unbiased, momentum))


def pad_residual(residual: Optional[Tensor], channels: int, offset: int) -> Optional[Tensor]:
    """The residual as a full `channels`-channel tensor: its channels placed at
    [offset, offset + its channels), zeros elsewhere (materialised; for the
    paths whose kernels cannot read a padded residual in place)."""
    if residual is None or residual.shape[1] == channels:
        return residual
    return torch.nn.functional.pad(residual, (0, 0, 0, 0, offset, channels - offset - residual.shape[1]))


def bn_autograd(bwd: Callable) -> tuple[Callable, Callable]:
    """(setup_context, backward) for a forward kernel op, to pass to
    `torch.library.register_autograd`; `bwd` is the backward kernel op.

    Saved: x, out (the next layer's input, which it keeps anyway) and 2·C
    statistics — docs/performance.md "What training saves". out only feeds the ReLU mask,
    so without ReLU it is not kept (it would be one activation more than
    eager keeps, e.g. for the downsample BN)."""

    def setup_context(ctx, inputs, output):
        # a forward op that reads padded residuals takes one more input, the
        # residual's channel offset; its backward op then takes the
        # residual's channel count and that offset
        x, weight, bias, _eps, residual, relu, *padding = inputs
        # (offset < 0: the residual matched x; the backward op then takes defaults)
        narrow = bool(padding) and residual is not None and padding[0] >= 0
        ctx.padding = [residual.shape[1] if narrow else -1, max(padding[0], 0)] if padding else []
        out, mean, invstd, _ = output
        ctx.save_for_backward(x, out if relu else None, weight, mean, invstd)
        ctx.relu = relu
        ctx.has_residual = residual is not None
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_var):
        x, out, weight, mean, invstd = ctx.saved_tensors
        out = x if out is None else out  # unread without ReLU
        residual_grad = ctx.has_residual and ctx.needs_input_grad[4]
        grad_x, grad_w, grad_b, grad_res = bwd(
            grad_out, x, out, weight, mean, invstd, ctx.relu, residual_grad, *ctx.padding
        )
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_w.to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None,
            grad_b.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None,
            None,
            grad_res if residual_grad else None,
            None,
            *([None] * (len(ctx.padding) - 1)),
        )

    return setup_context, backward


def train_batch_norm_ops(fwd: Callable, bwd: Callable, reads_padded_residual: bool = False) -> dict[str, Callable]:
    """A backend's `batch_norm_act` and `batch_norm_act_parts` (for
    `ops.conv_bn_act_train`, see `ops.recompute`) on a kernel pair. `fwd`
    must be differentiable (autograd registered with `bn_autograd`).
    `reads_padded_residual`: fwd takes a residual channel offset and reads a
    residual with fewer channels in place (see `ops.batch_norm_act`)."""

    def forward(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu, residual_channel_offset=0):
        if residual is not None and residual.dtype != x.dtype:
            residual = residual.to(x.dtype)
        if reads_padded_residual:
            out, mean, invstd, var = fwd(x, weight, bias, eps, residual, relu, residual_channel_offset)
        else:
            residual = pad_residual(residual, x.shape[1], residual_channel_offset)
            out, mean, invstd, var = fwd(x, weight, bias, eps, residual, relu)
        if running_mean is not None:
            update_running_stats(
                running_mean, running_var, mean.detach(), var.detach(), momentum, x.numel() // x.shape[1]
            )
        return out, mean, invstd

    def backward(grad_out, x, out, weight, mean, invstd, eps, relu, residual_grad):
        grad_x, grad_w, grad_b, grad_res = bwd(grad_out, x, out, weight, mean, invstd, relu, residual_grad)
        return grad_x, grad_w, grad_b, (grad_res if residual_grad else None)

    def batch_norm_act(
        x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu, residual_channel_offset=0
    ):
        if not training:  # the inference epilogue; models use conv_bn_act for it
            return reference.batch_norm_act(
                x, weight, bias, running_mean, running_var, training, momentum, eps,
                pad_residual(residual, x.shape[1], residual_channel_offset), relu,
            )
        return forward(
            x, weight, bias, running_mean, running_var, momentum, eps, residual, relu, residual_channel_offset
        )[0]

    batch_norm_act.reads_padded_residual = reads_padded_residual
    return {"batch_norm_act": batch_norm_act, "batch_norm_act_parts": (forward, backward)}
