"""CPU inference as one convolution call per conv+BN pair with the epilogue
fused: the BN scale folded into the weights, the shift as the bias, then
ReLU, or the residual added before the ReLU. The call is oneDNN's
convolution with the epilogue as post-ops, or one of the library's own
kernels where they apply (fp32, output channels a multiple of 16): the 1x1
convolutions as one GEMM with the epilogue before its store
(`torch.ops.resnet_fused.conv1x1`, csrc/cpu/conv1x1.cpp; see
`RESNET_FUSED_CPU_GEMM`), the 3x3 stride-1 ones as Winograd F(4x4, 3x3)
(`torch.ops.resnet_fused.winograd_conv3x3`, csrc/cpu/winograd.cpp) with the
epilogue in its output transform (see `set_cpu_winograd`), and ResNeXt's
grouped 3x3 ones as a direct kernel over 6-pixel x 16-channel tiles
(`torch.ops.resnet_fused.grouped_conv3x3`, csrc/cpu/grouped_conv.cpp; see
`RESNET_FUSED_CPU_GROUPED`).

Long on purpose: the cache entries, their checks and the one-call convolutions
share the `Packed` records and the layout rules, which change together.

Weights are folded and reordered into oneDNN's blocked layout once and kept
in a cache keyed on the conv module, invalidated whenever a source changes
(see `pack`: BN vectors and conv bias compared by value on every call; the conv weight tracked by
`data_ptr`/`_version`, which every in-place op, optimizer step and
`load_state_dict` bumps, edits through `.data` excepted). The cache holds no reference
to the modules (a WeakKeyDictionary), so deepcopy, pickling and garbage
collection of models are unaffected; it costs one extra copy of the conv
weights, four for a Winograd convolution (36 values per 3x3 filter).

Used by the cpu backend's module-level op (`ops/cpu/modules.py`) for
BatchNorm with running statistics on CPU tensors (worked on in channels_last) when no
gradient is being recorded; fp32 and bf16 (including
`torch.autocast("cpu", dtype=torch.bfloat16)`); and by FusedResNet's owned
path (`resnet_fused.stages`), which checks a stretch of blocks with `lookup`
(the cache's checks, no packing) before running their `conv_bn_act` calls
back to back.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from resnet_fused.ops import extension, fold

DTYPES = (torch.float32, torch.bfloat16)


def available() -> Optional[str]:
    """None if the oneDNN fused convolution can run here, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return "this torch has no mkldnn._convolution_pointwise op"
    return None


UNAVAILABLE = available()

if UNAVAILABLE is None:
    # the overloads themselves: an OpOverloadPacket resolves one on every call
    _pointwise = torch.ops.mkldnn._convolution_pointwise.default
    _pointwise_binary = torch.ops.mkldnn._convolution_pointwise.binary
    _pointwise_binary_inplace = torch.ops.mkldnn._convolution_pointwise_.binary


# The library's GEMM for the fp32 1x1 convolutions (csrc/cpu/gemm.h): its
# tiles run as fast as oneDNN's 1x1 kernels or faster on ResNet's layers, each
# call costs ~5 µs instead of oneDNN's ~35, and one packing serves every input
# size. Each output is one fused multiply-add chain over the input channels
# (the same bits on every CPU and thread count; NaN and infinity as in a
# direct convolution). It needs AVX2 with FMA or AVX-512 (its generic kernel
# is a slow reference); RESNET_FUSED_CPU_GEMM=0 keeps the 1x1 convolutions on
# oneDNN (read at import).
_gemm = os.environ.get("RESNET_FUSED_CPU_GEMM", "1").strip().lower() not in ("0", "false", "off", "no")


def _vector_gemm() -> bool:
    """Whether the library's GEMM runs a vector kernel here (AVX2 with FMA, or
    AVX-512), which both the 1x1 and the Winograd convolutions need to pay."""
    return extension.cpu_gemm_isa() != "generic"


def _gemm_fits(conv: nn.Conv2d, dtype: torch.dtype) -> bool:
    """Whether `conv` in `dtype` runs as torch.ops.resnet_fused.conv1x1: an
    fp32 1x1 convolution, no padding, one group, the same stride both ways,
    output channels a multiple of 16, on a CPU with a vector GEMM kernel."""
    w = member(conv, "weight")
    return (
        _gemm and dtype == torch.float32 and extension.is_loaded() and _vector_gemm()
        and tuple(w.shape[2:]) == (1, 1) and tuple(conv.padding) == (0, 0) and conv.groups == 1
        and conv.stride[0] == conv.stride[1] and w.shape[0] % 16 == 0
    )


# The same GEMM for the fp32 k x k convolutions that neither Winograd nor the
# grouped kernel takes: an implicit GEMM over a zero-padded copy of the input
# (csrc/cpu/conv_gemm.cpp). By default it takes only those with fewer than 16
# input channels (the stem), where the GEMM kernel is AVX2: there oneDNN's
# direct kernel (brg_conv_fwd:avx2, as ONEDNN_VERBOSE=1 names it) ran the
# 3 -> 64 7x7 stem 1.12-1.67x slower than this on 2 cores of a Zen 3 (batch 1
# and 8, interleaved runs), while on the 3x3 stride-2 layers it was level or
# faster (0.86-1.05x this); on AVX-512 oneDNN's direct kernels reach the
# machine's peak and an implicit GEMM measured 0.62-0.97x them
# (docs/performance.md).
# RESNET_FUSED_CPU_CONV_GEMM=1 takes every such convolution wherever the GEMM
# has a vector kernel, 0 none (read at import; default: auto, as above).
_conv_gemm = os.environ.get("RESNET_FUSED_CPU_CONV_GEMM", "auto").strip().lower()
if _conv_gemm not in ("auto", "1", "0"):
    raise ValueError(f"RESNET_FUSED_CPU_CONV_GEMM must be 'auto', '1' or '0', got {_conv_gemm!r}")


def _conv_gemm_fits(conv: nn.Conv2d, dtype: torch.dtype) -> bool:
    """Whether `conv` in `dtype` runs as torch.ops.resnet_fused.conv_gemm: an
    fp32 convolution with a kernel larger than 1x1, one group, no dilation,
    the same stride and padding both ways, output channels a multiple of 16;
    by default only with fewer than 16 input channels and where the GEMM
    kernel is AVX2 (RESNET_FUSED_CPU_CONV_GEMM=1: any input channels, any
    vector kernel)."""
    if _conv_gemm == "0" or not (_gemm and dtype == torch.float32 and extension.is_loaded()):
        return False
    isa = extension.cpu_gemm_isa()
    w = member(conv, "weight")
    wanted = isa != "generic" if _conv_gemm == "1" else (isa == "avx2" and w.shape[1] < 16)
    return (
        wanted and tuple(w.shape[2:]) != (1, 1) and conv.groups == 1 and tuple(conv.dilation) == (1, 1)
        and conv.stride[0] == conv.stride[1] and conv.padding[0] == conv.padding[1]
        and isinstance(conv.padding[0], int) and w.shape[0] % 16 == 0
    )


# The library's grouped 3x3 kernel (csrc/cpu/grouped.h) for the fp32 grouped
# convolutions of ResNeXt's blocks: oneDNN runs resnext50's at 27-123 GFLOP/s
# on 2 cores of an AVX2 Zen 3, this kernel at 42-155, 1.12-2.04x faster per
# layer (docs/performance.md). Each output is one fused multiply-add chain over the
# taps and the group's channels (the same bits on every CPU and thread count;
# NaN and infinity as in a direct convolution). RESNET_FUSED_CPU_GROUPED=0
# keeps them on oneDNN (read at import).
_grouped = os.environ.get("RESNET_FUSED_CPU_GROUPED", "1").strip().lower() not in ("0", "false", "off", "no")


def _grouped_fits(conv: nn.Conv2d, dtype: torch.dtype) -> bool:
    """Whether `conv` in `dtype` runs as torch.ops.resnet_fused.grouped_conv3x3:
    an fp32 grouped 3x3 convolution, padding 1, stride 1 or 2 (both ways),
    no dilation, as many output as input channels, a multiple of 16, with 4,
    8 or a multiple of 16 channels per group, on a CPU with a vector GEMM
    kernel (the grouped kernel needs AVX2 as well)."""
    w = member(conv, "weight")
    cg = w.shape[1]
    return (
        _grouped and dtype == torch.float32 and extension.is_loaded() and _vector_gemm() and conv.groups > 1
        and tuple(w.shape[2:]) == (3, 3) and tuple(conv.padding) == (1, 1) and tuple(conv.dilation) == (1, 1)
        and tuple(conv.stride) in ((1, 1), (2, 2)) and w.shape[0] == cg * conv.groups and w.shape[0] % 16 == 0
        and (cg in (4, 8) or cg % 16 == 0)
    )


# Winograd F(4x4, 3x3) for the fp32 3x3 stride-1 convolutions (csrc/cpu/winograd.cpp):
# 1.5-2.5x faster than oneDNN's direct convolution on ResNet's layers, with an
# fp32 error of ~1e-6 (direct: ~4e-7). RESNET_FUSED_CPU_WINOGRAD=0 or
# set_cpu_winograd(False) keeps every convolution on oneDNN.
_winograd = os.environ.get("RESNET_FUSED_CPU_WINOGRAD", "1").strip().lower() not in ("0", "false", "off", "no")


def set_cpu_winograd(enabled: bool) -> None:
    """Whether the `cpu` backend runs fp32 3x3 stride-1 convolutions (C and K
    multiples of 16; with 256+ channels, only inputs of 8 or more 4x4 output
    tiles) as Winograd F(4x4, 3x3) (the default; 1.5-2.5x faster
    than oneDNN on ResNet's 3x3 layers, relative error ~1e-6) or as oneDNN's
    direct convolution (~4e-7). Process-wide; the weight cache repacks on
    the next forward. The environment variable RESNET_FUSED_CPU_WINOGRAD=0
    sets the default to False."""
    global _winograd
    if not isinstance(enabled, bool):
        raise TypeError(f"set_cpu_winograd: enabled must be a bool, got {type(enabled).__name__}")
    _winograd = enabled


def cpu_winograd() -> bool:
    """Whether the `cpu` backend uses Winograd for the convolutions it can
    (see `set_cpu_winograd`)."""
    return _winograd


def _winograd_fits(conv: nn.Conv2d, dtype: torch.dtype, input_size: tuple) -> bool:
    """Whether `conv` in `dtype` on inputs of `input_size` runs as
    torch.ops.resnet_fused.winograd_conv3x3 (where the GEMM has a vector
    kernel: `_vector_gemm`). With fewer than 8 output tiles
    of 4x4 and 256 or more channels, reading the transformed filters (4x the
    weights) costs more than the multiplications it saves: measured 0.5-1.0x
    oneDNN there, 1.1-3.4x everywhere else (batch 1-8, 4x4 to 56x56 maps,
    64-512 channels; docs/performance.md).
    A dilated one (dilation d = padding d, both sides: DeepLab's and FCN's
    layer3/layer4) runs as d² undilated ones on the interleaved sub-images
    (`_space_to_batch`; a map not divisible by d, such as the 65x65 of a
    520² input, is first zero-padded up to one, which reads what the
    convolution's own padding reads)."""
    w = member(conv, "weight")
    d = conv.dilation[0]
    if not (
        _winograd and dtype == torch.float32 and extension.is_loaded() and _vector_gemm()
        and tuple(w.shape[2:]) == (3, 3) and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (d, d) and tuple(conv.padding) == (d, d) and conv.groups == 1
        and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
    ):
        return False
    n, _, h, wd = input_size
    if d > 1 and _sub_image_overhead(h, d) * _sub_image_overhead(wd, d) > 2.0:
        return False
    n, h, wd = n * d * d, -(-h // d), -(-wd // d)
    tiles = n * -(-h // 4) * -(-wd // 4)
    return tiles >= 8 or max(w.shape[0], w.shape[1]) <= 128


def _sub_image_overhead(size: int, d: int) -> float:
    """Along one dimension of a dilated 3x3 convolution (padding d): the
    positions × taps the sub-image Winograd computes (whole 4x4 tiles of
    sub-images padded up to d·⌈size/d⌉) per position × tap that reads the
    input rather than padding — oneDNN's direct convolution skips those.
    DeepLab's layer3/layer4 (d 2 and 4 on 28² or 65²): 1.1-1.3 per
    dimension, Winograd 1.1-1.35x faster; the ASPP's rate 12 on 65² (1.7)
    or 28² (2.2): oneDNN 2x faster (docs/performance.md). Both dimensions'
    product must stay within 2."""
    sub = -(-size // d)  # each sub-image's side, padded
    computed = 3 * d * 4 * -(-sub // 4)  # 3 taps over whole 4-wide tiles of d sub-images
    live = size + 2 * max(0, size - d)  # the centre tap everywhere, each outer one on size - d
    return computed / live if live > 0 else float("inf")


# bf16 convolutions need oneDNN's bf16 kernels, which need AVX-512 (BW, VL,
# DQ) or AVX-NE-CONVERT; without them (e.g. AVX2-only CPUs) bf16 layers
# compute in fp32 on bf16-rounded weights and inputs and round each output to
# bf16 (`Packed.dtype` is then float32): bf16 in and out, fp32 inside.
BF16_NATIVE = UNAVAILABLE is None and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the oneDNN path computes a `dtype` layer in (see BF16_NATIVE)."""
    return torch.float32 if dtype == torch.bfloat16 and not BF16_NATIVE else dtype


@dataclasses.dataclass(frozen=True)
class Packed:
    # BN-scaled and reordered: an mkldnn tensor; with `winograd` the
    # Winograd transform, 36 (C x K) matrices (torch.ops.resnet_fused.winograd_weight);
    # with `gemm` the GEMM's panels (torch.ops.resnet_fused.conv_gemm_weight,
    # for a 1x1 kernel the same as conv1x1_weight);
    # with `grouped` the grouped kernel's (torch.ops.resnet_fused.grouped_conv3x3_weight);
    # those three are shared by every input size
    weight: Tensor
    bias: Tensor  # BN shift (+ scaled conv bias), compute dtype
    kernel_size: tuple
    stride: list
    padding: list
    dilation: list
    groups: int
    out_shape: tuple  # the output's (N, K, P, Q) for the input size it was packed for
    winograd: bool = False
    gemm: bool = False
    grouped: bool = False
    # every folded weight and bias value is finite (else `lookup` never
    # returns it, and the layer runs the composed path: see conv_bn_act)
    finite: bool = True
    dtype: torch.dtype = torch.float32  # what it computes in (compute_dtype of the layer's)


# Packed weights per input size, at most this many per convolution: oneDNN
# picks its blocked weight layout for the input size, so each size gets its
# own reorder, kept until the convolution has seen more sizes than this
# (the oldest goes first). The folded bias, the finite check and the
# Winograd transform do not depend on the size and are shared by all of them
# (a new size folds the weight again: cheap, and nothing more to keep).
SIZES_PER_CONV = 8


class _Entry:
    """One convolution's cache entry: what its packed weights were made of
    (checked on every call) and the packed weights per input size."""

    __slots__ = ("key", "saved", "bias", "finite", "winograd_weight", "gemm_weight", "grouped_weight", "by_size")

    def __init__(self, key: tuple, saved: tuple, bias: Tensor, finite: bool) -> None:
        self.key, self.saved, self.bias, self.finite = key, saved, bias, finite
        self.winograd_weight: Optional[Tensor] = None
        self.gemm_weight: Optional[Tensor] = None
        self.grouped_weight: Optional[Tensor] = None
        self.by_size: dict = {}


_cache: "weakref.WeakKeyDictionary[nn.Module, _Entry]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


_ABSENT = object()


def member(module: nn.Module, name: str):
    """`getattr(module, name)` for a registered parameter or buffer, read from
    the module's own dicts: `nn.Module.__getattr__` costs ~0.7 µs a call,
    and the inference path reads ~8 of them per convolution per forward.
    Registered names never live in the instance `__dict__` (`nn.Module`
    keeps them out), so this finds what attribute access finds."""
    value = module._parameters.get(name, _ABSENT)
    if value is _ABSENT:
        value = module._buffers.get(name, _ABSENT)
        if value is _ABSENT:
            return getattr(module, name)
    return value


def _sources(conv: nn.Conv2d, bn: Optional[nn.Module]) -> tuple:
    """The small tensors the folded weights and bias are made of (no `bn`:
    a plain convolution, its bias only)."""
    if bn is None:
        return (member(conv, "bias"),)
    return (
        member(bn, "weight"), member(bn, "bias"), member(bn, "running_mean"), member(bn, "running_var"),
        member(conv, "bias"),
    )


def _key(conv: nn.Conv2d, bn: Optional[nn.Module], dtype: torch.dtype) -> tuple:
    # the sources' dtypes, devices and shapes are checked with their values;
    # the input size is not part of it (see SIZES_PER_CONV)
    w = member(conv, "weight")
    return (
        w.data_ptr(), w._version, w.dtype, w.device, w.shape, None if bn is None else float(bn.eps), dtype,
        tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups, _winograd, _gemm, _conv_gemm,
        _grouped,
    )


def _same_values_py(saved: tuple, current: tuple) -> bool:
    return all(
        a is None if b is None else (
            a is not None and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)
        )
        for a, b in zip(saved, current)
    )


# `_C.same_values` (one C call: dtype, device, shape and bits of every pair)
# when the extension is built, else torch.equal per pair
_same_values = extension._C.same_values if extension.is_loaded() else _same_values_py


def _valid_entry(conv: nn.Conv2d, bn: Optional[nn.Module], dtype: torch.dtype) -> Optional[_Entry]:
    entry = _cache.get(conv)
    if entry is not None and entry.key == _key(conv, bn, dtype) and _same_values(entry.saved, _sources(conv, bn)):
        return entry
    return None


def lookup(conv: nn.Conv2d, bn: Optional[nn.Module], dtype: torch.dtype, input_size: tuple) -> Optional[Packed]:
    """The cached `Packed` for (conv, bn) in `dtype` for inputs of
    `input_size` when nothing it is made of changed (the checks `pack`
    makes) and its weights are finite, else None; never packs. A hit also says that this convolution
    already ran on inputs of this size (packing follows the argument checks),
    so its shapes need no checking again."""
    entry = _valid_entry(conv, bn, dtype)
    return None if entry is None or not entry.finite else entry.by_size.get(input_size)


def pack(conv: nn.Conv2d, bn: Optional[nn.Module], dtype: torch.dtype, input_size: tuple) -> Packed:
    """The folded, reordered weights for (conv, bn) in `dtype` for inputs of
    `input_size`, from the cache when nothing they are made of changed.

    The BN's four vectors and the conv bias (a few hundred floats) are
    compared by value with the ones the cached weights were made from, on
    every call, so every change to them is seen, even one made through
    `.data`. The convolution weight is too large to compare each call: it is
    tracked by `data_ptr` and `_version`, which in-place ops, optimizer steps
    and `load_state_dict` all bump — but edits through `.data` do not
    (PyTorch gives `.data` its own version counter); call `clear_cache()`
    after those. oneDNN picks the blocked weight layout for the input size,
    so each new size reorders once (see SIZES_PER_CONV); a Winograd
    convolution's transform serves every size."""
    entry = _valid_entry(conv, bn, dtype)
    hit = None if entry is None else entry.by_size.get(input_size)
    if hit is not None:
        return hit
    from resnet_fused import ops

    compute = compute_dtype(dtype)
    with torch.no_grad():
        weight, shift = fold.folded(conv, bn)
        if entry is None:
            saved = tuple(None if t is None else t.detach().clone() for t in _sources(conv, bn))
            finite = bool(torch.isfinite(weight).all()) and bool(torch.isfinite(shift).all())
            entry = _Entry(_key(conv, bn, dtype), saved, shift.to(compute), finite)
        winograd = entry.finite and _winograd_fits(conv, compute, input_size)
        gemm = entry.finite and not winograd and (_gemm_fits(conv, compute) or _conv_gemm_fits(conv, compute))
        grouped = entry.finite and _grouped_fits(conv, compute)
        if winograd and entry.winograd_weight is None:
            entry.winograd_weight = extension.winograd_weight(weight)
        if gemm and entry.gemm_weight is None:  # a 1x1 weight packs as conv1x1_weight packs it
            entry.gemm_weight = extension.conv_gemm_weight(weight)
        if grouped and entry.grouped_weight is None:
            entry.grouped_weight = extension.grouped_conv3x3_weight(weight)
        if winograd:
            packed_weight = entry.winograd_weight
        elif gemm:
            packed_weight = entry.gemm_weight
        elif grouped:
            packed_weight = entry.grouped_weight
        else:
            packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
                weight.to(compute), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                list(input_size),
            )
        packed = Packed(
            weight=packed_weight,
            bias=entry.bias,
            kernel_size=tuple(conv.weight.shape[2:]),
            stride=list(conv.stride),
            padding=list(conv.padding),
            dilation=list(conv.dilation),
            groups=conv.groups,
            out_shape=ops.conv_out_size(input_size, conv.weight.shape, conv.stride, conv.padding, conv.dilation),
            winograd=winograd,
            gemm=gemm,
            grouped=grouped,
            finite=entry.finite,
            dtype=compute,
        )
    with _lock:
        if len(entry.by_size) >= SIZES_PER_CONV:
            del entry.by_size[next(iter(entry.by_size))]
        entry.by_size[input_size] = packed
        _cache[conv] = entry
    return packed


def cached(conv: nn.Module) -> tuple:
    """The `Packed` weights cached for `conv`, one per input size, oldest
    first (for tests and diagnostics)."""
    entry = _cache.get(conv)
    return () if entry is None else tuple(entry.by_size.values())


def clear_cache() -> None:
    """Forget every packed weight (they are rebuilt on the next forward).
    Needed only after editing a convolution weight through `.data`."""
    with _lock:
        _cache.clear()


def all_finite(t: Tensor) -> bool:
    """Whether every value of `t` is finite, from one summing pass: a NaN or
    an infinity makes the sum non-finite. A sum that overflows from finite
    values says False too, which only costs the composed path's speed."""
    return bool(torch.isfinite(t.sum()))


def conv_bn_act(x: Tensor, packed: Packed, residual: Optional[Tensor], relu: bool, consume_residual: bool = False) -> Tensor:
    """`act(conv(x) · scale + shift + residual)` as one call (oneDNN, the
    GEMM where `packed.gemm`, the Winograd kernel where `packed.winograd`,
    the grouped kernel where `packed.grouped`);
    the output has x's memory
    format and dtype. `consume_residual`: the caller gives up `residual`, and
    oneDNN writes the result into it when its dtype and layout allow
    (in-place sum: no new buffer). For finite x, residual and weights only
    (see `lookup`, `all_finite`): oneDNN's ReLU post-op maps NaN to 0, and
    Winograd spreads a NaN or an infinity over whole tiles."""
    if x.dtype != packed.dtype:
        # bf16 without oneDNN's bf16 kernels: the convolution in fp32, its
        # output rounded to bf16, then the residual added as bf16 + bf16 (one
        # rounding; the sum of two rounded operands, so the same bits
        # whichever of a projection block's two convolutions runs first)
        out = conv_bn_act(x.to(packed.dtype), packed, None, relu and residual is None).to(x.dtype)
        if residual is None:
            return out
        out = out.add_(residual.to(x.dtype))
        return out.relu_() if relu else out
    if packed.gemm and packed.kernel_size != (1, 1):
        residual = None if residual is None else residual.to(x.dtype)
        return extension.conv_gemm(
            x, packed.weight, packed.bias, residual, relu, packed.kernel_size, packed.stride[0], packed.padding[0]
        )
    if packed.gemm:
        stride = packed.stride[0]
        if residual is None:
            return extension.conv1x1(x, packed.weight, packed.bias, None, relu, stride)
        residual = residual.to(x.dtype)
        if (
            consume_residual and residual.is_contiguous(memory_format=torch.channels_last)
            and x.is_contiguous(memory_format=torch.channels_last)
            and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        ):
            extension.conv1x1_add_(residual, x, packed.weight, packed.bias, relu, stride)
            return residual
        return extension.conv1x1(x, packed.weight, packed.bias, residual, relu, stride)
    if packed.grouped:
        residual = None if residual is None else residual.to(x.dtype)
        return extension.grouped_conv3x3(x, packed.weight, packed.bias, residual, relu, packed.stride[0])
    if packed.winograd:
        d = packed.dilation[0]
        residual = None if residual is None else residual.to(x.dtype)
        if d == 1:
            return extension.winograd_conv3x3(x, packed.weight, packed.bias, residual, relu)
        # dilation d: the d² interleaved sub-images are independent undilated
        # 3x3 convolutions with padding 1
        out = extension.winograd_conv3x3(
            _space_to_batch(x, d), packed.weight, packed.bias,
            None if residual is None else _space_to_batch(residual, d), relu,
        )
        return _batch_to_space(out, d, x.shape, x.is_contiguous(memory_format=torch.channels_last))
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) \
        else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    if residual is None:
        return _pointwise(
            x, packed.weight, packed.bias, packed.padding, packed.stride, packed.dilation, packed.groups,
            "relu" if relu else "none", [], "",
        )
    residual = residual.to(x.dtype).contiguous(memory_format=fmt)
    if consume_residual and fmt == torch.channels_last and residual.is_contiguous(memory_format=fmt):
        return _pointwise_binary_inplace(
            residual, x, packed.weight, packed.bias, packed.padding, packed.stride, packed.dilation, packed.groups,
            "add", 1.0, "relu" if relu else None, [], "",
        )
    return _pointwise_binary(
        x, residual, packed.weight, packed.bias, packed.padding, packed.stride, packed.dilation, packed.groups,
        "add", None, "relu" if relu else None, [], "",
    )


def _space_to_batch(t: Tensor, d: int) -> Tensor:
    """(N, C, H, W) -> (N·d·d, C, ⌈H/d⌉, ⌈W/d⌉) channels_last: sub-image
    (i, j) holds t[:, :, i::d, j::d], the maps zero-padded at the bottom and
    right up to multiples of d (zeros where the dilated convolution's own
    padding lies, so every sub-image convolution reads what it would)."""
    n, c, h, w = t.shape
    hd, wd = -(-h // d), -(-w // d)
    nhwc = t.permute(0, 2, 3, 1)
    if (hd * d, wd * d) != (h, w):
        padded = nhwc.new_zeros(n, hd * d, wd * d, c)
        padded[:, :h, :w] = nhwc
        nhwc = padded
    nhwc = nhwc.reshape(n, hd, d, wd, d, c)
    return nhwc.permute(0, 2, 4, 1, 3, 5).reshape(n * d * d, hd, wd, c).permute(0, 3, 1, 2)


def _batch_to_space(t: Tensor, d: int, size: tuple, channels_last: bool) -> Tensor:
    """The inverse of `_space_to_batch` for an (N, ·, H, W) `size`, in the
    input's layout."""
    n, _, h, w = size
    _, k, hd, wd = t.shape
    nhwc = t.permute(0, 2, 3, 1).reshape(n, d, d, hd, wd, k).permute(0, 3, 1, 4, 2, 5).reshape(n, hd * d, wd * d, k)
    out = nhwc[:, :h, :w].permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def cache_size() -> int:
    """Number of conv modules with packed weights (for tests and diagnostics)."""
    return len(_cache)
