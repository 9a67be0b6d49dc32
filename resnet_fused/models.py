"""Fused ResNets with torchvision's module tree, state_dict keys and init.

`FusedResNet`, `FusedBasicBlock` and `FusedBottleneck` subclass torchvision's
classes and change only `forward`: the parameters, buffers, module names and
constructor arguments are torchvision's own, so state_dicts load with
`strict=True` both ways and the same seed gives the same weights.

What each conv+norm pair runs depends on the norm module at call time:
* BatchNorm2d using running statistics (eval) or FrozenBatchNorm2d:
  `ops.conv_bn_act`, with scale/shift derived from the live buffers on every
  call (no cache to go stale);
* BatchNorm2d using batch statistics (train, or track_running_stats=False):
  the convolution, then `ops.batch_norm_act` (BN + residual + ReLU);
* any other norm layer: the modules as written, with a one-time warning.
"""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torchvision.models as tvm
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from resnet_fused import ops
from resnet_fused.ops import common

MODEL_NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)

__all__ = [
    "MODEL_NAMES",
    "FusedResNet",
    "FusedBasicBlock",
    "FusedBottleneck",
    "bn_scale_shift",
    "memory_efficient",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

_warned_norms: set[type] = set()
_warned_lock = threading.Lock()


def bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """fp32 `(scale, shift)` of a BatchNorm2d/FrozenBatchNorm2d over running stats.

    `scale = γ / sqrt(var + eps)`, `shift = β − mean·scale`, computed from the
    module's current tensors (differentiable in γ and β).
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


def _uses_running_stats(bn: nn.BatchNorm2d) -> bool:
    # _BatchNorm.forward: batch statistics in training, or when no running
    # statistics exist.
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


def _batch_norm_args(bn: nn.BatchNorm2d) -> tuple[Optional[Tensor], Optional[Tensor], float]:
    """(running_mean, running_var, momentum) for a batch-statistics call, with
    the module's own bookkeeping (num_batches_tracked) done exactly as
    torch.nn.modules.batchnorm._BatchNorm.forward does it."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if bn.training and not bn.track_running_stats:
        return None, None, factor
    return bn.running_mean, bn.running_var, factor


def _fusable_conv(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def _warn_unfused(module: nn.Module, what: str) -> None:
    with _warned_lock:
        if type(module) in _warned_norms:
            return
        _warned_norms.add(type(module))
    warnings.warn(
        f"resnet_fused: {type(module).__name__} is not a {what} resnet_fused can fuse "
        "(nn.BatchNorm2d, torchvision FrozenBatchNorm2d, plain nn.Conv2d); "
        "blocks using it run unfused",
        RuntimeWarning,
        stacklevel=4,
    )


def conv_norm_act(
    conv: nn.Module,
    norm: nn.Module,
    x: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    recompute: bool = False,
    residual_channel_offset: Optional[int] = None,
) -> Tensor:
    """`act(norm(conv(x)) + residual)` through the fused ops where the modules
    allow. `recompute`: in training, keep no convolution output for backward
    (`ops.conv_bn_act_train`). `residual_channel_offset`: the residual has
    fewer channels and fills output channels from there (see
    `ops.conv_bn_act`)."""
    norm_type = type(norm)
    if norm_type is not nn.BatchNorm2d and norm_type is not FrozenBatchNorm2d:
        _warn_unfused(norm, "norm layer")
        return _unfused(norm(conv(x)), residual, relu, residual_channel_offset)
    if not _fusable_conv(conv):
        _warn_unfused(conv, "convolution")
        return _unfused(norm(conv(x)), residual, relu, residual_channel_offset)
    if norm_type is FrozenBatchNorm2d or _uses_running_stats(norm):
        scale, shift = bn_scale_shift(norm)
        if conv.bias is not None:
            shift = shift + conv.bias.float() * scale
        return ops.conv_bn_act(
            x, conv.weight, scale, shift, residual, relu, conv.stride, conv.padding, conv.dilation, conv.groups,
            residual_channel_offset,
        )
    mean, var, momentum = _batch_norm_args(norm)
    if recompute and conv.bias is None and torch.is_grad_enabled():
        return ops.conv_bn_act_train(
            x, conv.weight, norm.weight, norm.bias, mean, var, momentum, norm.eps, residual, relu,
            conv.stride, conv.padding, conv.dilation, conv.groups, residual_channel_offset,
        )
    return ops.batch_norm_act(
        conv(x), norm.weight, norm.bias, mean, var, True, momentum, norm.eps, residual, relu, residual_channel_offset
    )


def _unfused(y: Tensor, residual: Optional[Tensor], relu: bool, residual_channel_offset: Optional[int] = None) -> Tensor:
    if residual is not None:
        if residual_channel_offset is not None:
            residual = common.pad_residual(residual, y.shape[1], residual_channel_offset)
        y = y + residual
    return torch.relu(y) if relu else y


def _recompute(module: nn.Module) -> bool:
    return getattr(module, "_resnet_fused_recompute", False)


def memory_efficient(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Train `model`'s fused layers without keeping convolution outputs for
    backward: each conv+BN pair recomputes its convolution in backward
    (`ops.conv_bn_act_train`). Roughly halves the activations a ResNet keeps
    for backward, for one extra convolution forward per pair (README, "What
    training saves"). Same results; affects training only. Returns `model`.

    Applies to the fused torchvision and CIFAR modules in `model`; a model
    with none of them is an error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = False
    for m in model.modules():
        if hasattr(type(m), "_resnet_fused_recompute"):
            m._resnet_fused_recompute = bool(enabled)
            found = True
    if not found:
        raise ValueError(
            f"memory_efficient: model ({type(model).__name__}) contains no resnet_fused modules; "
            "build it with resnet_fused (resnet50(), cifar_resnet20(), ...) or convert it with fuse() first"
        )
    return model


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    ds = block.downsample
    if ds is None:
        return x
    if type(ds) is nn.Sequential and len(ds) == 2:
        return conv_norm_act(ds[0], ds[1], x, relu=False, recompute=_recompute(block))
    return ds(x)


def _relu_is_plain(module: nn.Module) -> bool:
    # Fuse only what forward computes: a block whose `relu` was swapped for
    # another activation runs torchvision's forward.
    return type(module) is nn.ReLU


class FusedBasicBlock(BasicBlock):
    """torchvision BasicBlock; forward = two fused conv+BN(+add)+ReLU kernels."""

    _resnet_fused_recompute = False

    def forward(self, x: Tensor) -> Tensor:
        if not _relu_is_plain(self.relu):
            return super().forward(x)
        identity = _shortcut(self, x)
        rc = _recompute(self)
        out = conv_norm_act(self.conv1, self.bn1, x, recompute=rc)
        return conv_norm_act(self.conv2, self.bn2, out, residual=identity, recompute=rc)


class FusedBottleneck(Bottleneck):
    """torchvision Bottleneck; forward = three fused kernels, the last with the residual."""

    _resnet_fused_recompute = False

    def forward(self, x: Tensor) -> Tensor:
        if not _relu_is_plain(self.relu):
            return super().forward(x)
        identity = _shortcut(self, x)
        rc = _recompute(self)
        out = conv_norm_act(self.conv1, self.bn1, x, recompute=rc)
        out = conv_norm_act(self.conv2, self.bn2, out, recompute=rc)
        return conv_norm_act(self.conv3, self.bn3, out, residual=identity, recompute=rc)


_FUSED_BLOCK = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


class FusedResNet(ResNet):
    """torchvision ResNet with a fused stem and fused blocks.

    Takes torchvision's arguments; `block` may be a torchvision block class
    (BasicBlock/Bottleneck) or its fused counterpart.
    """

    _resnet_fused_recompute = False

    def __init__(self, block, layers, **kwargs) -> None:
        super().__init__(_FUSED_BLOCK.get(block, block), layers, **kwargs)

    def _forward_impl(self, x: Tensor) -> Tensor:
        rc = _recompute(self)
        if _relu_is_plain(self.relu):
            x = conv_norm_act(self.conv1, self.bn1, x, recompute=rc)
        else:
            x = self.relu(conv_norm_act(self.conv1, self.bn1, x, relu=False, recompute=rc))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _fused_constructor(torchvision_fn):
    """Wrap a torchvision builder: same signature, weights API (including the
    legacy `pretrained=`) and errors; the model it returns is converted to
    fused modules in place."""
    weights_enum = tvm.get_model_weights(torchvision_fn.__name__)

    @functools.wraps(torchvision_fn)
    def build(*args, **kwargs) -> FusedResNet:
        from resnet_fused.convert import fuse

        _check_weights_name(weights_enum, kwargs.get("weights"))
        return fuse(torchvision_fn(*args, **kwargs), inplace=True)

    build.__module__ = __name__
    build.__doc__ = (
        f"Fused {torchvision_fn.__name__}: torchvision.models.{torchvision_fn.__name__} "
        "(same arguments, weights and state_dict) with fused conv+BN+ReLU and residual epilogues.\n\n"
        + (torchvision_fn.__doc__ or "")
    )
    return build


def _check_weights_name(weights_enum, weights) -> None:
    """torchvision answers an unknown weights name with a bare KeyError; say
    what is accepted instead. Everything else is left to torchvision."""
    if not isinstance(weights, str) or weights == "legacy":
        return
    try:
        weights_enum.verify(weights)
    except KeyError:
        names = ", ".join(repr(n) for n in dict.fromkeys(["DEFAULT", *weights_enum.__members__]))
        raise ValueError(
            f"weights must be None, a {weights_enum.__name__} member or one of {names}; got {weights!r}"
        ) from None


resnet18 = _fused_constructor(tvm.resnet18)
resnet34 = _fused_constructor(tvm.resnet34)
resnet50 = _fused_constructor(tvm.resnet50)
resnet101 = _fused_constructor(tvm.resnet101)
resnet152 = _fused_constructor(tvm.resnet152)
resnext50_32x4d = _fused_constructor(tvm.resnext50_32x4d)
resnext101_32x8d = _fused_constructor(tvm.resnext101_32x8d)
resnext101_64x4d = _fused_constructor(tvm.resnext101_64x4d)
wide_resnet50_2 = _fused_constructor(tvm.wide_resnet50_2)
wide_resnet101_2 = _fused_constructor(tvm.wide_resnet101_2)
