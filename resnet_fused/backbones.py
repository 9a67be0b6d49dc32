"""Detection and segmentation backbones: torchvision's `IntermediateLayerGetter`
(the `backbone.body` of Faster R-CNN, RetinaNet, Mask R-CNN, FCN and
DeepLabV3 on ResNets) with the stem fused and the stages on the fast path.

`fuse()` swaps the getter's class like the blocks' (nothing else changes:
modules, names, state_dict, return_layers). Its forward decides the plan
once (`resnet_fused.plan`), fuses the stem's conv1 → bn1 → relu into one call
where the three are there and plain, moves the input to channels_last for the
CPU inference path (as FusedResNet does) and returns each feature in the
caller's memory format — the layout torchvision's getter returns.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models._utils import IntermediateLayerGetter

from resnet_fused import plan as planning
from resnet_fused.layers import NORM_TYPES, conv_norm_act, conv_reason, max_pool, recompute, relu_is_plain, stem_layout
from resnet_fused.ops.common import memory_format
from resnet_fused.plan import called_plainly

__all__ = ["FusedIntermediateLayerGetter"]

_STEM = ("conv1", "bn1", "relu")


class FusedIntermediateLayerGetter(IntermediateLayerGetter):
    """torchvision's IntermediateLayerGetter; forward = fused stem + fast-path stages."""

    _resnet_fused_recompute = False

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return self._fused_forward(x)

    def _scripted_forward(self, x: Tensor) -> dict[str, Tensor]:
        # what TorchScript compiles (and torch.fx traces): torchvision's forward
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out_name = self.return_layers[name]
                out[out_name] = x
        return out

    def _fused_stem(self) -> bool:
        names = list(self._modules)[:3]
        if tuple(names) != _STEM or any(n in self.return_layers for n in _STEM):
            return False
        conv, norm, relu = (self._modules[n] for n in _STEM)
        return (
            conv_reason(conv) is None and type(norm) in NORM_TYPES and relu_is_plain(relu)
            and all(called_plainly(m) for m in (conv, norm, relu))
        )

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> dict[str, Tensor]:
        if isinstance(x, torch.fx.Proxy):
            return self._scripted_forward(x)
        fmt = memory_format(x)
        out = OrderedDict()
        with planning.planned(x, self) as p:
            items = list(self._modules.items())
            if self._fused_stem():
                x = stem_layout(x, self._modules["bn1"], p)
                x = conv_norm_act(self._modules["conv1"], self._modules["bn1"], x, recompute=recompute(self), plan=p)
                items = items[3:]
            for name, module in items:
                x = max_pool(module, x, p) if type(module) is nn.MaxPool2d else module(x)
                if name in self.return_layers:
                    # the caller's layout, as torchvision's getter gives it
                    out[self.return_layers[name]] = x.contiguous(memory_format=fmt)
        return out
