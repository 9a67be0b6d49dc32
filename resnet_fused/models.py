"""Fused ResNets with torchvision's module tree, state_dict keys and init.

`FusedResNet`, `FusedBasicBlock` and `FusedBottleneck` subclass torchvision's
classes and change only `forward`: the parameters, buffers, module names and
constructor arguments are torchvision's own, so state_dicts load with
`strict=True` both ways and the same seed gives the same weights.

What each conv+norm pair runs depends on the norm module at call time:
* BatchNorm2d using running statistics (eval) or FrozenBatchNorm2d:
  on CPU with no gradient recorded and the `cpu` backend, one oneDNN
  convolution from folded, pre-packed weights (`ops.onednn`, a cache checked
  against the live tensors on every call); otherwise `ops.conv_bn_act`, with
  scale/shift derived from the live buffers on every call;
* BatchNorm2d using batch statistics (train, or track_running_stats=False):
  the convolution, then `ops.batch_norm_act` (BN + residual + ReLU);
* any other norm layer: the modules as written, with a one-time warning.
"""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torchvision.models as tvm
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from resnet_fused import backends, ops
from resnet_fused import sync_batch_norm  # issue 20: SyncBatchNorm hook in conv_norm_act
from resnet_fused.ops import common, extension, onednn
from resnet_fused.ops.fold import bn_scale_shift, conv_scale_shift

MODEL_NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)

__all__ = [
    "MODEL_NAMES",
    "FusedResNet",
    "FusedBasicBlock",
    "FusedBottleneck",
    "bn_scale_shift",
    "memory_efficient",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

# issue 20: with running statistics a SyncBatchNorm is a BatchNorm2d (the oneDNN inference path)
_EVAL_BATCH_NORMS = (nn.BatchNorm2d, *sync_batch_norm.SYNC_NORMS)

_warned_norms: set[type] = set()
_warned_lock = threading.Lock()


def _uses_running_stats(bn: nn.BatchNorm2d) -> bool:
    # _BatchNorm.forward: batch statistics in training, or when no running
    # statistics exist.
    return not bn.training and onednn.member(bn, "running_mean") is not None and onednn.member(bn, "running_var") is not None


def _batch_norm_args(bn: nn.BatchNorm2d) -> tuple[Optional[Tensor], Optional[Tensor], float]:
    """(running_mean, running_var, momentum) for a batch-statistics call, with
    the module's own bookkeeping (num_batches_tracked) done exactly as
    torch.nn.modules.batchnorm._BatchNorm.forward does it."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if bn.training and not bn.track_running_stats:
        return None, None, factor
    return bn.running_mean, bn.running_var, factor


def _fusable_conv(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def _warn_unfused(module: nn.Module, what: str) -> None:
    with _warned_lock:
        if type(module) in _warned_norms:
            return
        _warned_norms.add(type(module))
    warnings.warn(
        f"resnet_fused: {type(module).__name__} is not a {what} resnet_fused can fuse "
        "(nn.BatchNorm2d, torchvision FrozenBatchNorm2d, plain nn.Conv2d); "
        "blocks using it run unfused",
        RuntimeWarning,
        stacklevel=4,
    )


def conv_norm_act(
    conv: nn.Module,
    norm: nn.Module,
    x: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    recompute: bool = False,
    residual_channel_offset: Optional[int] = None,
    consume_residual: bool = False,
) -> Tensor:
    """`act(norm(conv(x)) + residual)` through the fused ops where the modules
    allow. `recompute`: in training, keep no convolution output for backward
    (`ops.conv_bn_act_train`). `residual_channel_offset`: the residual has
    fewer channels and fills output channels from there (see
    `ops.conv_bn_act`). `consume_residual`: the caller will not use the
    residual again, so the oneDNN path may write the result into it."""
    norm_type = type(norm)
    # issue 20 (resnet_fused/sync_batch_norm.py): a SyncBatchNorm is a BatchNorm2d here, except
    # in training across a process group, where its batch statistics are the group's
    sync_group = None
    if norm_type in sync_batch_norm.SYNC_NORMS:
        norm_type, sync_group = nn.BatchNorm2d, sync_batch_norm.sync_group(norm)
    if norm_type is not nn.BatchNorm2d and norm_type is not FrozenBatchNorm2d:
        _warn_unfused(norm, "norm layer")
        return _unfused(norm(conv(x)), residual, relu, residual_channel_offset)
    if not _fusable_conv(conv):
        _warn_unfused(conv, "convolution")
        return _unfused(norm(conv(x)), residual, relu, residual_channel_offset)
    if norm_type is FrozenBatchNorm2d or _uses_running_stats(norm):
        out = _onednn_inference(conv, norm, x, residual, relu, residual_channel_offset, consume_residual)
        if out is not None:
            return out
        scale, shift = conv_scale_shift(conv, norm)
        return ops.conv_bn_act(
            x, conv.weight, scale, shift, residual, relu, conv.stride, conv.padding, conv.dilation, conv.groups,
            residual_channel_offset,
        )
    mean, var, momentum = _batch_norm_args(norm)
    if sync_group is not None:  # issue 20
        return sync_batch_norm.conv_norm_act_train(
            conv, norm, x, mean, var, momentum, residual, relu, recompute, residual_channel_offset, sync_group
        )
    if recompute and conv.bias is None and torch.is_grad_enabled():
        return ops.conv_bn_act_train(
            x, conv.weight, norm.weight, norm.bias, mean, var, momentum, norm.eps, residual, relu,
            conv.stride, conv.padding, conv.dilation, conv.groups, residual_channel_offset,
        )
    return ops.batch_norm_act(
        conv(x), norm.weight, norm.bias, mean, var, True, momentum, norm.eps, residual, relu, residual_channel_offset
    )


def _onednn_applies(x: Tensor, channels_last_only: bool = True) -> bool:
    # oneDNN writes its blocked-weight convolutions' outputs channels_last, so
    # NCHW activations keep the composed path (same layout out as in);
    # whole models move NCHW inputs to channels_last first (_stem_layout)
    return (
        x.device.type == "cpu"
        and onednn.UNAVAILABLE is None
        # under torch.compile and torch.jit.trace the composed ops are traced
        # instead (inductor folds and pre-packs the weights itself; the cache
        # cannot be traced)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and x.dim() == 4
        and (not channels_last_only or x.is_contiguous(memory_format=torch.channels_last))
        and backends.resolve_name("conv_bn_act", x.device) == "cpu"
    )


def _stem_layout(x: Tensor, stem_norm: nn.Module) -> Tensor:
    """A whole model's input in channels_last when its inference will run on
    the oneDNN path: its output (logits) has no layout, so nothing is lost,
    and no layer then has to convert back and forth."""
    if (
        isinstance(x, Tensor)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and (type(stem_norm) is FrozenBatchNorm2d or (type(stem_norm) in _EVAL_BATCH_NORMS and _uses_running_stats(stem_norm)))
        and _onednn_applies(x, channels_last_only=False)
    ):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _max_pool(pool: nn.Module, x: Tensor) -> Tensor:
    """The stem's max-pool: on the oneDNN inference path (channels_last CPU
    activations, no gradient) the extension's kernel, which gives the same
    values without computing the indices ATen's max_pool2d makes and drops
    (a quarter of the time); else the module itself. A module with hooks, or
    not a plain MaxPool2d, is always called as such."""
    from torch.nn.modules import module as nn_module

    if (
        type(pool) is nn.MaxPool2d
        and not pool.return_indices
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not (pool._forward_hooks or pool._forward_pre_hooks)
        and not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
        and x.dtype in (torch.float32, torch.bfloat16)
        and _onednn_applies(x)
        and extension.has_kernel("max_pool2d", "CPU")
    ):
        return extension.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    return pool(x)


def _onednn_inference(conv, norm, x, residual, relu, residual_channel_offset, consume_residual) -> Optional[Tensor]:
    """The `cpu` backend's inference path for modules: one oneDNN convolution
    with BN folded into cached, pre-packed weights and the residual/ReLU as
    post-ops (`ops.onednn`). None where it does not apply: other devices or
    backends, a gradient being recorded (BN-in-eval fine-tuning), dtypes
    other than fp32/bf16, a channel-offset residual (the C++ epilogue reads
    that one in place), and NaN or infinity in x, the residual or the
    folded weights: the composed path keeps them where torch would, oneDNN's
    ReLU post-op and Winograd do not (one summing pass over x and the
    residual looks)."""
    if not _onednn_applies(x) or residual_channel_offset is not None:
        return None
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, residual, conv.weight, conv.bias, getattr(norm, "weight", None), getattr(norm, "bias", None))
    ):
        return None
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    if dtype not in onednn.DTYPES or (not autocast and conv.weight.dtype != x.dtype):
        return None
    # Bad input gets the errors every backend gives (not oneDNN's): the full
    # checks run whenever a cheap look finds something off, and raise.
    w = conv.weight
    if x.dim() != 4 or x.shape[1] != w.shape[1] * conv.groups or not x.is_floating_point():
        ops._check_conv(x, w, conv.stride, conv.padding, conv.dilation, conv.groups, autocast=False)
    out_shape = ops.conv_out_shape(x, w, conv.stride, conv.padding, conv.dilation)
    if out_shape[2] < 1 or out_shape[3] < 1:
        ops._check_conv(x, w, conv.stride, conv.padding, conv.dilation, conv.groups, autocast=False)
    if residual is not None and (
        not isinstance(residual, Tensor) or tuple(residual.shape) != out_shape or residual.device != x.device
        or not residual.is_floating_point()
    ):
        ops._check_residual(residual, out_shape, x)
    packed = onednn.pack(conv, norm, dtype, tuple(x.shape))
    if not (packed.finite and onednn.all_finite(x) and (residual is None or onednn.all_finite(residual))):
        return None
    return onednn.conv_bn_act(x.to(dtype), packed, residual, relu, consume_residual)


def _owned_lookup(conv: nn.Module, norm: nn.Module, size: tuple, dtype: torch.dtype, autocast: bool) -> Optional[onednn.Packed]:
    """The cached weights of (conv, norm) for a channels_last `size` input in
    `dtype` (the autocast dtype where autocast is on), where the oneDNN
    inference path still applies to the pair; else None."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        return None
    norm_type = type(norm)
    if norm_type is not FrozenBatchNorm2d and not (norm_type in _EVAL_BATCH_NORMS and _uses_running_stats(norm)):
        return None
    if not autocast and onednn.member(conv, "weight").dtype != dtype:
        return None
    return onednn.lookup(conv, norm, dtype, size)


def _owned_layers(blocks: list, x: Tensor) -> Tensor:
    """FusedResNet's residual stages on the owned path (finite activations,
    see `FusedResNet._forward_impl`). Each stretch of blocks whose every
    convolution is in the weight cache for the sizes it will see is checked
    first, all of it, then run as back-to-back oneDNN calls: Python between
    two large convolutions runs with cold caches (a 4 µs check takes ~35 µs
    there), so no checking is left between them. A block that cannot be
    planned (weights not packed yet or not finite, a swapped module) runs
    alone (`_owned_block_forward`, which checks everything), and planning resumes after it
    — unless its output holds NaN or infinity: the planned calls assume
    finite activations (oneDNN's ReLU post-op maps NaN to 0), so the blocks
    after it run their own forwards too."""
    autocast = torch.is_autocast_enabled("cpu")
    i, n = 0, len(blocks)
    while i < n:
        run = []
        if x.is_contiguous(memory_format=torch.channels_last) and (
            not autocast or x.dtype == torch.get_autocast_dtype("cpu")
        ):
            size = tuple(x.shape)
            while i < n:
                step = _planned_block(blocks[i], size, x.dtype, autocast)
                if step is None:
                    break
                run.append(step)
                size = step[0][-1].out_shape
                i += 1
        x = _run_planned(run, x)
        if i < n:
            x = _owned_block_forward(blocks[i], x)
            i += 1
            if not onednn.all_finite(x):
                for block in blocks[i:]:
                    x = block._fused_forward(x)
                return x
    return x


def _owned_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """A block of the owned path that cannot be planned: its pairs through
    `conv_norm_act`, which packs, checks for NaN/inf, falls back or raises,
    with the identity's buffer taking the sum as `_run_planned` does (the
    same bits); a block that is not plain runs its own forward."""
    pairs = block._resnet_fused_pairs
    parts = _owned_blocks(block, pairs)
    if parts is None:
        return block._fused_forward(x)
    m, ds = parts
    out = x
    for conv, norm in pairs[:-1]:
        out = conv_norm_act(m[conv], m[norm], out)
    conv, norm = pairs[-1]
    if ds is None:
        return conv_norm_act(m[conv], m[norm], out, residual=x, consume_residual=True)
    main = conv_norm_act(m[conv], m[norm], out, relu=False)
    return conv_norm_act(ds[0], ds[1], x, residual=main, consume_residual=True)


def _planned_block(block: nn.Module, size: tuple, dtype: torch.dtype, autocast: bool) -> Optional[tuple]:
    """(packed main-path convolutions, packed projection or None) for a block
    whose input has `size`, or None when any of it is not in the cache (or
    the block is not plain)."""
    pairs = block._resnet_fused_pairs
    parts = _owned_blocks(block, pairs)
    if parts is None:
        return None
    m, ds = parts
    packs = []
    s = size
    for conv, norm in pairs:
        p = _owned_lookup(m[conv], m[norm], s, dtype, autocast)
        if p is None:
            return None
        packs.append(p)
        s = p.out_shape
    if ds is None:
        return (packs, None) if s == size else None
    ds_conv, ds_norm = ds._modules.values()  # a plain projection: two modules
    pd = _owned_lookup(ds_conv, ds_norm, size, dtype, autocast)
    return (packs, pd) if pd is not None and pd.out_shape == s else None


def _run_planned(run: list, x: Tensor) -> Tensor:
    # what the blocks' forwards compute (the same bits): the identity's
    # buffer, the block input and ours alone, takes the sum in place; a
    # projection shortcut runs last and adds into the main path's fresh
    # output — the order inductor uses, which finds that output still in
    # cache. The sum is the same either way: two rounded operands, one rounding.
    for packs, pd in run:
        out = x
        for p in packs[:-1]:
            out = onednn.conv_bn_act(out, p, None, True)
        if pd is None:
            x = onednn.conv_bn_act(out, packs[-1], x, True, consume_residual=True)
        else:
            x = onednn.conv_bn_act(x, pd, onednn.conv_bn_act(out, packs[-1], None, False), True, consume_residual=True)
    return x


def _unfused(y: Tensor, residual: Optional[Tensor], relu: bool, residual_channel_offset: Optional[int] = None) -> Tensor:
    if residual is not None:
        if residual_channel_offset is not None:
            residual = common.pad_residual(residual, y.shape[1], residual_channel_offset)
        y = y + residual
    return torch.relu(y) if relu else y


def _recompute(module: nn.Module) -> bool:
    return getattr(module, "_resnet_fused_recompute", False)


def memory_efficient(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Train `model`'s fused layers without keeping convolution outputs for
    backward: each conv+BN pair recomputes its convolution in backward
    (`ops.conv_bn_act_train`). Roughly halves the activations a ResNet keeps
    for backward, for one extra convolution forward per pair (docs/performance.md, "What
    training saves"). Same results; affects training only. Returns `model`.

    Applies to the fused torchvision and CIFAR modules in `model`; a model
    with none of them is an error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = False
    for m in model.modules():
        if hasattr(type(m), "_resnet_fused_recompute"):
            m._resnet_fused_recompute = bool(enabled)
            found = True
    if not found:
        raise ValueError(
            f"memory_efficient: model ({type(model).__name__}) contains no resnet_fused modules; "
            "build it with resnet_fused (resnet50(), cifar_resnet20(), ...) or convert it with fuse() first"
        )
    return model


def _shortcut(block: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
    """(identity, whether the block may overwrite it): the projection's
    output is the block's own; the block input never is here (the owned
    path, where it is, runs `_owned_block_forward` and `_run_planned`)."""
    ds = block.downsample
    if ds is None:
        return x, False
    if _plain_projection(ds):
        return conv_norm_act(ds[0], ds[1], x, relu=False, recompute=_recompute(block)), True
    return ds(x), False


def _plain_projection(ds: Optional[nn.Module]) -> bool:
    # torchvision's projection shortcut: Sequential(conv1x1, norm)
    return type(ds) is nn.Sequential and len(ds) == 2


def _owned_blocks(block: nn.Module, pairs: tuple) -> Optional[tuple]:
    """(children, downsample) of a fused block for the planned path, read from
    `_modules` (no `nn.Module.__getattr__`); None where the block's own
    `_fused_forward` must run: a swapped activation, a shortcut other than
    torchvision's projection, a conv or norm that is no longer a module."""
    m = block._modules
    ds = m["downsample"] if "downsample" in m else block.downsample
    if not _relu_is_plain(m.get("relu")) or not (ds is None or _plain_projection(ds)):
        return None
    for conv, norm in pairs:
        if m.get(conv) is None or m.get(norm) is None:
            return None
    return m, ds


def _relu_is_plain(module: nn.Module) -> bool:
    # Fuse only what forward computes: a block whose `relu` was swapped for
    # another activation runs torchvision's forward.
    return type(module) is nn.ReLU


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
        if not _relu_is_plain(self.relu):
            return super().forward(x)
        identity, consume = _shortcut(self, x)
        rc = _recompute(self)
        out = conv_norm_act(self.conv1, self.bn1, x, recompute=rc)
        return conv_norm_act(self.conv2, self.bn2, out, residual=identity, recompute=rc, consume_residual=consume)


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
        if not _relu_is_plain(self.relu):
            return super().forward(x)
        identity, consume = _shortcut(self, x)
        rc = _recompute(self)
        out = conv_norm_act(self.conv1, self.bn1, x, recompute=rc)
        out = conv_norm_act(self.conv2, self.bn2, out, recompute=rc)
        return conv_norm_act(self.conv3, self.bn3, out, residual=identity, recompute=rc, consume_residual=consume)


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
        x = _stem_layout(x, self.bn1)
        rc = _recompute(self)
        if _relu_is_plain(self.relu):
            x = conv_norm_act(self.conv1, self.bn1, x, recompute=rc)
        else:
            x = self.relu(conv_norm_act(self.conv1, self.bn1, x, relu=False, recompute=rc))
        x = _max_pool(self.maxpool, x)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        # the owned path's calls assume finite activations (oneDNN's ReLU
        # post-op maps NaN to 0): with NaN or infinity after the stem, every
        # block checks its own (one summing pass decides it for the forward)
        if self._owns_activations(x, layers) and onednn.all_finite(x):
            # every activation from here on is ours alone: the blocks may add
            # the residual into the identity's buffer (oneDNN's in-place sum)
            x = _owned_layers([block for layer in layers for block in layer], x)
        else:
            for layer in layers:
                x = layer(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


    def _owns_activations(self, x: Tensor, layers) -> bool:
        """Whether nothing outside this forward can hold the activations
        between the blocks: no gradient recorded, the oneDNN path in use, no
        forward hooks anywhere inside (a hook could keep a block's output,
        which the next block would overwrite), plain Sequential stages of
        fused blocks (called directly, which is the same as calling them
        when no hooks exist)."""
        if torch.is_grad_enabled() or not _onednn_applies(x):
            return False
        from torch.nn.modules import module as nn_module

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        for layer in layers:
            if type(layer) is not nn.Sequential or layer._forward_hooks or layer._forward_pre_hooks:
                return False
            for block in layer:
                if type(block) not in (FusedBasicBlock, FusedBottleneck):
                    return False
        return not _hooks_below(self)


def _hooks_below(module: nn.Module) -> bool:
    """Whether any submodule of `module` (not itself) has a forward or
    forward-pre hook. A plain walk over `_modules`: `modules()` is a
    generator with a memo set, 3-4x slower, and this runs every forward."""
    stack = [m for m in module._modules.values() if m is not None]
    while stack:
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        stack.extend(c for c in m._modules.values() if c is not None)
    return False


def _fused_constructor(torchvision_fn):
    """Wrap a torchvision builder: same signature, weights API (including the
    legacy `pretrained=`) and errors; the model it returns is converted to
    fused modules in place."""
    weights_enum = tvm.get_model_weights(torchvision_fn.__name__)

    @functools.wraps(torchvision_fn)
    def build(*args, **kwargs) -> FusedResNet:
        from resnet_fused.convert import fuse

        _check_weights_name(weights_enum, kwargs.get("weights"))
        return fuse(torchvision_fn(*args, **kwargs), inplace=True)

    build.__module__ = __name__
    build.__doc__ = (
        f"Fused {torchvision_fn.__name__}: torchvision.models.{torchvision_fn.__name__} "
        "(same arguments, weights and state_dict) with fused conv+BN+ReLU and residual epilogues.\n\n"
        + (torchvision_fn.__doc__ or "")
    )
    return build


def _check_weights_name(weights_enum, weights) -> None:
    """torchvision answers an unknown weights name with a bare KeyError; say
    what is accepted instead. Everything else is left to torchvision."""
    if not isinstance(weights, str) or weights == "legacy":
        return
    try:
        weights_enum.verify(weights)
    except KeyError:
        names = ", ".join(repr(n) for n in dict.fromkeys(["DEFAULT", *weights_enum.__members__]))
        raise ValueError(
            f"weights must be None, a {weights_enum.__name__} member or one of {names}; got {weights!r}"
        ) from None


resnet18 = _fused_constructor(tvm.resnet18)
resnet34 = _fused_constructor(tvm.resnet34)
resnet50 = _fused_constructor(tvm.resnet50)
resnet101 = _fused_constructor(tvm.resnet101)
resnet152 = _fused_constructor(tvm.resnet152)
resnext50_32x4d = _fused_constructor(tvm.resnext50_32x4d)
resnext101_32x8d = _fused_constructor(tvm.resnext101_32x8d)
resnext101_64x4d = _fused_constructor(tvm.resnext101_64x4d)
wide_resnet50_2 = _fused_constructor(tvm.wide_resnet50_2)
wide_resnet101_2 = _fused_constructor(tvm.wide_resnet101_2)
