"""fuse() for models not built from torchvision's ResNet blocks: a torch.fx
graph rewrite.

The model is traced with `torch.fx.symbolic_trace`; then each of these chains
becomes one call of the fused ops (`layers.conv_norm_act`):

    conv → BN
    conv → BN → ReLU
    conv → BN → add(·, residual) [→ ReLU]

where the add is `+`, `+=`, `torch.add` or `Tensor.add`/`add_` with the BN
output as either operand (in-place adds only when they write into the BN
output), and the ReLU is `nn.ReLU`, `F.relu`, `torch.relu`/`relu_` or
`Tensor.relu`/`relu_`, in place or not. `nn.Identity` calls are dropped
first, so `conv → BN → Identity → ReLU` (timm's disabled drop-block) fuses.

A chain is left as it is, and reported with the reason, when the conv's or
the BN's output has other users, when the conv or BN module is called more
than once, when the BN has no running statistics, when the convolution is
not a plain zero-padded `nn.Conv2d`, or when the conv's input is modified in
place before the fused call would run.

The rewritten model keeps the original conv and BN modules under their
original names (the fused call reads them through `get_attr`), so its
state_dict has the same keys and tensors as the original's, and it follows
train/eval, `load_state_dict` and in-place edits like the torchvision
models do.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops.misc import FrozenBatchNorm2d

from resnet_fused.layers import carries_activation, conv_norm_act, conv_reason, norm_reason

__all__ = ["FuseReport", "fuse_graph", "fused_conv_bn", "fused_graph_norms"]

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, torch.add}
_INPLACE_ADD_FUNCTIONS = {operator.iadd}


@dataclass
class FuseReport:
    """What `fuse` did. `fused`: one line per fused chain (module names and
    the ops merged into it). `unfused`: (module, reason) for each
    convolution followed by a norm layer that was left as it was."""

    method: str
    fused: list[str] = field(default_factory=list)
    unfused: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"resnet_fused.fuse ({self.method}): {len(self.fused)} fused, {len(self.unfused)} left unfused"]
        lines += [f"  fused    {line}" for line in self.fused]
        lines += [f"  unfused  {name}: {reason}" for name, reason in self.unfused]
        return "\n".join(lines)


def fused_conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """The call a rewritten graph makes: `act(bn(conv(x)) + residual)` fused."""
    return conv_norm_act(
        conv, bn, x, residual, relu, recompute=getattr(bn, "_resnet_fused_recompute", False), bn_part=True
    )


torch.fx.wrap("fused_conv_bn")  # a rewritten model traced again keeps this call whole


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, except that a module built inside forward
    (`return nn.ReLU(inplace=True)(out + shortcut)`, common in write-ups) is
    traced through instead of failing as "not installed as a submodule"."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a norm carrying its activation (timm's BatchNormAct2d) stays one
        # call_module node, which the rewrite fuses like a BatchNorm2d
        return carries_activation(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def fused_graph_norms(module: nn.Module) -> list:
    """The norm modules of the fused calls in `module`'s own graph (a
    GraphModule `fuse_graph` made), else []."""
    if not isinstance(module, torch.fx.GraphModule):
        return []
    return [
        module.get_submodule(node.args[1].target)
        for node in module.graph.nodes
        if node.op == "call_function" and node.target is fused_conv_bn
    ]


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    if len(node.args) != 1:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method":
        return node.target in _RELU_METHODS and not node.kwargs
    return False


def _residual_of_add(node: torch.fx.Node, bn_node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The other operand when `node` is `bn_node + residual` (or the reverse)."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    commutative = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add"
    )
    writes_first = (node.op == "call_function" and node.target in _INPLACE_ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add_"
    )
    other = None
    if (commutative or writes_first) and a is bn_node:
        other = b
    elif commutative and b is bn_node:
        other = a
    return other if isinstance(other, torch.fx.Node) and other is not bn_node else None


# `x += y` and friends, as torch.fx records them
_INPLACE_OPERATORS = frozenset(
    getattr(operator, name)
    for name in (
        "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow",
        "iand", "ior", "ixor", "ilshift", "irshift", "iconcat",
    )
)


def _mutates(node: torch.fx.Node, target: torch.fx.Node, modules: dict) -> bool:
    """Whether `node` may modify `target` in place."""
    if not node.args or node.args[0] is not target:
        return False
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.kwargs.get("inplace", False) or name.endswith("_") or node.target in _INPLACE_OPERATORS
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    return False


def _bn_reason(bn: nn.Module) -> Optional[str]:
    reason = norm_reason(bn, bn_part=True)
    if reason is None and carries_activation(bn) and type(bn.drop) is not nn.Identity:
        return f"its {type(bn.drop).__name__} between the BatchNorm and its activation"
    if reason is None and type(bn) is not FrozenBatchNorm2d and (not bn.track_running_stats or bn.running_mean is None):
        return "the BatchNorm has no running statistics (track_running_stats=False)"
    return reason


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm))


def fuse_graph(model: nn.Module) -> tuple[torch.fx.GraphModule, FuseReport]:
    """Trace `model` and rewrite its conv → BN [→ add] [→ ReLU] chains (module
    docstring). The model's modules are shared with the result, not copied."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # tracing runs arbitrary user code: any error means "cannot trace"
        raise TypeError(
            f"fuse: {type(model).__name__} is not built from torchvision ResNet blocks, and torch.fx cannot "
            f"trace it, so it cannot be fused by graph rewrite ({type(e).__name__}: {e}). Make its forward "
            "traceable (no Python control flow on tensor values), or fuse the traceable submodules one by one."
        ) from e
    graph = gm.graph
    modules = dict(gm.named_modules())
    report = FuseReport("torch.fx graph rewrite")

    for node in list(graph.nodes):
        if node.op == "call_module" and type(modules[node.target]) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    order = {n: i for i, n in enumerate(graph.nodes)}

    for conv_node in list(graph.nodes):
        if conv_node.op != "call_module" or not isinstance(modules[conv_node.target], nn.Conv2d):
            continue
        users = list(conv_node.users)
        bn_node = users[0] if len(users) == 1 else None
        if bn_node is None or bn_node.op != "call_module" or not _is_norm(modules[bn_node.target]):
            if any(u.op == "call_module" and _is_norm(modules[u.target]) for u in users):
                report.unfused.append((conv_node.target, "the convolution's output has other users"))
            continue
        conv, bn = modules[conv_node.target], modules[bn_node.target]
        reason = conv_reason(conv) or _bn_reason(bn)
        if reason is None and (calls[conv_node.target] > 1 or calls[bn_node.target] > 1):
            reason = "the module is called more than once (shared)"
        if reason is None and (len(conv_node.args) != 1 or conv_node.kwargs or bn_node.args != (conv_node,)):
            reason = "unexpected call arguments"
        if reason is not None:
            report.unfused.append((conv_node.target, reason))
            continue

        # how far the chain goes: BN output -> [add] -> [ReLU]; a norm that
        # carries an activation ends the chain there (its act comes before
        # any add): ReLU fuses, another activation runs after the fused call
        last, residual, relu, merged = bn_node, None, False, []
        act = bn.act if carries_activation(bn) and type(bn.act) is not nn.Identity else None
        if act is not None:
            relu = type(act) is nn.ReLU
            merged.append("relu" if relu else f"then {type(act).__name__}")
        elif len(bn_node.users) == 1:
            user = next(iter(bn_node.users))
            if _is_relu(user, modules):
                last, relu = user, True
                merged.append("relu")
            else:
                residual = _residual_of_add(user, bn_node)
                if residual is not None:
                    last = user
                    merged.append("add")
                    if len(user.users) == 1 and _is_relu(next(iter(user.users)), modules):
                        last, relu = next(iter(user.users)), True
                        merged.append("relu")
        x = conv_node.args[0]
        between = [n for n in graph.nodes if order[conv_node] < order.get(n, -1) < order[last]]
        if any(_mutates(n, x, modules) for n in between):
            report.unfused.append((conv_node.target, "its input is modified in place before the chain ends"))
            continue

        with graph.inserting_before(last):
            conv_ref = graph.get_attr(conv_node.target)
            bn_ref = graph.get_attr(bn_node.target)
            fused = graph.call_function(fused_conv_bn, (conv_ref, bn_ref, x, residual, relu))
            if act is not None and not relu:
                fused = graph.call_module(f"{bn_node.target}.act", (fused,))
        last.replace_all_uses_with(fused)
        for n in _chain_nodes(conv_node, bn_node, last)[::-1]:
            graph.erase_node(n)
        report.fused.append(" → ".join([conv_node.target, bn_node.target, *merged]))

    graph.lint()
    gm.recompile()
    # the fused calls read their norm modules whole (a norm carrying an
    # activation keeps its act and drop children, which its forward needs if
    # it ever runs as written): keep those children through the clean-up
    children = [(n, dict(n._modules)) for n in fused_graph_norms(gm)]
    gm.delete_all_unused_submodules()
    for norm, kept in children:
        norm._modules.update(kept)
    return gm, report


def _chain_nodes(conv_node: torch.fx.Node, bn_node: torch.fx.Node, last: torch.fx.Node) -> list:
    """conv, BN, and the add/ReLU nodes up to `last`, in graph order."""
    nodes = [conv_node, bn_node]
    node = bn_node
    while node is not last:
        node = next(iter(node.users))
        nodes.append(node)
    return nodes
