"""How a forward runs, decided once at its top and passed down
(docs/design.md §3.1).

A `Plan` holds what every conv+norm pair of one forward would otherwise
re-derive: whether the cpu backend's module-level inference op serves it
(device, backend selection, oneDNN, not being traced or compiled), whether
autograd records, and the CPU autocast dtype. `FusedResNet` and `CifarResNet`
decide it at the top of their forward (`planned`) and their blocks read it
(`current`); a block or layer called on its own decides for itself.

Also here: the owned path, FusedResNet's warm CPU inference over whole
stages — each stretch of blocks whose convolutions are all in the weight
cache is checked first, then run as back-to-back oneDNN calls.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.fx
import torch.nn as nn
from torch import Tensor
# the global forward hooks live in a private module attribute; read in this
# one place (hooks_anywhere) so the rule has one source
from torch.nn.modules import module as _nn_module

from resnet_fused import backends
from resnet_fused.ops import common


class Plan(NamedTuple):
    device: torch.device
    # the cpu backend's module-level op (ops/cpu/modules.py), where it serves this forward
    cpu_inference: Optional[Callable]
    # autograd records (torch.is_grad_enabled())
    grad: bool
    # CPU autocast dtype in force, or None
    autocast: Optional[torch.dtype]
    # a forward hook anywhere inside the model (or globally) could see an
    # activation: the layouts and buffers must be torchvision's
    hooks: bool = True
    # the backend serving conv_bn_act here runs fastest on channels_last
    # activations (its kernels' tiles, cuDNN's NHWC tensor-core paths, the
    # cpu module op): an inference forward converts its input once at the
    # stem (layers.stem_layout) rather than run every layer in NCHW
    channels_last: bool = False


_current: contextvars.ContextVar[Optional[Plan]] = contextvars.ContextVar("resnet_fused_plan", default=None)


# while torch.fx traces a forward: nothing is decided at trace time (the
# recorded calls decide when the graph runs, layers.conv_norm_act)
TRACED = Plan(torch.device("meta"), None, True, None, True)


def decide(x: Tensor, model: Optional[nn.Module] = None) -> Plan:
    """The plan for a forward of `model` (or of a single block or layer, when
    None) whose input is `x`."""
    if isinstance(x, torch.fx.Proxy):
        return TRACED
    device = x.device
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # under torch.compile and torch.jit.trace the composed ops are traced
        # (inductor folds and pre-packs the weights itself; the cache cannot
        # be traced), and nothing is walked that would only add guards
        return Plan(device, None, torch.is_grad_enabled(), None, True)
    if common.transformed():  # forward AD, torch.func: the differentiable composition
        return Plan(device, None, True, None, True)
    cpu_inference = None
    if device.type == "cpu":
        cpu_inference = backends.resolve_module_op("conv_bn_act_module", "conv_bn_act", device)
    autocast = common.autocast_dtype("cpu") if device.type == "cpu" else None
    hooks = True if model is None else hooks_anywhere(model)
    serving = backends.resolve_module_op("conv_bn_act", "conv_bn_act", device)
    channels_last = cpu_inference is not None or getattr(serving, "prefers_channels_last", False)
    return Plan(device, cpu_inference, torch.is_grad_enabled(), autocast, hooks, channels_last)


def current(x: Tensor) -> Plan:
    """The plan of the forward in progress on x's device, else a new one."""
    if isinstance(x, torch.fx.Proxy):
        return TRACED
    if torch.compiler.is_compiling():  # torch.compile does not trace ContextVars
        return decide(x)
    plan = _current.get()
    if plan is None or plan.device != x.device:
        return decide(x)
    return plan


@contextlib.contextmanager
def planned(x: Tensor, model: nn.Module) -> Iterator[Plan]:
    """Decide the plan for a whole model's forward and make it `current`
    inside the `with` block."""
    plan = decide(x, model)
    if torch.compiler.is_compiling():  # torch.compile does not trace ContextVar.set
        yield plan
        return
    token = _current.set(plan)
    try:
        yield plan
    finally:
        _current.reset(token)


def hooks_anywhere(module: nn.Module) -> bool:
    """Whether a forward or forward-pre hook is registered globally or on any
    submodule of `module` (not itself). A plain walk over `_modules`:
    `modules()` is a generator with a memo set, 3-4x slower, and this runs
    every forward."""
    if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
        return True
    stack = [m for m in module._modules.values() if m is not None]
    while stack:
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        stack.extend(c for c in m._modules.values() if c is not None)
    return False


def called_plainly(module: nn.Module) -> bool:
    """Whether calling `module` runs its forward and nothing else (no hooks on
    it or globally)."""
    return not (
        module._forward_hooks or module._forward_pre_hooks
        or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
    )
