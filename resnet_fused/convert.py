"""Convert torchvision ResNet modules to fused ones and back.

Conversion changes the class of each torchvision `ResNet`, `BasicBlock` and
`Bottleneck` instance to its fused subclass (and back): parameters, buffers,
hooks and state_dict keys are untouched, and nothing global is patched.
Only exact torchvision classes are converted; a user subclass with its own
forward is left alone.
"""
from __future__ import annotations

import copy

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from resnet_fused.models import FusedBasicBlock, FusedBottleneck, FusedResNet

__all__ = ["fuse", "unfuse"]

_TO_FUSED = {ResNet: FusedResNet, BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}
_TO_PLAIN = {fused: plain for plain, fused in _TO_FUSED.items()}


def _swap_classes(model: nn.Module, mapping: dict, inplace: bool, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    known = set(_TO_FUSED) | set(_TO_PLAIN)
    if not any(type(m) in known for m in model.modules()):
        raise ValueError(
            f"{what}: model ({type(model).__name__}) contains no torchvision ResNet, BasicBlock or "
            "Bottleneck modules (nor fused ones) to convert"
        )
    if not inplace:
        model = copy.deepcopy(model)
    for m in model.modules():
        target = mapping.get(type(m))
        if target is not None:
            m.__class__ = target
    return model


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return `model` with its torchvision ResNet/BasicBlock/Bottleneck modules fused.

    A copy unless `inplace=True`. Idempotent: fused modules stay as they are.
    """
    return _swap_classes(model, _TO_FUSED, inplace, "fuse")


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return `model` with fused modules turned back into plain torchvision ones."""
    return _swap_classes(model, _TO_PLAIN, inplace, "unfuse")
