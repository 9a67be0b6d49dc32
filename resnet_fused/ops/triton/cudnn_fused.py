"""cuDNN's own fused convolution as a tuning candidate of the triton
backend's conv_bn_act: `torch.cudnn_convolution_relu` /
`torch.cudnn_convolution_add_relu` (conv + bias [+ z] + ReLU in one cuDNN
call) with the BN's scale folded into a cached copy of the weight and its
shift as the bias.

Why these two and not cuDNN's graph API: they are in every CUDA build of
torch, take the same tensors and layouts as the rest of the backend, and
cover exactly the pairs a ResNet has (ReLU, with or without the identity);
the graph API would add a binding to build and keep for no pattern these
two lack.

Where it applies (`applies`): CUDA tensors outside tracing (the folded
weight is a cache, which a graph cannot hold), fp16/bf16/fp32, ReLU on,
a residual (if any) of the output's full width, and a device on which cuDNN's
ReLU passes NaN through as torch.relu does (`propagates_nan`, probed once
per device: a fused ReLU computed as max(v, 0) would turn NaN into 0,
which no result check on finite data can see). Each use is checked once
against the reference like every candidate (library.triton_conv_bn_act).

Its precision: the folded weight and the bias are rounded to the compute
dtype (the other candidates apply scale and shift in fp32); the tuner's
check holds it to the same tolerance as the others.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from resnet_fused.ops.triton.fold import Affine
from resnet_fused.ops.triton.tuning_cache import CUDNN_FUSED as NAME  # the tuner's name for this choice

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_FOLDED_MAX = 256  # more than any model's convolutions; oldest dropped first
_folded: dict[tuple, tuple] = {}
_nan_safe: dict[str, bool] = {}


def _device_ok(device: torch.device) -> bool:
    return device.type == "cuda"


def applies(x: Tensor, weight: Tensor, residual: Optional[Tensor], relu: bool, residual_channel_offset: int) -> bool:
    real = all(type(t) in (Tensor, torch.nn.Parameter) for t in (x, weight, residual) if t is not None)
    return (
        real
        and _device_ok(x.device)
        and relu
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and (residual is None or (residual_channel_offset == 0 and residual.shape[1] == weight.shape[0]))
        and propagates_nan(x.device)
    )


def _versions(tensors) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


def folded(weight: Tensor, affine: Affine) -> tuple[Tensor, Tensor]:
    """(weight · scale[k], shift) in the weight's dtype and memory format,
    cached per version of the weight and of every tensor the affine reads
    (an optimizer step or an edited BN refolds), and valid only while the
    entry's weight is this very tensor."""
    tensors = (weight, *affine.tensors())
    key = (_versions(tensors), affine.bn, affine.eps, tuple(weight.shape), tuple(weight.stride()), weight.dtype)
    hit = _folded.get(key)
    if hit is not None and hit[0]() is weight:
        return hit[1], hit[2]
    scale, shift = affine.scale_shift()
    with torch.no_grad():
        w = (weight.float() * scale.view(-1, 1, 1, 1)).to(weight.dtype)
        w = w.contiguous(memory_format=torch.channels_last if _channels_last(weight) else torch.contiguous_format)
        b = shift.to(weight.dtype)
    try:
        ref = weakref.ref(weight)
    except TypeError:  # not weak-referenceable: not cached
        return w, b
    if len(_folded) >= _FOLDED_MAX:
        _folded.pop(next(iter(_folded)))
    _folded[key] = (ref, w, b)
    return w, b


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def run(x: Tensor, weight: Tensor, affine: Affine, residual: Optional[Tensor], stride, padding, dilation,
        groups: int, out_like) -> Tensor:
    """relu(conv2d(x, weight·scale) + shift [+ residual]) by one cuDNN call,
    in the op's output layout (`out_like(shape)` allocates it where cuDNN
    picked another)."""
    w, b = folded(weight, affine)
    args = (list(stride), list(padding), list(dilation), groups)
    if residual is None:
        y = torch.cudnn_convolution_relu(x, w, b, *args)
    else:
        y = torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, *args)
    want = out_like(tuple(y.shape))
    if y.stride() != want.stride():
        y = want.copy_(y)
    return y


def propagates_nan(device: torch.device) -> bool:
    """Whether cuDNN's fused ReLU keeps NaN (and ±inf) where torch.relu does,
    on `device`: probed once per device on a small convolution with a NaN
    and an inf in its input, both with and without z."""
    name = str(device)
    if name not in _nan_safe:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # nothing may run outside the graph being captured: probed at a later call
        _nan_safe[name] = _probe(device)
    return _nan_safe[name]


def _probe(device: torch.device) -> bool:
    x = torch.zeros(1, 8, 4, 4, device=device)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2, 2] = float("inf")
    w = torch.zeros(8, 8, 1, 1, device=device)
    w[0, 0] = 1.0  # output channel 0 reads the NaN
    w[1, 1] = 1.0  # output channel 1 reads the +inf
    b = torch.zeros(8, device=device)
    z = torch.zeros(1, 8, 4, 4, device=device)
    try:
        outs = [torch.cudnn_convolution_relu(x, w, b, [1, 1], [0, 0], [1, 1], 1),
                torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, [1, 1], [0, 0], [1, 1], 1)]
    except RuntimeError:  # this build or device has no fused cuDNN convolution
        return False
    want = torch.relu(torch.nn.functional.conv2d(x, w, b))
    return all(torch.equal(torch.isnan(o), torch.isnan(want)) and torch.equal(torch.isinf(o), torch.isinf(want))
               for o in outs)
