"""Thin wrappers over torch.ops.resnet_fused.* (the C++/CUDA library `_C`).

Importing this module loads `_C` if it was built. When it was not (or fails
to load, e.g. after a torch upgrade), `resnet_fused` still imports: a single
warning says why, and the `eager` backend serves every op.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from resnet_fused.ops import common

try:
    from resnet_fused import _C  # noqa: F401  (loading it registers the ops)

    load_error: Optional[BaseException] = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    load_error = e
    warnings.warn(
        f"resnet_fused: the compiled extension resnet_fused._C could not be loaded ({e}); "
        "the 'cpu' and 'cuda' backends are unavailable. Reinstall with "
        "`pip install --no-build-isolation .` against the torch you run with.",
        RuntimeWarning,
        stacklevel=2,
    )

OP_NAMES = ("scale_shift_add_relu_", "bn_eval_add_relu_", "batch_norm_act_fwd", "batch_norm_act_bwd")
_reasons: dict[str, Optional[str]] = {}


def is_loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """How `_C` was built: {"openmp": whether its CPU kernels run on
    torch.get_num_threads() threads, "cpu_targets": the instruction sets its
    CPU hot loops were compiled for, chosen by the CPU at load time}."""
    if _C is None:
        raise RuntimeError(_load_failure_reason())
    return _C.build_info()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `_C` registered a `dispatch_key` ("CPU", "CUDA") kernel for `op`."""
    return is_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", dispatch_key)


def _load_failure_reason() -> str:
    return f"resnet_fused._C could not be loaded ({load_error})"


if _C is None:
    from resnet_fused import backends as _backends

    _backends.mark_reported(_load_failure_reason())  # warned above; auto stays quiet


def unavailable_reason(dispatch_key: str) -> Optional[str]:
    """None if `_C` has kernels for `dispatch_key`, else why not. Computed
    once per key (what `_C` registered does not change after loading), so
    that code traced by torch.compile only reads a dict."""
    if dispatch_key not in _reasons:
        _reasons[dispatch_key] = _unavailable_reason(dispatch_key)
    return _reasons[dispatch_key]


def _unavailable_reason(dispatch_key: str) -> Optional[str]:
    if not is_loaded():
        return _load_failure_reason()
    if not all(has_kernel(op, dispatch_key) for op in OP_NAMES):
        if dispatch_key == "CUDA":
            return (
                "resnet_fused._C was built without CUDA kernels (CPU-only torch, no nvcc, or "
                "RESNET_FUSED_NO_CUDA=1 at build time)"
            )
        return f"resnet_fused._C has no {dispatch_key} kernels"
    return None


def scale_shift_add_relu_(
    y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None, relu: bool = True,
    residual_channel_offset: int = -1,
) -> Tensor:
    """In place: `y = act(y * scale[c] + shift[c] + residual)`; returns y.

    y is NCHW- or channels_last-contiguous; scale/shift are fp32 vectors of
    length C; residual has y's dtype and shape (any strides; y itself is
    allowed) or, with residual_channel_offset >= 0 (default -1: must match),
    y's shape with C_r <= C - offset channels, added to channels
    [offset, offset + C_r) only. The CPU kernel reads any
    residual in place, without a copy.
    """
    if _C is None:
        raise RuntimeError(f"scale_shift_add_relu_ needs resnet_fused._C, which could not be loaded ({load_error})")
    torch.ops.resnet_fused.scale_shift_add_relu_(y, scale, shift, residual, relu, residual_channel_offset)
    return y


if _C is not None:

    @torch.library.register_fake("resnet_fused::scale_shift_add_relu_")
    def _scale_shift_add_relu_fake(y, scale, shift, residual, relu, residual_channel_offset=-1):
        # Mirrors csrc/epilogue_checks.h for tracing (torch.compile, meta tensors).
        prefix = "scale_shift_add_relu_: "
        torch._check(y.dim() == 4, lambda: f"{prefix}y must be a 4-D (N, C, H, W) tensor, got {y.dim()}-D")
        for name, t in (("scale", scale), ("shift", shift)):
            torch._check(
                t.shape == (y.shape[1],),
                lambda: f"{prefix}{name} must be a 1-D tensor of length C={y.shape[1]}, got shape {tuple(t.shape)}",
            )
            torch._check(t.device == y.device, lambda: f"{prefix}{name} is on {t.device} but y is on {y.device}")
        if residual is not None:
            torch._check(
                residual.device == y.device,
                lambda: f"{prefix}residual is on {residual.device} but y is on {y.device}",
            )


def bn_eval_add_relu_(
    y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
    eps: float, conv_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None, relu: bool = True,
    residual_channel_offset: int = -1,
) -> Tensor:
    """In place: `scale_shift_add_relu_` with scale and shift folded from an
    eval-mode BN's fp32 tensors on the device (`ops/fold.py`'s formula and
    bits, csrc/epilogue.h `bn_scale_shift`); returns y."""
    if _C is None:
        raise RuntimeError(f"bn_eval_add_relu_ needs resnet_fused._C, which could not be loaded ({load_error})")
    torch.ops.resnet_fused.bn_eval_add_relu_(
        y, weight, bias, running_mean, running_var, eps, conv_bias, residual, relu, residual_channel_offset
    )
    return y


if _C is not None:

    @torch.library.register_fake("resnet_fused::bn_eval_add_relu_")
    def _bn_eval_add_relu_fake(y, weight, bias, running_mean, running_var, eps, conv_bias, residual, relu,
                               residual_channel_offset=-1):
        # Mirrors csrc/epilogue_checks.h for tracing (torch.compile, meta tensors).
        prefix = "bn_eval_add_relu_: "
        torch._check(y.dim() == 4, lambda: f"{prefix}y must be a 4-D (N, C, H, W) tensor, got {y.dim()}-D")
        for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var), ("conv_bias", conv_bias)):
            if t is None:
                continue
            torch._check(
                t.shape == (y.shape[1],),
                lambda: f"{prefix}{name} must be a 1-D tensor of length C={y.shape[1]}, got shape {tuple(t.shape)}",
            )
            torch._check(t.device == y.device, lambda: f"{prefix}{name} is on {t.device} but y is on {y.device}")
        torch._check(eps >= 0, lambda: f"{prefix}eps must be non-negative, got {eps}")


def batch_norm_act_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
    residual_channel_offset: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch-statistics BN + residual + ReLU: (out, mean, invstd, biased var).
    With `residual_channel_offset >= 0` the residual may be narrower than x
    (added from that channel on); any strides; the CPU kernel reads it in place.

    Differentiable in x, weight, bias and residual. Saved for backward: x,
    out (the tensor the next layer keeps anyway), mean and invstd (C values
    each) and weight.
    """
    if _C is None:
        raise RuntimeError(f"batch_norm_act_train needs resnet_fused._C, which could not be loaded ({load_error})")
    return torch.ops.resnet_fused.batch_norm_act_fwd(x, weight, bias, eps, residual, relu, residual_channel_offset)


def batch_norm_act_backward(
    grad_out: Tensor, x: Tensor, out: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
    relu: bool, residual_grad: bool, residual_channels: int = -1, residual_channel_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel of `batch_norm_act_train`: (grad_x, grad_weight,
    grad_bias, grad_residual or an empty tensor); grad_residual has
    `residual_channels` channels (-1: all of x's) from the offset."""
    if _C is None:
        raise RuntimeError(f"batch_norm_act_backward needs resnet_fused._C, which could not be loaded ({load_error})")
    return torch.ops.resnet_fused.batch_norm_act_bwd(
        grad_out, x, out, weight, mean, invstd, relu, residual_grad, residual_channels, residual_channel_offset
    )


def max_pool2d(
    x: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False
) -> Tensor:
    """`F.max_pool2d(x, ...)` for inference, without the indices ATen computes
    on the way: the same values, bit for bit (window order, NaN and tie rule;
    a NaN's payload bits are not part of that).
    CPU only. On a channels_last x the library's vectorised kernel runs and
    the output is channels_last; any other layout is ATen's max_pool2d. Not
    differentiable: call it where no gradient is recorded."""
    if _C is None:
        raise RuntimeError(f"max_pool2d needs resnet_fused._C, which could not be loaded ({load_error})")
    pair = torch.nn.modules.utils._pair
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = kernel_size
    return torch.ops.resnet_fused.max_pool2d(
        x, list(pair(kernel_size)), list(pair(stride)), list(pair(padding)), list(pair(dilation)), bool(ceil_mode)
    )


def winograd_weight(weight: Tensor) -> Tensor:
    """The Winograd F(4x4, 3x3) transform G g Gᵀ of a (K, C, 3, 3) fp32 CPU
    weight (K a multiple of 16), computed in float64 and rounded once: a
    (36, C·K) tensor, each point's (C x K) matrix packed for the CPU GEMM
    (csrc/cpu/gemm.h)."""
    if _C is None:
        raise RuntimeError(f"winograd_weight needs resnet_fused._C, which could not be loaded ({load_error})")
    return torch.ops.resnet_fused.winograd_weight(weight)


# The inference hot path calls the op overload itself (bound once: an
# OpOverloadPacket resolves one on every call): act(conv3x3(x) + bias +
# residual), stride 1, padding 1, weight from winograd_weight; fp32 CPU, C and
# K multiples of 16; the output in x's memory format; no autograd.
winograd_conv3x3 = None if _C is None else torch.ops.resnet_fused.winograd_conv3x3.default


def conv1x1_weight(weight: Tensor) -> Tensor:
    """A (K, C, 1, 1) fp32 CPU weight packed for the CPU GEMM (csrc/cpu/gemm.h):
    panels of 64 output channels, K a multiple of 16."""
    if _C is None:
        raise RuntimeError(f"conv1x1_weight needs resnet_fused._C, which could not be loaded ({load_error})")
    return torch.ops.resnet_fused.conv1x1_weight(weight)


def cpu_gemm_isa(isa: Optional[str] = None) -> str:
    """The CPU GEMM kernel in use: "avx512", "avx2" or "generic" (a slow
    reference, where neither is there). With `isa`, switch to it first (""
    picks the best this CPU has); every kernel gives the same bits."""
    if _C is None:
        raise RuntimeError(f"cpu_gemm_isa needs resnet_fused._C, which could not be loaded ({load_error})")
    return _C.cpu_gemm_isa() if isa is None else _C.cpu_gemm_isa(isa)


def cpu_output_cache_bytes() -> int:
    """Bytes the CPU inference kernels hold for reuse: blocks of 1 MB or
    more that their outputs (conv1x1, winograd_conv3x3, grouped_conv3x3, max_pool2d) freed,
    kept for the next output of the same size so it needs no new pages; at
    most 256 MB, the oldest given back first (csrc/cpu/output_cache.h)."""
    if _C is None:
        raise RuntimeError(f"cpu_output_cache_bytes needs resnet_fused._C, which could not be loaded ({load_error})")
    return _C.cpu_output_cache_bytes()


# act(conv1x1(x) + bias + residual) with stride s, weight from conv1x1_weight;
# fp32 CPU; the output in x's memory format (conv1x1_add_: written into the
# channels_last residual); no autograd.
conv1x1 = None if _C is None else torch.ops.resnet_fused.conv1x1.default
conv1x1_add_ = None if _C is None else torch.ops.resnet_fused.conv1x1_add_.default


def conv_gemm_weight(weight: Tensor) -> Tensor:
    """A (K, C, R, S) fp32 CPU weight packed for the CPU GEMM as (R·S·C) x K
    (csrc/cpu/conv_gemm.cpp): panels of 64 output channels, K a multiple of 16."""
    if _C is None:
        raise RuntimeError(f"conv_gemm_weight needs resnet_fused._C, which could not be loaded ({load_error})")
    return torch.ops.resnet_fused.conv_gemm_weight(weight)


# act(conv(x) + bias + residual) for an R x S kernel, stride s, padding p, as
# an implicit GEMM, weight from conv_gemm_weight; fp32 CPU; the output in x's
# memory format; no autograd.
conv_gemm = None if _C is None else torch.ops.resnet_fused.conv_gemm.default


def grouped_conv3x3_weight(weight: Tensor) -> Tensor:
    """A grouped (C, C / groups, 3, 3) fp32 CPU weight (C a multiple of 16, C /
    groups 4, 8 or a multiple of 16) reordered for the grouped 3x3 kernel
    (csrc/cpu/grouped.h): (C / 16, 3, 3, C / groups, 16)."""
    if _C is None:
        raise RuntimeError(f"grouped_conv3x3_weight needs resnet_fused._C, which could not be loaded ({load_error})")
    return torch.ops.resnet_fused.grouped_conv3x3_weight(weight)


# act(grouped_conv3x3(x) + bias + residual), padding 1, stride 1 or 2, weight
# from grouped_conv3x3_weight (its shape gives the groups); fp32 CPU; the
# output in x's memory format; no autograd.
grouped_conv3x3 = None if _C is None else torch.ops.resnet_fused.grouped_conv3x3.default


def pool_layout_is_own(x: Tensor) -> bool:
    """Whether resnet_fused::max_pool2d runs its own kernel on x (else ATen's):
    channels_last by its strides, unambiguously (C > 1, H·W > 1)."""
    return x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def _fake_channel_stats(x: Tensor) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[1],), dtype=acc)


if _C is not None:

    @torch.library.register_fake("resnet_fused::batch_norm_act_fwd")
    def _batch_norm_act_fwd_fake(x, weight, bias, eps, residual, relu, residual_channel_offset=-1):
        torch._check(x.dim() == 4, lambda: f"batch_norm_act: x must be a 4-D (N, C, H, W) tensor, got {x.dim()}-D")
        out = torch.empty_like(x, memory_format=common.memory_format(x))
        return out, _fake_channel_stats(x), _fake_channel_stats(x), _fake_channel_stats(x)

    @torch.library.register_fake("resnet_fused::batch_norm_act_bwd")
    def _batch_norm_act_bwd_fake(
        grad_out, x, out, weight, mean, invstd, relu, residual_grad, residual_channels=-1, residual_channel_offset=0
    ):
        fmt = common.memory_format(x)
        n, c, h, w = x.shape
        c_res = c if residual_channels < 0 else residual_channels
        grad_res = (
            torch.empty((n, c_res, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
            if residual_grad else x.new_empty((0,))
        )
        return (
            torch.empty_like(x, memory_format=fmt),
            _fake_channel_stats(x),
            _fake_channel_stats(x),
            grad_res,
        )

    @torch.library.register_fake("resnet_fused::max_pool2d")
    def _max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
        torch._check(x.dim() == 4, lambda: f"max_pool2d: x must be a 4-D (N, C, H, W) tensor, got {x.dim()}-D")
        torch._check(
            x.is_floating_point(),
            lambda: f"max_pool2d: x must be float32, float64, bfloat16 or float16, got {x.dtype}",
        )
        # shape and argument checks: ATen's meta function
        y = torch.ops.aten.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        return torch.empty_like(y, memory_format=torch.channels_last) if pool_layout_is_own(x) else y

    @torch.library.register_fake("resnet_fused::winograd_weight")
    def _winograd_weight_fake(weight):
        torch._check(
            weight.dim() == 4 and weight.shape[2] == 3 and weight.shape[3] == 3,
            lambda: f"winograd_weight: weight must be (K, C, 3, 3), got {tuple(weight.shape)}",
        )
        torch._check(weight.shape[0] % 16 == 0,
                     lambda: f"winograd_weight: output channels must be a multiple of 16, got K={weight.shape[0]}")
        return weight.new_empty((36, weight.shape[1] * weight.shape[0]))

    @torch.library.register_fake("resnet_fused::winograd_conv3x3")
    def _winograd_conv3x3_fake(x, weight, bias, residual, relu):
        torch._check(x.dim() == 4, lambda: f"winograd_conv3x3: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        c = x.shape[1]
        torch._check(
            weight.dim() == 2 and weight.shape[0] == 36 and c > 0 and weight.shape[1] % c == 0,
            lambda: f"winograd_conv3x3: weight must be (36, C * K) with C={c}, got {tuple(weight.shape)}",
        )
        n, _, h, w = x.shape
        return torch.empty((n, weight.shape[1] // c, h, w), dtype=x.dtype, device=x.device,
                           memory_format=common.memory_format(x))

    def _conv1x1_out_shape(op, x, weight, stride):
        torch._check(x.dim() == 4, lambda: f"{op}: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        torch._check(stride >= 1, lambda: f"{op}: stride must be at least 1, got {stride}")
        c = x.shape[1]
        torch._check(
            weight.dim() == 1 and c > 0 and weight.shape[0] % c == 0 and (weight.shape[0] // c) % 16 == 0,
            lambda: f"{op}: weight ({weight.shape[0]} values) does not hold a multiple of 16 output channels of "
            f"x's {c} input channels",
        )
        n, _, h, w = x.shape
        return (n, weight.shape[0] // c, (h - 1) // stride + 1 if h else 0, (w - 1) // stride + 1 if w else 0)

    @torch.library.register_fake("resnet_fused::conv1x1_weight")
    def _conv1x1_weight_fake(weight):
        torch._check(
            weight.dim() == 4 and weight.shape[2] == 1 and weight.shape[3] == 1,
            lambda: f"conv1x1_weight: weight must be (K, C, 1, 1), got {tuple(weight.shape)}",
        )
        return weight.new_empty((weight.numel(),))

    @torch.library.register_fake("resnet_fused::conv1x1")
    def _conv1x1_fake(x, weight, bias, residual, relu, stride=1):
        shape = _conv1x1_out_shape("conv1x1", x, weight, stride)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=common.memory_format(x))

    @torch.library.register_fake("resnet_fused::conv1x1_add_")
    def _conv1x1_add_fake(residual, x, weight, bias, relu, stride=1):
        shape = _conv1x1_out_shape("conv1x1_add_", x, weight, stride)
        torch._check(tuple(residual.shape) == shape,
                     lambda: f"conv1x1_add_: residual must be {list(shape)}, the output's shape, got "
                     f"{list(residual.shape)}")

    @torch.library.register_fake("resnet_fused::conv_gemm_weight")
    def _conv_gemm_weight_fake(weight):
        torch._check(weight.dim() == 4, lambda: f"conv_gemm_weight: weight must be (K, C, R, S), got {tuple(weight.shape)}")
        torch._check(weight.shape[0] % 16 == 0,
                     lambda: f"conv_gemm_weight: output channels must be a multiple of 16, got K={weight.shape[0]}")
        return weight.new_empty((weight.numel(),))

    @torch.library.register_fake("resnet_fused::conv_gemm")
    def _conv_gemm_fake(x, weight, bias, residual, relu, kernel_size, stride=1, padding=0):
        torch._check(x.dim() == 4, lambda: f"conv_gemm: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        torch._check(len(kernel_size) == 2 and min(kernel_size) >= 1,
                     lambda: f"conv_gemm: kernel_size must be two positive sizes (R, S), got {list(kernel_size)}")
        torch._check(stride >= 1, lambda: f"conv_gemm: stride must be at least 1, got {stride}")
        torch._check(padding >= 0, lambda: f"conv_gemm: padding must be at least 0, got {padding}")
        n, c, h, w = x.shape
        r, s = kernel_size
        taps = r * s * c
        torch._check(
            weight.dim() == 1 and c > 0 and weight.shape[0] % taps == 0 and (weight.shape[0] // taps) % 16 == 0,
            lambda: f"conv_gemm: weight ({weight.shape[0]} values) does not hold a multiple of 16 output channels of "
            f"{r}x{s} taps over x's {c} input channels",
        )
        torch._check(h + 2 * padding >= r and w + 2 * padding >= s,
                     lambda: f"conv_gemm: the padded input ({h + 2 * padding}x{w + 2 * padding}) is smaller than "
                     f"the kernel ({r}x{s})")
        shape = (n, weight.shape[0] // taps, (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1)
        if residual is not None:
            torch._check(tuple(residual.shape) == shape,
                         lambda: f"conv_gemm: residual must be {list(shape)}, the output's shape, got "
                         f"{list(residual.shape)}")
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=common.memory_format(x))

    @torch.library.register_fake("resnet_fused::grouped_conv3x3_weight")
    def _grouped_conv3x3_weight_fake(weight):
        torch._check(
            weight.dim() == 4 and weight.shape[2] == 3 and weight.shape[3] == 3,
            lambda: f"grouped_conv3x3_weight: weight must be (C, C / groups, 3, 3), got {tuple(weight.shape)}",
        )
        c, cg = weight.shape[0], weight.shape[1]
        torch._check(cg in (4, 8) or (cg > 0 and cg % 16 == 0),
                     lambda: f"grouped_conv3x3_weight: channels per group (weight.size(1)) must be 4, 8 or a "
                     f"multiple of 16, got {cg}")
        torch._check(c % 16 == 0 and c % cg == 0,
                     lambda: f"grouped_conv3x3_weight: output channels must be a multiple of 16 and of the {cg} "
                     f"channels per group, got {c}")
        return weight.new_empty((c // 16, 3, 3, cg, 16))

    @torch.library.register_fake("resnet_fused::grouped_conv3x3")
    def _grouped_conv3x3_fake(x, weight, bias, residual, relu, stride=1):
        torch._check(x.dim() == 4, lambda: f"grouped_conv3x3: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        torch._check(
            weight.dim() == 5 and tuple(weight.shape[1:3]) == (3, 3) and weight.shape[4] == 16,
            lambda: f"grouped_conv3x3: weight must be a (C / 16, 3, 3, C / groups, 16) tensor from "
            f"grouped_conv3x3_weight, got {tuple(weight.shape)}",
        )
        torch._check(stride in (1, 2), lambda: f"grouped_conv3x3: stride must be 1 or 2, got {stride}")
        n, c, h, w = x.shape
        torch._check(weight.shape[0] * 16 == c,
                     lambda: f"grouped_conv3x3: weight is for {weight.shape[0] * 16} channels, x has {c}")
        shape = (n, c, (h - 1) // stride + 1 if h else 0, (w - 1) // stride + 1 if w else 0)
        if residual is not None:
            torch._check(tuple(residual.shape) == shape,
                         lambda: f"grouped_conv3x3: residual must be {list(shape)}, the output's shape, got "
                         f"{list(residual.shape)}")
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=common.memory_format(x))

    # autograd of batch_norm_act_fwd: csrc/autograd.cpp (C++, to keep the
    # interpreter out of every training step's 2 x 53 BN calls)


for _key in ("CPU", "CUDA"):
    unavailable_reason(_key)
