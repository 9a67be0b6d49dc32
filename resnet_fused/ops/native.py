"""The `cpu` and `cuda` backends: torch's convolution + resnet_fused._C kernels.

* conv_bn_act: the convolution (oneDNN on CPU, cuDNN on CUDA, no bias), then
  the fused epilogue `scale_shift_add_relu_` in place on its output: one pass
  over memory instead of eager's BN, add and ReLU passes. The in-place
  epilogue has no backward, so when autograd is recording through this call
  (BN-in-eval fine-tuning) the differentiable reference composition runs
  instead; float64 also takes the reference (the kernel's scale is fp32).
* batch_norm_act with batch statistics: `batch_norm_act_fwd`/`_bwd` (statistics,
  normalise, residual, ReLU in one op each way); the running statistics are
  then updated exactly as F.batch_norm does. With running statistics
  (training=False) it is the inference epilogue, composed from torch ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_fused import backends
from resnet_fused.ops import extension, reference


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups) -> Tensor:
    if x.dtype == torch.float64 or _needs_grad(x, weight, scale, shift, residual):
        return reference.conv_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    if residual is not None and residual.dtype != y.dtype:
        residual = residual.to(y.dtype)
    return extension.scale_shift_add_relu_(y, scale.float(), shift.float(), residual, relu)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float, count: int
) -> None:
    """F.batch_norm's update: unbiased variance, factor `momentum`, computed
    in the batch statistics' dtype (fp32, fp64 for double) and rounded once."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.copy_(torch.lerp(running_mean.to(mean.dtype), mean, momentum))
        running_var.copy_(torch.lerp(running_var.to(var.dtype), unbiased, momentum))


def batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu) -> Tensor:
    if not training:
        return reference.batch_norm_act(
            x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu
        )
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    out, mean, _, var = extension.batch_norm_act_train(x, weight, bias, eps, residual, relu)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), momentum, x.numel() // x.shape[1])
    return out


def _parts_forward(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu):
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    out, mean, invstd, var = extension.batch_norm_act_train(x, weight, bias, eps, residual, relu)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    return out, mean, invstd


def _parts_backward(grad_out, x, out, weight, mean, invstd, eps, relu, residual_grad):
    grad_x, grad_w, grad_b, grad_res = torch.ops.resnet_fused.batch_norm_act_bwd(
        grad_out, x, out, weight, mean, invstd, relu, residual_grad
    )
    return grad_x, grad_w, grad_b, (grad_res if residual_grad else None)


def _cpu_unavailable() -> Optional[str]:
    return extension.unavailable_reason("CPU")


def _cuda_unavailable() -> Optional[str]:
    reason = extension.unavailable_reason("CUDA")
    if reason is None and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return reason


_OPS = {
    "conv_bn_act": conv_bn_act,
    "batch_norm_act": batch_norm_act,
    "batch_norm_act_parts": (_parts_forward, _parts_backward),  # for ops.conv_bn_act_train
}
backends.register(backends.Backend("cpu", ("cpu",), dict(_OPS), _cpu_unavailable))
backends.register(backends.Backend("cuda", ("cuda",), dict(_OPS), _cuda_unavailable))
