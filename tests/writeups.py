"""ResNets written the way popular write-ups and tutorials write them: the
independent eager references the tests (and benchmarks) compare resnet_fused
against. Kept deliberately close to the originals' style, not to ours.

* `RefResNet`/`RefBlock`: the paper's CIFAR ResNets (option A via LambdaLayer
  and F.pad, option B via a 1x1 projection), names as in resnet_fused.cifar.
* `WriteupResNet` with `WriteupBasicBlock` (`F.relu(self.bn1(self.conv1(x)))`,
  `out += self.shortcut(x)`) or `WriteupBottleNeck` (`residual_function` and
  `shortcut` Sequentials, an `nn.ReLU` built inside forward).
* `VGGStack`: conv-BN-ReLU layers in five spellings.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class RefBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A", plain=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.plain = plain
        self.shortcut = nn.Sequential()
        if not plain and (stride != 1 or in_planes != planes):
            if option == "A":
                self.shortcut = LambdaLayer(
                    lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
                )
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.plain:
            out += self.shortcut(x)
        return F.relu(out)


class RefResNet(nn.Module):
    def __init__(self, n, num_classes=10, option="A", plain=False):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1, option, plain)
        self.layer2 = self._make_layer(32, n, 2, option, plain)
        self.layer3 = self._make_layer(64, n, 2, option, plain)
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, n, stride, option, plain):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(RefBlock(self.in_planes, planes, s, option, plain))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.fc(out.view(out.size(0), -1))


# ---- write-up style 1: F.relu(self.bn1(self.conv1(x))), `out += shortcut` ----
class WriteupBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


# ---- write-up style 2: residual_function / shortcut Sequentials, ReLU built in forward ----
class WriteupBottleNeck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, stride=stride, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels * WriteupBottleNeck.expansion, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels * WriteupBottleNeck.expansion),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels * WriteupBottleNeck.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels * WriteupBottleNeck.expansion, stride=stride, kernel_size=1,
                          bias=False),
                nn.BatchNorm2d(out_channels * WriteupBottleNeck.expansion),
            )

    def forward(self, x):
        return nn.ReLU(inplace=True)(self.residual_function(x) + self.shortcut(x))


class WriteupResNet(nn.Module):
    def __init__(self, block, num_block, num_classes=10):
        super().__init__()
        self.in_channels = 16
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        self.conv2_x = self._make_layer(block, 16, num_block[0], 1)
        self.conv3_x = self._make_layer(block, 32, num_block[1], 2)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32 * block.expansion, num_classes)

    def _make_layer(self, block, out_channels, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_channels, out_channels, s))
            self.in_channels = out_channels * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        output = self.conv1(x)
        output = self.conv2_x(output)
        output = self.conv3_x(output)
        output = self.avg_pool(output)
        output = output.view(output.size(0), -1)
        return self.fc(output)


class VGGStack(nn.Module):
    """Plain conv-BN-ReLU layers in every spelling fuse() accepts, plus a conv
    with bias and a conv+BN without activation."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)  # conv bias
        self.c3, self.b3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c4, self.b4, self.r4 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        self.c5, self.b5 = nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)), inplace=True)
        x = self.b3(self.c3(x)).relu_()
        x = self.r4(self.b4(self.c4(x)))
        x = self.b5(self.c5(x))  # no activation
        return self.fc(x.mean((2, 3)))
