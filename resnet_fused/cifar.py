"""The ResNet paper's CIFAR-10 networks (He et al. 2016, §4.2), fused.

A 3×3 stem with 16 filters, three stages of n Basic blocks with 16, 32 and
64 filters (the first block of stages 2 and 3 has stride 2), global average
pooling and a `num_classes`-way linear layer: 6n + 2 weighted layers, so
n = 3, 5, 7, 9, 18, 200 give ResNet-20, 32, 44, 56, 110 and 1202.

Shortcuts where the shape changes (`shortcut=`):
* "A" (the paper's CIFAR choice, no parameters): identity with stride-2
  subsampling and zero-padded extra channels. The fused model never builds
  that tensor: the block's last fused op reads the stride-2 view of the
  block input in place and adds it to the middle channels only
  (`ops.conv_bn_act(..., residual_channel_offset=)`).
* "B": a 1×1 convolution with stride 2 plus BatchNorm (`shortcut.0`,
  `shortcut.1`), itself one fused conv+BN op.
`plain=True` builds the paper's plain baseline: the same layers without any
shortcut.

Module names and initialisation follow the common PyTorch write-ups of these
networks: `conv1`, `bn1`, `layer1..3` of blocks with `conv1`, `bn1`, `conv2`,
`bn2` and (option B) `shortcut`, then `fc`; Kaiming-normal convolution and
linear weights. A hand-written eager model with those names loads the
state_dict with `strict=True` (tests/test_cifar.py has one).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from resnet_fused import plan as planning
from resnet_fused.layers import conv_norm_act, recompute, stem_layout

__all__ = [
    "CIFAR_DEPTHS",
    "CifarBasicBlock",
    "CifarResNet",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet1202",
]

# depth -> blocks per stage
CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18, 1202: 200}
SHORTCUTS = ("A", "B")


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class CifarBasicBlock(nn.Module):
    """Two 3×3 conv+BN layers; the second adds the shortcut before its ReLU."""

    _resnet_fused_recompute = False

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A", plain: bool = False) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.plain = plain
        self.shortcut_type = shortcut
        self.projects = not plain and (stride != 1 or in_planes != planes)
        if self.projects and shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        # option A: the channels of the subsampled input land in the middle
        # of the output's (the paper pads planes/4 zero channels each side)
        self.pad_before = (planes - in_planes) // 2 if self.projects and shortcut == "A" else 0

    def _shortcut(self, x: Tensor, p: planning.Plan) -> tuple[Optional[Tensor], Optional[int]]:
        """(residual, residual_channel_offset) for the second fused op."""
        if self.plain:
            return None, None
        if not self.projects:
            return x, None
        if self.shortcut_type == "B":
            return conv_norm_act(self.shortcut[0], self.shortcut[1], x, relu=False, recompute=recompute(self), plan=p), None
        return x[:, :, :: self.stride, :: self.stride], self.pad_before  # a view: nothing is copied

    def forward(self, x: Tensor) -> Tensor:
        p = planning.current(x)
        rc = recompute(self)
        residual, offset = self._shortcut(x, p)
        out = conv_norm_act(self.conv1, self.bn1, x, recompute=rc, plan=p)
        return conv_norm_act(
            self.conv2, self.bn2, out, residual=residual, recompute=rc, residual_channel_offset=offset, plan=p
        )


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs with `blocks_per_stage` Basic blocks per stage (depth 6n + 2)."""

    _resnet_fused_recompute = False

    def __init__(
        self, blocks_per_stage: int, num_classes: int = 10, shortcut: str = "A", plain: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(blocks_per_stage, int) or isinstance(blocks_per_stage, bool) or blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be a positive int, got {blocks_per_stage!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' (zero-padded identity) or 'B' (1x1 projection), got {shortcut!r}")
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        planes, stages = 16, []
        for i, width in enumerate((16, 32, 64)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(planes, width, stride if j == 0 else 1, shortcut, plain))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        with planning.planned(x, self) as p:
            x = stem_layout(x, self.bn1, p)
            x = conv_norm_act(self.conv1, self.bn1, x, recompute=recompute(self), plan=p)
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, *, num_classes: int = 10, shortcut: str = "A", plain: bool = False) -> CifarResNet:
    """The paper's CIFAR network of `depth` weighted layers (6n + 2: 20, 32, 44, 56, 110, 1202 or any other)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 for a positive int n (20, 32, 44, 56, 110, 1202, ...), got {depth!r}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, shortcut=shortcut, plain=plain)


def _constructor(depth: int):
    def build(*, num_classes: int = 10, shortcut: str = "A", plain: bool = False) -> CifarResNet:
        return cifar_resnet(depth, num_classes=num_classes, shortcut=shortcut, plain=plain)

    build.__name__ = build.__qualname__ = f"cifar_resnet{depth}"
    build.__doc__ = (
        f"ResNet-{depth} for CIFAR-10 ({CIFAR_DEPTHS[depth]} Basic blocks per stage), fused. "
        "`shortcut`: 'A' (zero-padded identity, the paper's choice) or 'B' (1x1 projection); "
        "`plain=True`: no shortcuts (the paper's plain baseline)."
    )
    return build


cifar_resnet20 = _constructor(20)
cifar_resnet32 = _constructor(32)
cifar_resnet44 = _constructor(44)
cifar_resnet56 = _constructor(56)
cifar_resnet110 = _constructor(110)
cifar_resnet1202 = _constructor(1202)
