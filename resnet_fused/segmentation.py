"""torchvision's segmentation models on ResNets (DeepLabV3, FCN) with their
heads fused: every conv → BatchNorm → ReLU of `DeepLabHead` (its ASPP
branches, the projection and the 3x3 after it) and `FCNHead` as one call
(`layers.conv_norm_act`), each classifier's 1x1 with its bias as one
(`layers.conv_add`), and the features handed from the fused backbone to the
head in the layout the backbone computed them in (channels_last on the CPU
inference path), the logits returned in the caller's layout.

On CPU the ASPP's dilated convolutions (rates 12/24/36) then run on the cpu
backend's cached weights in channels_last, where oneDNN skips the taps that
read only padding; torchvision's NCHW call does not (at 28x28, batch 2, the
rate-36 one: 76 ms NCHW, 22 ms channels_last; docs/performance.md).

`fuse()` swaps the classes (nothing else changes: modules, names,
state_dict). Each fused class computes what its torchvision class does; a
child with hooks, or one that is not the plain torchvision module, is called
as it is. TorchScript compiles torchvision's forward; torch.fx traces the
fused calls (`layers.conv_norm_act`'s graph node).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.segmentation.deeplabv3 import ASPP, ASPPConv, ASPPPooling, DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

from resnet_fused import plan as planning
from resnet_fused.backbones import FusedIntermediateLayerGetter
from resnet_fused.layers import NORM_TYPES, conv_add, conv_norm_act, plain_conv, relu_is_plain
from resnet_fused.ops.common import memory_format
from resnet_fused.plan import called_plainly

__all__ = [
    "FusedASPP", "FusedASPPConv", "FusedASPPPooling", "FusedDeepLabHead", "FusedDeepLabV3", "FusedFCN",
    "FusedFCNHead",
]


def run_sequential(modules: list, x: Tensor) -> Tensor:
    """`for m in modules: x = m(x)` with each plain conv → norm [→ ReLU] as
    one fused call and each lone plain convolution on the cached weights;
    every other module (Dropout, pooling, a hooked or replaced layer) is
    called as it is."""
    i = 0
    while i < len(modules):
        m = modules[i]
        nxt = modules[i + 1] if i + 1 < len(modules) else None
        if plain_conv(m) and type(nxt) in NORM_TYPES and called_plainly(nxt):
            act = modules[i + 2] if i + 2 < len(modules) else None
            relu = relu_is_plain(act) and called_plainly(act)
            x = conv_norm_act(m, nxt, x, relu=relu)
            i += 3 if relu else 2
        elif plain_conv(m):
            x = conv_add(m, x)
            i += 1
        else:
            x = m(x)
            i += 1
    return x


def _sequence(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, fused through `run_sequential` where `module` is a plain
    nn.Sequential called plainly."""
    if type(module) is nn.Sequential and called_plainly(module):
        return run_sequential(list(module._modules.values()), x)
    return module(x)


class _TensorForward:
    """forward for the fused heads that map a tensor to a tensor: TorchScript
    compiles the class's `_scripted_forward` (torchvision's forward), eager
    and torch.fx run `_fused_forward`."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return self._fused_forward(x)


class _FusedSequential(_TensorForward, nn.Sequential):
    """An nn.Sequential head whose forward is `run_sequential` over its children."""

    def _scripted_forward(self, x: Tensor) -> Tensor:
        # what TorchScript compiles: nn.Sequential's forward
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        return run_sequential(list(self._modules.values()), x)


class FusedDeepLabHead(_FusedSequential, DeepLabHead):
    """torchvision's DeepLabHead: ASPP, then 3x3 conv → BN → ReLU and the 1x1 classifier, fused."""


class FusedFCNHead(_FusedSequential, FCNHead):
    """torchvision's FCNHead: 3x3 conv → BN → ReLU, Dropout, the 1x1 classifier, fused."""


class FusedASPPConv(_FusedSequential, ASPPConv):
    """torchvision's ASPPConv: the dilated 3x3 conv → BN → ReLU as one call."""


class FusedASPPPooling(_TensorForward, ASPPPooling):
    """torchvision's ASPPPooling: global average, 1x1 conv → BN → ReLU as one
    call, bilinear back to the map."""

    def _scripted_forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        if planning.current(x).hooks:
            # a hook may look: torchvision's layouts (its 1x1 map's strides
            # decide the interpolation's), at the cost of a 1x1 convolution
            return self._scripted_forward(x)
        y = run_sequential(list(self._modules.values()), x)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # in the map's layout, so the ASPP's concatenation stays in it
        return y.contiguous(memory_format=memory_format(x))


class FusedASPP(_TensorForward, ASPP):
    """torchvision's ASPP: its branches (fused themselves), the
    concatenation, and the projection's conv → BN → ReLU as one call."""

    def _scripted_forward(self, x: Tensor) -> Tensor:
        res = []
        for conv in self.convs:
            res.append(conv(x))
        return self.project(torch.cat(res, dim=1))

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        # the 1x1 branch and the projection are plain nn.Sequentials
        return _sequence(self.project, torch.cat([_sequence(conv, x) for conv in self.convs], dim=1))


class _FusedSegmentation:
    """DeepLabV3/FCN's forward (torchvision's `_SimpleSegmentationModel`)
    with one plan for the whole model: the fused backbone's features stay in
    the layout it computed them in (channels_last on the CPU inference
    path) through the heads; the outputs come back in the caller's layout."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return self._fused_forward(x)

    def _scripted_forward(self, x: Tensor) -> dict[str, Tensor]:
        # what TorchScript compiles (it has no super()): torchvision's
        # _SimpleSegmentationModel.forward
        input_shape = x.shape[-2:]
        features = self.backbone(x)
        result = OrderedDict()
        x = features["out"]
        x = self.classifier(x)
        x = F.interpolate(x, size=input_shape, mode="bilinear", align_corners=False)
        result["out"] = x
        if self.aux_classifier is not None:
            x = features["aux"]
            x = self.aux_classifier(x)
            x = F.interpolate(x, size=input_shape, mode="bilinear", align_corners=False)
            result["aux"] = x
        return result

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> dict[str, Tensor]:
        backbone = self.backbone
        if (
            isinstance(x, torch.fx.Proxy) or not isinstance(x, Tensor) or x.dim() != 4
            or type(backbone) is not FusedIntermediateLayerGetter or not called_plainly(backbone)
        ):
            return self._scripted_forward(x)
        input_shape = x.shape[-2:]
        fmt = memory_format(x)
        with planning.planned(x, self) as p:
            features = backbone._features(x, p, None)
            result = OrderedDict()
            result["out"] = self._head(self.classifier, features["out"], input_shape, fmt)
            if self.aux_classifier is not None:
                result["aux"] = self._head(self.aux_classifier, features["aux"], input_shape, fmt)
        return result

    @staticmethod
    def _head(head: nn.Module, x: Tensor, size, fmt) -> Tensor:
        """A head's logits at the input's size, in the layout torchvision's
        forward gives them: the caller's, except after an ASPP, whose
        concatenation with its pooled branch (interpolated from 1x1, so
        NCHW) makes torchvision's NCHW whatever the input."""
        x = F.interpolate(head(x), size=size, mode="bilinear", align_corners=False)
        if isinstance(head, DeepLabHead) and isinstance(head[0], ASPP):
            fmt = torch.contiguous_format
        return x.contiguous(memory_format=fmt)


class FusedDeepLabV3(_FusedSegmentation, DeepLabV3):
    """torchvision's DeepLabV3 with one plan and one layout for backbone and heads."""


class FusedFCN(_FusedSegmentation, FCN):
    """torchvision's FCN with one plan and one layout for backbone and heads."""


COMPANIONS = {
    DeepLabV3: FusedDeepLabV3, FCN: FusedFCN, DeepLabHead: FusedDeepLabHead, FCNHead: FusedFCNHead,
    ASPP: FusedASPP, ASPPConv: FusedASPPConv, ASPPPooling: FusedASPPPooling,
}
