"""Convert models to fused ones and back.

A model containing torchvision `ResNet`, `BasicBlock` or `Bottleneck`
modules is converted by changing the class of each such instance to its fused
subclass (and back): parameters, buffers, hooks and state_dict keys are
untouched, and nothing global is patched. Only exact torchvision classes are
converted; a user subclass with its own forward is left alone.

Any other model is traced with torch.fx and its conv → BN [→ add] [→ ReLU]
chains are rewritten into fused calls (`resnet_fused.fx`).
"""
from __future__ import annotations

import copy
from typing import Union

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from resnet_fused.backbones import FusedBackboneWithFPN, FusedFeaturePyramidNetwork, FusedIntermediateLayerGetter
from resnet_fused.fx import FuseReport, fuse_graph, fused_graph_norms
from resnet_fused.layers import is_fused_module
from resnet_fused.models import FusedBasicBlock, FusedBottleneck, FusedResNet
from resnet_fused.detection import COMPANIONS as _DETECTION
from resnet_fused.segmentation import COMPANIONS as _SEGMENTATION

__all__ = ["FuseReport", "fuse", "unfuse", "memory_efficient"]

_TO_FUSED = {ResNet: FusedResNet, BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}
_TO_PLAIN = {fused: plain for plain, fused in _TO_FUSED.items()}
# converted along with the blocks (never the reason a model takes the class
# swap: a getter over another backbone is left to the fx rewrite)
_COMPANIONS = {
    IntermediateLayerGetter: FusedIntermediateLayerGetter,
    BackboneWithFPN: FusedBackboneWithFPN,
    FeaturePyramidNetwork: FusedFeaturePyramidNetwork,
    **_DETECTION,
    **_SEGMENTATION,
}
_COMPANIONS_PLAIN = {fused: plain for plain, fused in _COMPANIONS.items()}


def _native(m: nn.Module) -> bool:
    # fused by construction (the CIFAR ResNets), nothing to convert
    return type(m) not in _TO_PLAIN and type(m) not in _COMPANIONS_PLAIN and is_fused_module(m)


def _swap_classes(model: nn.Module, mapping: dict, inplace: bool, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    known = set(_TO_FUSED) | set(_TO_PLAIN)
    if not any(type(m) in known or (what == "fuse" and _native(m)) for m in model.modules()):
        raise ValueError(
            f"{what}: model ({type(model).__name__}) contains no torchvision ResNet, BasicBlock or "
            "Bottleneck modules (nor fused ones) to convert"
            + ("; the CIFAR ResNets have no unfused twin (backend('eager') runs them on torch ops)"
               if any(_native(m) for m in model.modules()) else "")
        )
    if not inplace:
        model = copy.deepcopy(model)
    companions = _COMPANIONS if mapping is _TO_FUSED else _COMPANIONS_PLAIN
    for m in model.modules():
        target = mapping.get(type(m)) or companions.get(type(m))
        if target is not None:
            m.__class__ = target
    return model


def fuse(model: nn.Module, inplace: bool = False, report: bool = False) -> Union[nn.Module, tuple]:
    """Return `model` fused; with `report=True`, `(model, FuseReport)`.

    * Models containing torchvision ResNet/BasicBlock/Bottleneck modules (or
      already fused ones): those modules are converted, in place with
      `inplace=True`, else in a copy. Idempotent.
    * Any other model: traced with torch.fx, and every conv → BN
      [→ add(residual)] [→ ReLU] chain becomes one fused call; the result is
      a `torch.fx.GraphModule` with the original's state_dict keys (see
      `resnet_fused.fx` for what is fused and what is left alone, and
      why). Always a copy (`inplace=True` is an error there). A model
      torch.fx cannot trace, or one with nothing to fuse, is an error that
      says why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    known = tuple(_TO_FUSED) + tuple(_TO_PLAIN)
    blocks = [name for name, m in model.named_modules() if type(m) in known or _native(m)]
    if blocks:
        root = type(model).__name__
        fused = _swap_classes(model, _TO_FUSED, inplace, "fuse")
        # the blocks and every companion swapped with them (getter, pyramid, heads)
        converted = [
            name or root for name, m in fused.named_modules()
            if type(m) in _TO_PLAIN or type(m) in _COMPANIONS_PLAIN or _native(m)
        ]
        summary = FuseReport("torchvision/resnet_fused modules", fused=converted)
        return (fused, summary) if report else fused
    if inplace:
        raise ValueError(
            f"fuse: {type(model).__name__} has no torchvision ResNet blocks, so it is fused by a torch.fx graph "
            "rewrite, which builds a new module; call fuse(model) without inplace=True"
        )
    graph_module, summary = fuse_graph(copy.deepcopy(model))
    if not summary.fused:
        why = "".join(f"; {name}: {reason}" for name, reason in summary.unfused)
        raise ValueError(
            f"fuse: {type(model).__name__} contains no torchvision ResNet blocks and no conv → BatchNorm chain "
            f"that can be fused{why or ' (no nn.Conv2d followed by a BatchNorm2d was found)'}"
        )
    return (graph_module, summary) if report else graph_module


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return `model` with fused modules turned back into plain torchvision ones."""
    return _swap_classes(model, _TO_PLAIN, inplace, "unfuse")


def memory_efficient(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Train `model`'s fused layers without keeping convolution outputs for
    backward: each conv+BN pair recomputes its convolution in backward
    (`ops.conv_bn_act_train`). Roughly halves the activations a ResNet keeps
    for backward, for one extra convolution forward per pair (docs/performance.md, "What
    training saves"). Same results; affects training only. Returns `model`.

    Applies to the fused torchvision and CIFAR modules in `model` and to the
    fused calls of a graph `fuse()` rewrote; a model with none of them is an
    error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = False
    for m in model.modules():
        if is_fused_module(m):
            m._resnet_fused_recompute = bool(enabled)
            found = True
        for norm in fused_graph_norms(m):
            # the graph's fused call reads the switch from its norm module
            norm._resnet_fused_recompute = bool(enabled)
            found = True
    if not found:
        raise ValueError(
            f"memory_efficient: model ({type(model).__name__}) contains no resnet_fused modules; "
            "build it with resnet_fused (resnet50(), cifar_resnet20(), ...) or convert it with fuse() first"
        )
    return model
