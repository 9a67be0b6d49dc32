"""conv + norm (+ residual) (+ ReLU) for modules: which pairs fuse, and the
call that runs them (docs/design.md §3).

The one fusability rule, used by the fused models, the CIFAR models, the fx
rewrite and the CPU planner:
* the convolution: a plain `nn.Conv2d` with zero padding given as numbers
  (`conv_reason`);
* the norm: `nn.BatchNorm2d`, torchvision's `FrozenBatchNorm2d` or a
  SyncBatchNorm (torch's, or `sync_batch_norm.FusedSyncBatchNorm`)
  (`norm_reason`); over running statistics (eval, or frozen) it is folded
  into the convolution's epilogue, over batch statistics it is the fused
  train-mode BN after the convolution.
Any other pair runs as written, with a one-time warning.
"""
from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.ops.misc import FrozenBatchNorm2d

from resnet_fused import ops, sync_batch_norm
from resnet_fused.ops import common
from resnet_fused.ops.cpu import modules as cpu_modules
from resnet_fused.ops.cpu.onednn import member
from resnet_fused.plan import Plan, called_plainly, current

# SyncBatchNorm is a BatchNorm2d here, except in training across a process
# group, where its batch statistics are the group's (sync_batch_norm.py)
NORM_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d, *sync_batch_norm.SYNC_NORMS)

_warned: set[type] = set()
_warned_lock = threading.Lock()


def conv_reason(conv: nn.Module) -> Optional[str]:
    """None where `conv` fuses, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' fuses)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only explicit padding fuses)"
    return None


def plain_conv(module: nn.Module) -> bool:
    """A convolution that fuses (`conv_reason`) and whose call runs its
    forward and nothing else (no hooks): it may be replaced by a fused call."""
    return conv_reason(module) is None and called_plainly(module)


def carries_activation(norm: nn.Module) -> bool:
    """A BatchNorm2d subclass whose forward is BatchNorm2d's followed by its
    own `drop` and `act` modules (timm's BatchNormAct2d)."""
    return isinstance(norm, nn.BatchNorm2d) and isinstance(getattr(norm, "act", None), nn.Module) \
        and isinstance(getattr(norm, "drop", None), nn.Module)


def norm_reason(norm: nn.Module, bn_part: bool = False) -> Optional[str]:
    """None where `norm` fuses, else why not. `bn_part`: the caller runs a
    norm-with-activation's `drop` and `act` itself (the fx rewrite), so only
    its BatchNorm part is fused here."""
    if type(norm) in NORM_TYPES or (bn_part and carries_activation(norm)):
        return None
    return f"{type(norm).__name__} is not nn.BatchNorm2d, FrozenBatchNorm2d or a SyncBatchNorm"


def uses_running_stats(norm: nn.Module) -> bool:
    """Whether a fusable norm normalises with running statistics (as
    torch.nn.modules.batchnorm._BatchNorm.forward decides: batch statistics
    in training, or when no running statistics exist)."""
    if type(norm) is FrozenBatchNorm2d:
        return True
    return not norm.training and member(norm, "running_mean") is not None and member(norm, "running_var") is not None


def is_fused_module(module: nn.Module) -> bool:
    """Whether `module` is one of resnet_fused's modules (the fused torchvision
    classes, the CIFAR ones): the classes that carry the `memory_efficient`
    switch."""
    return hasattr(type(module), "_resnet_fused_recompute")


def recompute(module: nn.Module) -> bool:
    """Whether `memory_efficient` is on for `module`."""
    return getattr(module, "_resnet_fused_recompute", False)


def _warn_unfused(module: nn.Module, what: str) -> None:
    with _warned_lock:
        if type(module) in _warned:
            return
        _warned.add(type(module))
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
    consume_residual: bool = False,
    plan: Optional[Plan] = None,
    bn_part: bool = False,
) -> Tensor:
    """`act(norm(conv(x)) + residual)` through the fused ops where the modules
    allow. `recompute`: in training, keep no convolution output for backward
    (`ops.conv_bn_act_train`). `residual_channel_offset`: the residual has
    fewer channels and fills output channels from there (see
    `ops.conv_bn_act`). `consume_residual`: the caller will not use the
    residual again, so the CPU inference op may write the result into it.
    `plan`: the forward's plan (`resnet_fused.plan`), else the current one.
    `bn_part`: see `norm_reason`.

    Under torch.fx tracing (symbolic_trace, feature extraction) the call is
    recorded as one graph node that runs this function on the modules at
    run time, so the traced graph runs the fused ops and decides train/eval
    and the path then, as the module does."""
    if isinstance(x, torch.fx.Proxy):
        return _traced(conv, norm, x, residual, relu, recompute, residual_channel_offset, bn_part)
    if norm_reason(norm, bn_part) is not None:
        _warn_unfused(norm, "norm layer")
        return unfused(norm(conv(x)), residual, relu, residual_channel_offset)
    if conv_reason(conv) is not None:
        _warn_unfused(conv, "convolution")
        return unfused(norm(conv(x)), residual, relu, residual_channel_offset)
    if uses_running_stats(norm):
        if plan is None:
            plan = current(x)
        if plan.cpu_inference is not None and residual_channel_offset is None:
            # (a channel-offset residual: the C++ epilogue reads it in place)
            out = plan.cpu_inference(conv, norm, x, residual, relu, plan.autocast, consume_residual)
            if out is not None:
                return out
        return ops.conv_bn_act_eval(
            x, conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps, conv.bias,
            residual, relu, conv.stride, conv.padding, conv.dilation, conv.groups, residual_channel_offset,
        )
    mean, var, momentum = common.batch_norm_module_args(norm)
    group = sync_batch_norm.sync_group(norm) if type(norm) in sync_batch_norm.SYNC_NORMS else None
    if group is not None:  # batch statistics over a process group
        return sync_batch_norm.conv_norm_act_train(
            conv, norm, x, mean, var, momentum, residual, relu, recompute, residual_channel_offset, group
        )
    if recompute and conv.bias is None and torch.is_grad_enabled():
        return ops.conv_bn_act_train(
            x, conv.weight, norm.weight, norm.bias, mean, var, momentum, norm.eps, residual, relu,
            conv.stride, conv.padding, conv.dilation, conv.groups, residual_channel_offset,
        )
    return ops.batch_norm_act(
        conv(x), norm.weight, norm.bias, mean, var, True, momentum, norm.eps, residual, relu, residual_channel_offset
    )


def conv_add(conv: nn.Conv2d, x: Tensor, residual: Optional[Tensor] = None, plan: Optional[Plan] = None,
             consume_residual: bool = False, relu: bool = False) -> Tensor:
    """`conv(x) + residual`, then ReLU where `relu` (no norm: a feature
    pyramid's lateral and output convolutions, an RPN head's). On the CPU
    inference path one oneDNN or Winograd call on the cached weights, the
    bias, the add and the ReLU as post-ops; anywhere else (and for
    non-finite values) torch's convolution, add and ReLU."""
    if plan is None:
        plan = current(x)
    if plan.cpu_inference is not None and plain_conv(conv):
        out = plan.cpu_inference(conv, None, x, residual, relu, plan.autocast, consume_residual)
        if out is not None:
            return out
    y = conv(x)
    y = y if residual is None else y + residual
    return torch.relu(y) if relu else y


def _traced(conv, norm, x, residual, relu, recompute, residual_channel_offset, bn_part):
    tracer = x.tracer
    conv_ref = tracer.create_proxy("get_attr", tracer.path_of_module(conv), (), {})
    norm_ref = tracer.create_proxy("get_attr", tracer.path_of_module(norm), (), {})
    # consume_residual is left out: in a graph, another node may read the residual
    return tracer.create_proxy(
        "call_function", conv_norm_act,
        (conv_ref, norm_ref, x, residual, relu, recompute, residual_channel_offset, False, None, bn_part), {},
    )


def unfused(y: Tensor, residual: Optional[Tensor], relu: bool, residual_channel_offset: Optional[int] = None) -> Tensor:
    """What a pair that does not fuse computes after its norm."""
    if residual is not None:
        if residual_channel_offset is not None:
            residual = common.pad_residual(residual, y.shape[1], residual_channel_offset)
        y = y + residual
    return torch.relu(y) if relu else y


def stem_layout(x: Tensor, stem_norm: nn.Module, plan: Plan) -> Tensor:
    """A whole model's input in channels_last when its inference will run on
    a backend that is fastest there (`plan.channels_last`: the cpu
    backend's module op, the triton and cuda backends' kernels): its output
    (logits) has no layout, so nothing is lost, and no layer then has to
    convert back and forth or run NCHW tiles. Not where a hook could see an
    activation (`plan.hooks`): it gets the layout torchvision would give it."""
    if (
        plan.channels_last
        and isinstance(x, Tensor)
        and x.dim() == 4
        and not common.records_grad(x)
        and type(stem_norm) in NORM_TYPES
        and uses_running_stats(stem_norm)
        and not plan.hooks
    ):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def max_pool(pool: nn.Module, x: Tensor, plan: Plan) -> Tensor:
    """The stem's max-pool: on the CPU inference path the extension's kernel
    (`ops.cpu.modules.max_pool`); else the module itself. A module with
    hooks, or not a plain MaxPool2d, is always called as such."""
    if type(pool) is nn.MaxPool2d and plan.cpu_inference is not None and called_plainly(pool):
        out = cpu_modules.max_pool(pool, x)
        if out is not None:
            return out
    return pool(x)


def relu_is_plain(module: Optional[nn.Module]) -> bool:
    """Fuse only what forward computes: a block whose `relu` was swapped for
    another activation runs torchvision's forward."""
    return type(module) is nn.ReLU


def plain_projection(ds: Optional[nn.Module]) -> bool:
    """torchvision's projection shortcut: Sequential(conv1x1, norm)."""
    return type(ds) is nn.Sequential and len(ds) == 2
