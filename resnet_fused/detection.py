"""torchvision's region proposal head (`RPNHead`, in Faster/Mask/Keypoint
R-CNN) with its convolutions on the fast path.

The RPN head runs a 3x3 conv → ReLU and two 1x1 convolutions over every
pyramid level; on the stride-4 level of an 800x1066 image the 3x3 alone is
~63 GFLOP, as much as the ResNet-50 body. torchvision runs it in NCHW;
fused, each level goes to channels_last once (where the plan prefers it and
no hook could see an activation), the 3x3 with its bias and ReLU is one call
on the cpu backend's cached weights (Winograd), the 1x1s take their bias as
a post-op, and the logits and box deltas come back in the level's layout.

`fuse()` swaps the class (nothing else changes). A head whose `conv` is not
torchvision's Sequential of plain conv → ReLU pairs, or with hooks inside,
runs torchvision's forward; so do TorchScript and torch.fx.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.detection.rpn import RPNHead

from resnet_fused import plan as planning
from resnet_fused.layers import conv_add, plain_conv, relu_is_plain
from resnet_fused.ops.common import memory_format
from resnet_fused.plan import called_plainly

__all__ = ["FusedRPNHead"]


def _conv_relu(block: nn.Module) -> Optional[nn.Conv2d]:
    """The plain conv of a plain Sequential(conv, ReLU) (torchvision's
    Conv2dNormActivation without a norm), else None."""
    if not isinstance(block, nn.Sequential) or type(block).forward is not nn.Sequential.forward:
        return None
    children = list(block._modules.values())
    if len(children) != 2 or not all(called_plainly(m) for m in (block, *children)):
        return None
    conv, act = children
    return conv if plain_conv(conv) and relu_is_plain(act) else None


class FusedRPNHead(RPNHead):
    """torchvision's RPNHead; forward = the same head on the fast path."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return self._fused_forward(x)

    def _scripted_forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        # what TorchScript compiles (it has no super()): torchvision's forward
        logits = []
        bbox_reg = []
        for feature in x:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            bbox_reg.append(self.bbox_pred(t))
        return logits, bbox_reg

    @torch.jit.unused
    def _fused_forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        convs = [_conv_relu(b) for b in self.conv] if called_plainly(self.conv) else [None]
        if (
            not x or any(c is None for c in convs)
            or any(isinstance(f, torch.fx.Proxy) or not isinstance(f, Tensor) or f.dim() != 4 for f in x)
        ):
            return self._scripted_forward(x)
        logits, bbox_reg = [], []
        with planning.planned(x[0], self) as p:
            for feature in x:
                fmt = memory_format(feature)
                t = feature.contiguous(memory_format=torch.channels_last) if p.channels_last and not p.hooks \
                    else feature
                for conv in convs:
                    t = conv_add(conv, t, plan=p, relu=True)
                # in the level's layout, as torchvision's convolutions give them
                logits.append(conv_add(self.cls_logits, t, plan=p).contiguous(memory_format=fmt))
                bbox_reg.append(conv_add(self.bbox_pred, t, plan=p).contiguous(memory_format=fmt))
        return logits, bbox_reg


COMPANIONS = {RPNHead: FusedRPNHead}
