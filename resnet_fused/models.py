"""Fused ResNets with torchvision's module tree, state_dict keys and init.

`FusedResNet`, `FusedBasicBlock` and `FusedBottleneck` subclass torchvision's
classes and change only `forward`: the parameters, buffers, module names and
constructor arguments are torchvision's own, so state_dicts load with
`strict=True` both ways and the same seed gives the same weights. The
builders (`resnet50()`, ...) are in `resnet_fused.registry`.

Each conv+norm pair runs through `layers.conv_norm_act` (what fuses, and
how: docs/design.md §3), under the plan the forward decided at its top
(`resnet_fused.plan`); FusedResNet's warm CPU inference runs whole stages on
the owned path (`resnet_fused.stages`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from resnet_fused import plan as planning
from resnet_fused import stages
from resnet_fused.layers import conv_norm_act, max_pool, plain_projection, recompute, relu_is_plain, stem_layout
from resnet_fused.ops.cpu import onednn

__all__ = ["FusedResNet", "FusedBasicBlock", "FusedBottleneck"]


def _shortcut(block: nn.Module, x: Tensor, plan: planning.Plan) -> tuple[Tensor, bool]:
    """(identity, whether the block may overwrite it): the projection's
    output is the block's own; the block input never is here (the owned
    path, where it is, runs `stages`)."""
    ds = block.downsample
    if ds is None:
        return x, False
    if plain_projection(ds):
        return conv_norm_act(ds[0], ds[1], x, relu=False, recompute=recompute(block), plan=plan), True
    return ds(x), False


def _block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """A fused block's forward: its conv+norm pairs (`_resnet_fused_pairs`) in
    order, each one fused call, the last adding the shortcut before its ReLU."""
    p = planning.current(x)
    identity, consume = _shortcut(block, x, p)
    rc = recompute(block)
    pairs = block._resnet_fused_pairs
    out = x
    for conv, norm in pairs[:-1]:
        out = conv_norm_act(getattr(block, conv), getattr(block, norm), out, recompute=rc, plan=p)
    conv, norm = pairs[-1]
    return conv_norm_act(
        getattr(block, conv), getattr(block, norm), out, residual=identity, recompute=rc, consume_residual=consume,
        plan=p,
    )


class FusedBasicBlock(BasicBlock):
    """torchvision BasicBlock; forward = two fused conv+BN(+add)+ReLU kernels."""

    _resnet_fused_recompute = False
    _resnet_fused_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return self._fused_forward(x)

    def _scripted_forward(self, x: Tensor) -> Tensor:
        # what TorchScript compiles: torchvision's BasicBlock.forward (the
        # fused forward is Python it cannot compile; it has no super() either)
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        return _block_forward(self, x) if relu_is_plain(self.relu) else BasicBlock.forward(self, x)


class FusedBottleneck(Bottleneck):
    """torchvision Bottleneck; forward = three fused kernels, the last with the residual."""

    _resnet_fused_recompute = False
    _resnet_fused_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return self._fused_forward(x)

    def _scripted_forward(self, x: Tensor) -> Tensor:
        # what TorchScript compiles: torchvision's Bottleneck.forward
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        return _block_forward(self, x) if relu_is_plain(self.relu) else Bottleneck.forward(self, x)


_FUSED_BLOCK = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


class FusedResNet(ResNet):
    """torchvision ResNet with a fused stem and fused blocks.

    Takes torchvision's arguments; `block` may be a torchvision block class
    (BasicBlock/Bottleneck) or its fused counterpart.
    """

    _resnet_fused_recompute = False

    def __init__(self, block, layers, **kwargs) -> None:
        super().__init__(_FUSED_BLOCK.get(block, block), layers, **kwargs)

    def _forward_impl(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            # what TorchScript compiles: torchvision's _forward_impl, unfused
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))
        return self._fused_forward_impl(x)

    @torch.jit.unused
    def _fused_forward_impl(self, x: Tensor) -> Tensor:
        with planning.planned(x, self) as p:
            x = stem_layout(x, self.bn1, p)
            rc = recompute(self)
            if relu_is_plain(self.relu):
                x = conv_norm_act(self.conv1, self.bn1, x, recompute=rc, plan=p)
            else:
                x = self.relu(conv_norm_act(self.conv1, self.bn1, x, relu=False, recompute=rc, plan=p))
            x = max_pool(self.maxpool, x, p)
            layers = (self.layer1, self.layer2, self.layer3, self.layer4)
            # the owned path's calls assume finite activations (oneDNN's ReLU
            # post-op maps NaN to 0): with NaN or infinity after the stem, every
            # block checks its own (one summing pass decides it for the forward)
            if self._owns_activations(x, layers, p) and onednn.all_finite(x):
                # every activation from here on is ours alone: the blocks may add
                # the residual into the identity's buffer (oneDNN's in-place sum)
                x = stages.owned_layers([block for layer in layers for block in layer], x, p)
            else:
                for layer in layers:
                    x = layer(x)
            x = self.avgpool(x)
            x = torch.flatten(x, 1)
            return self.fc(x)

    def _owns_activations(self, x: Tensor, layers, p: planning.Plan) -> bool:
        """Whether nothing outside this forward can hold the activations
        between the blocks: no gradient recorded, the CPU inference op in
        use on channels_last activations, no forward hooks anywhere inside (a
        hook could keep a block's output, which the next block would
        overwrite), plain Sequential stages of fused blocks (called directly,
        which is the same as calling them when no hooks exist)."""
        if p.grad or p.hooks or p.cpu_inference is None or not x.is_contiguous(memory_format=torch.channels_last):
            return False
        for layer in layers:
            if type(layer) is not nn.Sequential:
                return False
            for block in layer:
                if type(block) not in (FusedBasicBlock, FusedBottleneck):
                    return False
        return True
