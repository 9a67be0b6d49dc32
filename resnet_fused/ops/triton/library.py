"""torch.library registration of the Triton kernels and the `triton` backend's
op implementations.

Both ops are `torch.library.triton_op`s whose kernels are launched through
`wrap_triton`, so torch.compile sees the kernels themselves (no graph break,
no opaque call), and fake tensors get their shapes from the same Python code.
`triton_batch_norm_act_fwd` has autograd registered; its backward is the op
`triton_batch_norm_act_bwd`.

Under TRITON_INTERPRET=1 kernels are Python functions that cannot be traced
into a graph, so there the same functions are registered as opaque
`custom_op`s instead (fake implementation: the same code, which launches
nothing on tensors without storage). That keeps `opcheck` and
torch.compile meaningful on CPU: they exercise the schema, fake shapes,
autograd and the compiled graph around an opaque call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from resnet_fused.ops import reference
from resnet_fused.ops.triton import batch_norm, conv, tuning


def _launchable(*tensors: Optional[Tensor]) -> bool:
    """False while tracing under the interpreter: interpreted kernels cannot
    be traced (wrap_triton hands them back unwrapped) and need real storage,
    which fake and functional tensors lack; their outputs need no values."""
    if not conv.interpreting():
        return True
    return all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors if t is not None)


def _define(name: str):
    def register(fn):
        if not conv.interpreting():
            return triton_op(name, mutates_args=())(fn)
        op = custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return register


def _wrapped(kernels: dict) -> dict:
    return {name: wrap_triton(k) for name, k in kernels.items()}


def _out_needs_int64(shape) -> bool:
    n, k, p, q = shape
    return n * k * p * q > 2**30


@_define("resnet_fused::triton_conv_bn_act")
def triton_conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    from resnet_fused.ops import conv_out_shape

    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    shape = conv_out_shape(x, weight, stride, padding, dilation)
    launchable = _launchable(x, weight, scale, shift, residual)
    kernel = wrap_triton(conv._conv_bn_act_kernel)

    def implicit_gemm(cfg: conv.ConvConfig) -> Tensor:
        out = conv.output_like(x, shape)
        if launchable:
            conv.launch(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, out, cfg, kernel)
        return out

    def cudnn_then_epilogue() -> Tensor:
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        if launchable:
            y = batch_norm.scale_shift_act_(y, scale, shift, residual, relu, _wrapped(batch_norm.KERNELS))
        return y

    mode = tuning.forced()
    if conv.interpreting():
        choice = conv.INTERPRETER_CONFIG if mode != tuning.CUDNN else tuning.CUDNN
    else:
        configs = conv.configs_for(x.dtype, weight.shape[1], conv.needs_int64(x, weight, residual) or _out_needs_int64(shape))
        key = tuning.key(x, weight, residual, relu, stride, padding, dilation, groups) + (mode,)
        candidates = {}
        if mode in ("auto", "triton"):
            candidates.update({cfg: (lambda cfg=cfg: implicit_gemm(cfg)) for cfg in configs})
        if mode in ("auto", tuning.CUDNN):
            candidates[tuning.CUDNN] = cudnn_then_epilogue
        if tuning.can_measure(x):
            choice = tuning.choose(key, candidates)
        else:  # tracing: what an earlier eager call measured, else the heuristic
            choice = tuning.cached(key) or (
                tuning.CUDNN if mode == tuning.CUDNN
                else tuning.default_config(configs, weight.shape[0] // groups, shape[0] * shape[2] * shape[3])
            )
    if choice == tuning.CUDNN:
        return cudnn_then_epilogue()
    return implicit_gemm(choice)


@_define("resnet_fused::triton_batch_norm_act_fwd")
def triton_batch_norm_act_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, residual: Optional[Tensor], relu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = _wrapped(batch_norm.KERNELS) if _launchable(x, weight, bias, residual) else batch_norm.NO_LAUNCH
    return batch_norm.forward(x, weight, bias, eps, residual, relu, kernels)


@_define("resnet_fused::triton_batch_norm_act_bwd")
def triton_batch_norm_act_bwd(
    grad_out: Tensor,
    x: Tensor,
    out: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
    residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    launchable = _launchable(grad_out, x, out, weight, mean, invstd)
    kernels = _wrapped(batch_norm.KERNELS) if launchable else batch_norm.NO_LAUNCH
    return batch_norm.backward(grad_out, x, out, weight, mean, invstd, relu, residual_grad, kernels)


def _bn_setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual, relu = inputs
    out, mean, invstd, _ = output
    # Saved: x and out (the next layer's input, which it keeps anyway) and
    # 2·C statistics — see README "What training saves". out only feeds the
    # ReLU mask: without ReLU it is not kept (it would be one activation more
    # than eager keeps, e.g. for the downsample BN).
    ctx.save_for_backward(x, out if relu else None, weight, mean, invstd)
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(*output[1:])


def _bn_backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_var):
    x, out, weight, mean, invstd = ctx.saved_tensors
    out = x if out is None else out  # unread without ReLU
    residual_grad = ctx.has_residual and ctx.needs_input_grad[4]
    grad_x, grad_w, grad_b, grad_res = torch.ops.resnet_fused.triton_batch_norm_act_bwd(
        grad_out, x, out, weight, mean, invstd, ctx.relu, residual_grad
    )
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_w.to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None,
        grad_b.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None,
        None,
        grad_res if residual_grad else None,
        None,
    )


triton_batch_norm_act_fwd.register_autograd(_bn_backward, setup_context=_bn_setup_context)


# ---- the `triton` backend's op implementations ------------------------------


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups) -> Tensor:
    # Inference op: with autograd recording (fine-tuning with frozen BN) or
    # float64 the differentiable reference runs instead.
    if x.dtype == torch.float64 or _needs_grad(x, weight, scale, shift, residual):
        return reference.conv_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return torch.ops.resnet_fused.triton_conv_bn_act(
        x, weight, scale.float().contiguous(), shift.float().contiguous(), residual, relu,
        list(stride), list(padding), list(dilation), groups,
    )


def batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu) -> Tensor:
    from resnet_fused.ops.native import update_running_stats

    if not training:
        return reference.batch_norm_act(
            x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu
        )
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    out, mean, _, var = torch.ops.resnet_fused.triton_batch_norm_act_fwd(x, weight, bias, eps, residual, relu)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), momentum, x.numel() // x.shape[1])
    return out


def _parts_forward(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu):
    from resnet_fused.ops.native import update_running_stats

    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    out, mean, invstd, var = torch.ops.resnet_fused.triton_batch_norm_act_fwd(x, weight, bias, eps, residual, relu)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    return out, mean, invstd


def _parts_backward(grad_out, x, out, weight, mean, invstd, eps, relu, residual_grad):
    grad_x, grad_w, grad_b, grad_res = torch.ops.resnet_fused.triton_batch_norm_act_bwd(
        grad_out, x, out, weight, mean, invstd, relu, residual_grad
    )
    return grad_x, grad_w, grad_b, (grad_res if residual_grad else None)


# for ops.conv_bn_act_train
BATCH_NORM_ACT_PARTS = (_parts_forward, _parts_backward)
