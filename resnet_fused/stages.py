"""FusedResNet's owned path: warm CPU inference over whole residual stages
(docs/design.md §3.1).

Taken when nothing outside the forward can hold the activations between
blocks (no gradient, the cpu backend's inference op serving, no hooks, plain
stages of fused blocks; `FusedResNet._owns_activations`) and they are
finite. Each stretch of blocks whose every convolution is in the weight
cache for the sizes it will see is checked first, all of it, then run as
back-to-back calls writing each block's sum into the identity's buffer:
Python between two large convolutions runs with cold caches (a 4 µs check
takes ~35 µs there), so no checking is left between them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from resnet_fused.layers import (
    NORM_TYPES, conv_norm_act, conv_reason, plain_projection, relu_is_plain, uses_running_stats,
)
from resnet_fused.ops.cpu import onednn
from resnet_fused.plan import Plan


def owned_layers(blocks: list, x: Tensor, plan: Plan) -> Tensor:
    """The residual stages' blocks on the owned path. A block that cannot be
    planned (weights not packed yet or not finite, a swapped module) runs
    alone (`_owned_block_forward`, which checks everything), and planning
    resumes after it — unless its output holds NaN or infinity: the planned
    calls assume finite activations (oneDNN's ReLU post-op maps NaN to 0), so
    the blocks after it run their own forwards too."""
    i, n = 0, len(blocks)
    while i < n:
        run = []
        if x.is_contiguous(memory_format=torch.channels_last) and (plan.autocast is None or x.dtype == plan.autocast):
            size = tuple(x.shape)
            while i < n:
                step = _planned_block(blocks[i], size, x.dtype, plan.autocast is not None)
                if step is None:
                    break
                run.append(step)
                size = step[0][-1].out_shape
                i += 1
        x = _run_planned(run, x)
        if i < n:
            x = _owned_block_forward(blocks[i], x, plan)
            i += 1
            if not onednn.all_finite(x):
                for block in blocks[i:]:
                    x = block._fused_forward(x)
                return x
    return x


def block_parts(block: nn.Module) -> Optional[tuple]:
    """(children, downsample) of a fused block, read from `_modules` (no
    `nn.Module.__getattr__`); None where the block's own `_fused_forward`
    must run: a swapped activation, a shortcut other than torchvision's
    projection, a conv or norm that is no longer a module."""
    m = block._modules
    ds = m["downsample"] if "downsample" in m else block.downsample
    if not relu_is_plain(m.get("relu")) or not (ds is None or plain_projection(ds)):
        return None
    for conv, norm in block._resnet_fused_pairs:
        if m.get(conv) is None or m.get(norm) is None:
            return None
    return m, ds


def _owned_block_forward(block: nn.Module, x: Tensor, plan: Plan) -> Tensor:
    """A block of the owned path that cannot be planned: its pairs through
    `conv_norm_act`, which packs, checks for NaN/inf, falls back or raises,
    with the identity's buffer taking the sum as `_run_planned` does (the
    same bits); a block that is not plain runs its own forward."""
    parts = block_parts(block)
    if parts is None:
        return block._fused_forward(x)
    m, ds = parts
    pairs = block._resnet_fused_pairs
    out = x
    for conv, norm in pairs[:-1]:
        out = conv_norm_act(m[conv], m[norm], out, plan=plan)
    conv, norm = pairs[-1]
    if ds is None:
        return conv_norm_act(m[conv], m[norm], out, residual=x, consume_residual=True, plan=plan)
    main = conv_norm_act(m[conv], m[norm], out, relu=False, plan=plan)
    return conv_norm_act(ds[0], ds[1], x, residual=main, consume_residual=True, plan=plan)


def _lookup(conv: nn.Module, norm: nn.Module, size: tuple, dtype: torch.dtype, autocast: bool) -> Optional[onednn.Packed]:
    """The cached weights of (conv, norm) for a channels_last `size` input in
    `dtype` (the autocast dtype where autocast is on), where the CPU
    inference op still applies to the pair; else None."""
    if conv_reason(conv) is not None or type(norm) not in NORM_TYPES or not uses_running_stats(norm):
        return None
    if not autocast and onednn.member(conv, "weight").dtype != dtype:
        return None
    return onednn.lookup(conv, norm, dtype, size)


def _planned_block(block: nn.Module, size: tuple, dtype: torch.dtype, autocast: bool) -> Optional[tuple]:
    """(packed main-path convolutions, packed projection or None) for a block
    whose input has `size`, or None when any of it is not in the cache (or
    the block is not plain)."""
    parts = block_parts(block)
    if parts is None:
        return None
    m, ds = parts
    packs = []
    s = size
    for conv, norm in block._resnet_fused_pairs:
        p = _lookup(m[conv], m[norm], s, dtype, autocast)
        if p is None:
            return None
        packs.append(p)
        s = p.out_shape
    if ds is None:
        return (packs, None) if s == size else None
    ds_conv, ds_norm = ds._modules.values()  # a plain projection: two modules
    pd = _lookup(ds_conv, ds_norm, size, dtype, autocast)
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
