"""SyncBatchNorm that stays fused: batch statistics over a process group.

* `nn.SyncBatchNorm.convert_sync_batchnorm(model)` (torch's modules, CUDA with
  DDP) and `resnet_fused.convert_sync_batchnorm(model)` (this file's
  `FusedSyncBatchNorm`, CPU with gloo as well as CUDA) both keep the fused
  blocks fused: `layers.conv_norm_act` sends a norm in `SYNC_NORMS` to
  `conv_norm_act_train` below when it trains across a group of more than one
  process (`sync_group`), and treats it as a BatchNorm2d otherwise (eval:
  the inference path over running statistics; one process: plain BN).
* `FusedSyncBatchNorm` is not an `nn.SyncBatchNorm`: DDP refuses those on
  CPU ("SyncBatchNorm layers only work with GPU modules"), and torch's
  forward refuses CPU tensors. Called on its own (outside a fused block) it
  is torch's SyncBatchNorm on any device.

The statistics and gradients: ops/sync_batch_norm.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from resnet_fused.ops import common
from resnet_fused.ops import sync_batch_norm as sync_ops

__all__ = ["FusedSyncBatchNorm", "SYNC_NORMS", "convert_sync_batchnorm", "sync_group"]


def _check_group(process_group) -> None:
    if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}"
        )


class FusedSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm's arguments, state_dict and semantics (inputs of
    2 or more dimensions, N = 0 on a rank allowed), on CPU too; inside
    resnet_fused's blocks it runs fused."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        _check_group(process_group)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        group = sync_group(self)
        if group is None:  # eval, or one process: BatchNorm (`_BatchNorm.forward`)
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        mean, var, momentum = common.batch_norm_module_args(self)
        # any layout of 2+ dims as (N, C, L, 1): the op is written for 4-D
        x = input if input.dim() == 4 else input.reshape(input.shape[0], input.shape[1], -1, 1)
        out = sync_ops.sync_batch_norm_act(
            x, self.weight, self.bias, mean, var, momentum, self.eps, relu=False, process_group=group
        )
        return out.view(input.shape) if input.dim() != 4 else out


SYNC_NORMS = (nn.SyncBatchNorm, FusedSyncBatchNorm)


def sync_group(norm: nn.Module):
    """The process group whose batch statistics `norm` (a SYNC_NORMS module)
    uses in this call, or None where it is a plain BatchNorm: in eval, or
    without torch.distributed initialised, or in a group of one process
    (torch's SyncBatchNorm.forward decides the same)."""
    if not norm.training or not dist.is_available() or not dist.is_initialized():
        return None
    group = norm.process_group if norm.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def conv_norm_act_train(
    conv: nn.Conv2d,
    norm: nn.Module,
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    residual: Optional[Tensor],
    relu: bool,
    recompute: bool,
    residual_channel_offset: Optional[int],
    group,
) -> Tensor:
    """layers.conv_norm_act's training step for a norm with a `sync_group`:
    its arguments, with the running statistics and momentum from the
    module's bookkeeping (already done)."""
    if recompute and conv.bias is None and torch.is_grad_enabled():
        return sync_ops.conv_sync_bn_act_train(
            x, conv.weight, norm.weight, norm.bias, running_mean, running_var, momentum, norm.eps, residual, relu,
            conv.stride, conv.padding, conv.dilation, conv.groups, residual_channel_offset, process_group=group,
        )
    return sync_ops.sync_batch_norm_act(
        conv(x), norm.weight, norm.bias, running_mean, running_var, momentum, norm.eps, residual, relu,
        residual_channel_offset, process_group=group,
    )


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """`torch.nn.SyncBatchNorm.convert_sync_batchnorm` with `FusedSyncBatchNorm`:
    every BatchNorm (`_BatchNorm`: 1d/2d/3d, torch's SyncBatchNorm and this
    class too) becomes a FusedSyncBatchNorm over `process_group` (None: the
    default group), sharing its parameters and buffers; in place, except
    that a BatchNorm `model` itself is returned as a new module. Works on CPU
    (gloo) and CUDA, with DDP on both."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_group(process_group)
    return _convert(model, process_group)


def _convert(module: nn.Module, process_group) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        out = FusedSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group, bias=module.bias is not None,
        )
        # the same Parameter and buffer objects, as torch's converter (an
        # optimizer built before the conversion keeps working)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group))
    return out
