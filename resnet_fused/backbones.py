"""Detection and segmentation backbones: torchvision's `IntermediateLayerGetter`
(the `backbone.body` of Faster R-CNN, RetinaNet, Mask R-CNN, FCN and
DeepLabV3 on ResNets) with the stem fused and the stages on the fast path.

`fuse()` swaps the getter's class like the blocks' (nothing else changes:
modules, names, state_dict, return_layers). Its forward decides the plan
once (`resnet_fused.plan`), fuses the stem's conv1 → bn1 → relu into one call
where the three are there and plain, moves the input to channels_last for the
CPU inference path (as FusedResNet does) and returns each feature in the
caller's memory format — the layout torchvision's getter returns.

On top of it, the feature pyramid of Faster/Mask R-CNN, RetinaNet and
Keypoint R-CNN (`BackboneWithFPN`: the getter, then `FeaturePyramidNetwork`)
has as many convolution FLOPs as the ResNet body (the 3×3 output convolution
at stride 4 alone is ~3.7 GFLOP per 224² image). Fused, its lateral 1×1
convolution takes the top-down add as a post-op and both run on the cpu
backend's cached weights (Winograd for the 3×3), in channels_last from the
body's features without a round trip through NCHW; the pyramid's outputs
come back in the caller's layout.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
import torch.nn.functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from resnet_fused import plan as planning
from resnet_fused.layers import (
    NORM_TYPES, conv_add, conv_norm_act, conv_reason, max_pool, plain_conv, recompute, relu_is_plain, stem_layout,
)
from resnet_fused.ops.common import memory_format
from resnet_fused.plan import called_plainly

__all__ = ["FusedBackboneWithFPN", "FusedFeaturePyramidNetwork", "FusedIntermediateLayerGetter"]

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
        with planning.planned(x, self) as p:
            return self._features(x, p, memory_format(x))

    @torch.jit.unused
    def _features(self, x: Tensor, p: planning.Plan, fmt) -> dict[str, Tensor]:
        """The returned layers' outputs, each in memory format `fmt` (None:
        the layout the forward computed them in)."""
        out = OrderedDict()
        items = list(self._modules.items())
        if self._fused_stem():
            x = stem_layout(x, self._modules["bn1"], p)
            x = conv_norm_act(self._modules["conv1"], self._modules["bn1"], x, recompute=recompute(self), plan=p)
            items = items[3:]
        for name, module in items:
            x = max_pool(module, x, p) if type(module) is nn.MaxPool2d else module(x)
            if name in self.return_layers:
                # the caller's layout, as torchvision's getter gives it
                out[self.return_layers[name]] = x if fmt is None else x.contiguous(memory_format=fmt)
        return out


def _single_conv(block: nn.Module) -> Optional[nn.Conv2d]:
    """The one plain nn.Conv2d a pyramid block computes (torchvision builds
    each as a Conv2dNormActivation holding only a Conv2d when the pyramid
    has no norm layer), or None."""
    conv = block
    if type(block) is not nn.Conv2d:
        sequential = isinstance(block, nn.Sequential) and type(block).forward is nn.Sequential.forward
        children = list(block._modules.values()) if sequential else []
        if len(children) != 1 or not called_plainly(block):
            return None
        conv = children[0]
    return conv if plain_conv(conv) else None


class FusedFeaturePyramidNetwork(FeaturePyramidNetwork):
    """torchvision's FeaturePyramidNetwork; forward = the same pyramid with
    each lateral 1×1 convolution and its top-down add as one call
    (`layers.conv_add`) where every block is a single plain convolution."""

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return self._fused_forward(x)

    def _scripted_forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        # what TorchScript compiles (it has no super()): torchvision's forward
        names = list(x.keys())
        feats = list(x.values())
        last_inner = self.get_result_from_inner_blocks(feats[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            inner_lateral = self.get_result_from_inner_blocks(feats[idx], idx)
            inner_top_down = F.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")
            last_inner = inner_lateral + inner_top_down
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict([(k, v) for k, v in zip(names, results)])

    @torch.jit.unused
    def _fused_forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        feats = list(x.values())
        if not feats or any(isinstance(f, torch.fx.Proxy) or not isinstance(f, Tensor) for f in feats):
            return self._scripted_forward(x)
        with planning.planned(feats[-1], self) as p:
            out = self._pyramid(x, p)
        if out is None:
            return self._scripted_forward(x)
        fmt = memory_format(feats[0])  # torchvision's outputs follow its input's layout
        return OrderedDict((k, v.contiguous(memory_format=fmt)) for k, v in out.items())

    @torch.jit.unused
    def _pyramid(self, x: dict[str, Tensor], p: planning.Plan) -> Optional[dict[str, Tensor]]:
        """The pyramid in the plan's layout (channels_last where the plan
        prefers it and no hook could see an activation), or None where a
        block is not one plain convolution (the caller runs torchvision's
        forward)."""
        inner = [_single_conv(b) for b in self.inner_blocks]
        layer = [_single_conv(b) for b in self.layer_blocks]
        if any(c is None for c in inner + layer) or len(inner) != len(x) or len(layer) != len(x):
            return None
        names = list(x.keys())
        feats = list(x.values())
        if p.channels_last and not p.hooks:
            feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        last_inner = conv_add(inner[-1], feats[-1], plan=p)
        results = [conv_add(layer[-1], last_inner, plan=p)]
        for idx in range(len(feats) - 2, -1, -1):
            top_down = F.interpolate(last_inner, size=feats[idx].shape[-2:], mode="nearest")
            # the lateral convolution with the top-down add as its post-op
            # (torchvision: inner_lateral + inner_top_down; the interpolated
            # map is fresh, so the sum may be written into it)
            last_inner = conv_add(inner[idx], feats[idx], top_down, plan=p, consume_residual=True)
            results.insert(0, conv_add(layer[idx], last_inner, plan=p))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results))


class FusedBackboneWithFPN(BackboneWithFPN):
    """torchvision's BackboneWithFPN; forward = the fused body's features
    handed to the fused pyramid in the layout they were computed in (no
    conversion between the two), the outputs in the caller's layout."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if torch.jit.is_scripting():
            return self.fpn(self.body(x))
        return self._fused_forward(x)

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> dict[str, Tensor]:
        body, fpn = self.body, self.fpn
        if (
            isinstance(x, torch.fx.Proxy) or not isinstance(x, Tensor)
            or type(body) is not FusedIntermediateLayerGetter or type(fpn) is not FusedFeaturePyramidNetwork
            or not (called_plainly(body) and called_plainly(fpn))
        ):
            return fpn(body(x))
        fmt = memory_format(x)
        with planning.planned(x, self) as p:
            feats = body._features(x, p, None)
            out = fpn._pyramid(feats, p)
            if out is None:
                out = fpn._scripted_forward(feats)
        return OrderedDict((k, v.contiguous(memory_format=fmt)) for k, v in out.items())
