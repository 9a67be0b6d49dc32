"""The `cpu` and `cuda` backends: torch's convolution + resnet_fused._C kernels.

* conv_bn_act: the convolution (oneDNN on CPU, cuDNN on CUDA, no bias), then
  the fused epilogue `scale_shift_add_relu_` in place on its output: one pass
  over memory instead of eager's BN, add and ReLU passes. The in-place
  epilogue has no autograd of its own: `ops.conv_bn_act` wraps this
  implementation in the Function of `ops/conv_grad.py` when autograd records
  (BN-in-eval fine-tuning), which calls it with grad mode off and is its
  backward. Called directly with grad recorded, it runs the differentiable
  reference composition instead; float64 always does (the kernel's scale is
  fp32).
* conv_bn_act_module (cpu only): the module-level inference op of
  `ops/cpu/modules.py`, which `layers.conv_norm_act` uses where this backend
  serves `conv_bn_act`.
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
from resnet_fused.ops import common, extension, reference
from resnet_fused.ops.cpu import modules as cpu_modules
from resnet_fused.ops.cpu import onednn


def conv_bn_act(
    x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, residual_channel_offset=0
) -> Tensor:
    if common.conv_bn_act_needs_reference(x, weight, scale, shift, residual):
        residual = common.pad_residual(residual, weight.shape[0], residual_channel_offset)
        return reference.conv_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    if residual is not None and residual.dtype != y.dtype:
        residual = residual.to(y.dtype)
    return extension.scale_shift_add_relu_(y, scale.float(), shift.float(), residual, relu, residual_channel_offset)


def conv_bn_act_eval(
    x, weight, bn_weight, bn_bias, running_mean, running_var, eps, conv_bias, residual, relu, stride, padding,
    dilation, groups, residual_channel_offset=0,
) -> Tensor:
    """ops.conv_bn_act_eval on these backends: the convolution, then the
    epilogue folding the BN from its tensors on the device
    (`bn_eval_add_relu_`): two ops per pair, not the convolution, six fold
    ops and the epilogue. The caller (ops.conv_bn_act_eval) sends float64 and
    calls autograd records through to conv_bn_act instead."""
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    if residual is not None and residual.dtype != y.dtype:
        residual = residual.to(y.dtype)
    vectors = [None if t is None else t.float() for t in (bn_weight, bn_bias, running_mean, running_var, conv_bias)]
    return extension.bn_eval_add_relu_(y, *vectors[:4], eps, vectors[4], residual, relu, residual_channel_offset)


# the epilogue kernel takes the narrower residual (CPU: read in place; CUDA:
# padded inside the op)
conv_bn_act.reads_padded_residual = True
# the eval-mode BN folded by the epilogue op itself: ops.conv_bn_act_eval's path
conv_bn_act.batch_norm_eval = conv_bn_act_eval
# cuDNN's and oneDNN's fastest convolutions and the epilogue's vector path are
# channels_last ones: models run inference there (plan.Plan.channels_last)
conv_bn_act.prefers_channels_last = True


def _cpu_unavailable() -> Optional[str]:
    return extension.unavailable_reason("CPU")


def _cuda_unavailable() -> Optional[str]:
    reason = extension.unavailable_reason("CUDA")
    if reason is None and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return reason


_OPS = {
    "conv_bn_act": conv_bn_act,
    # the C++ train kernels take a narrower residual (CPU: read in place; CUDA: padded inside the op)
    **common.train_batch_norm_ops(
        extension.batch_norm_act_train, extension.batch_norm_act_backward, reads_padded_residual=True
    ),
}
batch_norm_act = _OPS["batch_norm_act"]


# CPU inference for conv+BN module pairs (folded, pre-packed oneDNN or Winograd
# convolutions, docs/design.md §3.1), where this torch has oneDNN
_CPU_MODULE_OPS = {"conv_bn_act_module": cpu_modules.conv_bn_act_module} if onednn.UNAVAILABLE is None else {}

backends.register(backends.Backend("cpu", ("cpu",), {**_OPS, **_CPU_MODULE_OPS}, _cpu_unavailable))
backends.register(backends.Backend("cuda", ("cuda",), dict(_OPS), _cuda_unavailable))
