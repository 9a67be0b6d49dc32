"""A model, not a measurement: kernel launches, device-memory bytes and FLOPs of
one ResNet inference forward, torchvision eager vs resnet_fused, and the
roofline floor those imply on a named GPU.

Counting rules (inference, every activation in the compute dtype, each tensor
read or written once per kernel — the ideal a kernel can reach, so real
kernels move at least this much):

* torchvision eager, per conv+BN pair: the convolution (reads x and the
  weight, writes y), BatchNorm (reads y and 4 fp32 vectors: mean, var, γ, β;
  writes y), for a block's last pair the residual add (reads y and the
  identity, writes y), and ReLU (reads and writes y): 3 or 4 kernels.
* resnet_fused: one kernel per pair that reads x, the weight, the BN's 4
  vectors (mean, var, γ, β: folded into scale and shift inside the kernel,
  ops/triton/fold.py, so no other launch computes them) and, for a block's
  last pair, the identity, and writes y once. (The `cpu`/`cuda` backends are cuDNN/oneDNN + one epilogue pass: 2
  kernels and one extra read and write of y; `triton` is the one-kernel case
  counted here.)
* both: max pool, average pool and the fc layer, counted the same way.

FLOPs: 2·N·K·P·Q·(C/groups)·R·S per convolution and 2·N·in·out for fc;
element-wise work is not counted (it is bandwidth-bound). The floor on a GPU
is Σ over kernels of max(bytes / bandwidth, FLOPs / peak): each kernel runs at
whichever roof it hits; launch latency and imperfect overlap only add to it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["GPUS", "Kernel", "Traffic", "count", "count_module", "floor_seconds"]

FP32_PARAM = 4  # bytes of a per-channel BN/epilogue vector element


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s, HBM
    # dense tensor-core (or fp32 CUDA-core) FLOP/s per compute dtype
    peak: dict

    def flops_per_s(self, dtype: torch.dtype) -> float:
        return self.peak[dtype]


# NVIDIA datasheet rates (SXM parts, dense, no sparsity). float32 is the
# exact-fp32 CUDA-core rate (TF32 off, as the numerical tests run).
GPUS = {
    "A100": GPU("A100 SXM4 80GB", 2.039e12, {torch.float32: 19.5e12, torch.bfloat16: 312e12, torch.float16: 312e12}),
    "H100": GPU("H100 SXM5 80GB", 3.35e12, {torch.float32: 67e12, torch.bfloat16: 989e12, torch.float16: 989e12}),
    "H200": GPU("H200 SXM 141GB", 4.8e12, {torch.float32: 67e12, torch.bfloat16: 989e12, torch.float16: 989e12}),
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    layer: str  # module name
    op: str  # "conv", "bn", "add", "relu", "conv_bn_act", "maxpool", "avgpool", "fc"
    bytes: int
    flops: int = 0


@dataclasses.dataclass
class Traffic:
    """The kernels of one forward for one implementation."""

    implementation: str
    kernels: list

    @property
    def launches(self) -> int:
        return len(self.kernels)

    @property
    def bytes(self) -> int:
        return sum(k.bytes for k in self.kernels)

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)


def floor_seconds(traffic: Traffic, gpu: GPU, dtype: torch.dtype) -> float:
    """Σ max(bytes / bandwidth, FLOPs / peak) over the kernels."""
    rate = gpu.flops_per_s(dtype)
    return sum(max(k.bytes / gpu.bandwidth, k.flops / rate) for k in traffic.kernels)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclasses.dataclass
class _Conv:
    name: str
    x: tuple
    y: tuple
    weight: tuple
    groups: int
    residual: bool  # the block's last conv: + identity before the ReLU
    relu: bool


def _role(parent: Optional[nn.Module], attr: str) -> tuple[bool, bool]:
    """(residual, relu) of a conv+BN pair from where the conv sits."""
    if isinstance(parent, Bottleneck):
        return (attr == "conv3", True)
    if isinstance(parent, BasicBlock):
        return (attr == "conv2", True)
    if isinstance(parent, ResNet):
        return (False, True)  # the stem
    return (False, False)  # downsample.0: projection + BN, no activation


def _trace(model: nn.Module, input_shape: tuple) -> list:
    """Shapes of every conv / pool / fc call, in call order, on meta tensors."""
    parents = {}
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            parents[child] = (parent, attr, f"{pname}.{attr}" if pname else attr)
    calls = []

    def hook(module, inputs, output):
        parent, attr, name = parents.get(module, (None, "", type(module).__name__))
        x = tuple(inputs[0].shape)
        if isinstance(module, nn.Conv2d):
            residual, relu = _role(parent, attr)
            calls.append(_Conv(name, x, tuple(output.shape), tuple(module.weight.shape), module.groups, residual, relu))
        else:
            calls.append((name, module, x, tuple(output.shape)))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(torch.empty(input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return calls


def _conv_flops(c: _Conv) -> int:
    k, c_g, r, s = c.weight
    return 2 * _numel(c.y) * c_g * r * s


def _kernels(calls: list, esize: int, fused: bool) -> list:
    out = []
    for c in calls:
        if isinstance(c, _Conv):
            x, w, y = _numel(c.x) * esize, _numel(c.weight) * esize, _numel(c.y) * esize
            k = c.y[1]
            if fused:
                extra = y if c.residual else 0
                out.append(Kernel(c.name, "conv_bn_act", x + w + 4 * k * FP32_PARAM + extra + y, _conv_flops(c)))
                continue
            out.append(Kernel(c.name, "conv", x + w + y, _conv_flops(c)))
            out.append(Kernel(c.name, "bn", 2 * y + 4 * k * FP32_PARAM))
            if c.residual:
                out.append(Kernel(c.name, "add", 3 * y))
            if c.relu:
                out.append(Kernel(c.name, "relu", 2 * y))
            continue
        name, module, xs, ys = c
        x, y = _numel(xs) * esize, _numel(ys) * esize
        if isinstance(module, nn.Linear):
            w = module.weight.numel() * esize + (module.bias.numel() * esize if module.bias is not None else 0)
            out.append(Kernel(name, "fc", x + w + y, 2 * xs[0] * module.in_features * module.out_features))
        else:
            out.append(Kernel(name, "maxpool" if isinstance(module, nn.MaxPool2d) else "avgpool", x + y))
    return out


def count_module(module: nn.Module, input_shape: tuple, dtype: torch.dtype) -> dict:
    """{"torchvision": Traffic, "resnet_fused": Traffic} for `module` (a
    torchvision ResNet, or a single BasicBlock/Bottleneck) on `input_shape`.
    The module is run on meta tensors (a copy: nothing computed, nothing
    changed)."""
    import copy

    esize = torch.empty((), dtype=dtype).element_size()
    if any(p.device.type != "meta" for p in module.parameters()):
        module = copy.deepcopy(module).to("meta")
    calls = _trace(module.eval(), tuple(input_shape))
    return {
        "torchvision": Traffic("torchvision", _kernels(calls, esize, fused=False)),
        "resnet_fused": Traffic("resnet_fused", _kernels(calls, esize, fused=True)),
    }


def count(arch: str, batch: int, dtype: torch.dtype, size: int = 224) -> dict:
    """count_module for torchvision.models.<arch>() at batch × 3 × size × size."""
    with torch.device("meta"):
        model = getattr(tvm, arch)()
    return count_module(model, (batch, 3, size, size), dtype)
