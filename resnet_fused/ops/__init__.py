"""Functional fused ops: the contracts every backend honours (docs/design.md §4).

Each public function validates its arguments once, here, with errors that name
the argument, then hands the call to the backend selected for the input's
device (see `resnet_fused.backends`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from resnet_fused import backends
from resnet_fused.ops import common, conv_grad, fold, recompute, reference

__all__ = ["conv_bn_act", "conv_bn_act_eval", "batch_norm_act", "conv_bn_act_train"]

IntPair = Union[int, Sequence[int]]

backends.register(
    backends.Backend(
        name="eager",
        device_types=("cpu", "cuda", "meta", "mps", "xpu"),
        ops={
            "conv_bn_act": reference.conv_bn_act,
            "batch_norm_act": reference.batch_norm_act,
            "batch_norm_act_parts": recompute.EAGER_PARTS,
        },
    )
)


def _pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v >= minimum for v in value):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return value  # type: ignore[return-value]


def check_activation(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be floating point (float32, float16, bfloat16 or float64), got {t.dtype}"
        )


def check_channel_vector(name: str, t: Optional[Tensor], channels: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    check_device(name, t, device)


def check_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; all tensors must be on one device")


def check_residual(residual: Optional[Tensor], shape: tuple, x: Tensor, channel_offset: Optional[int] = None) -> None:
    if channel_offset is not None and (not isinstance(channel_offset, int) or isinstance(channel_offset, bool)):
        raise TypeError(f"residual_channel_offset must be an int or None, got {channel_offset!r}")
    if residual is None:
        return
    check_activation("residual", residual)
    check_device("residual", residual, x.device)
    if channel_offset is None:
        if tuple(residual.shape) != tuple(shape):
            raise ValueError(f"residual must have the output's shape {tuple(shape)}, got {tuple(residual.shape)}")
        return
    n, k, p, q = shape
    c = residual.shape[1]
    if (residual.shape[0], residual.shape[2], residual.shape[3]) != (n, p, q) or not 0 <= channel_offset <= k - c:
        raise ValueError(
            f"with residual_channel_offset={channel_offset}, residual must have shape ({n}, C, {p}, {q}) with "
            f"0 <= {channel_offset} <= {k} - C (it fills output channels [offset, offset + C)); "
            f"got {tuple(residual.shape)}"
        )


def check_batch_norm(
    weight: tuple, bias: tuple, running_mean, running_var, momentum, eps, channels: int, x, training: bool
) -> None:
    """BatchNorm arguments; `weight` and `bias` are (name, tensor) pairs."""
    for name, t in (weight, bias, ("running_mean", running_mean), ("running_var", running_var)):
        check_channel_vector(name, t, channels, x.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if training and eps == 0:  # torch's rule: batch statistics of a constant channel would divide by 0
        raise ValueError(f"eps must be positive in training (as in F.batch_norm), got {eps!r}")


def check_relu(relu) -> None:
    # a string or a tensor would be truthy: "no" must not mean yes
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__} {relu!r}")


def _call_with_residual(impl, args_before: tuple, residual, args_after: tuple, channels: int, offset):
    """impl(*args_before, residual, *args_after), handing a channel-padded
    residual (docs/design.md §4: residual_channel_offset) to implementations that read
    it in place, and a materialised zero-padded copy to the others."""
    if residual is None or offset is None:
        return impl(*args_before, residual, *args_after)
    if getattr(impl, "reads_padded_residual", False):
        return impl(*args_before, residual, *args_after, residual_channel_offset=offset)
    return impl(*args_before, common.pad_residual(residual, channels, offset), *args_after)


def _autocast(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Apply autocast's conv2d policy explicitly, so that every backend (not
    only the ones built from autocast-aware torch ops) sees one dtype."""
    dtype = common.autocast_dtype(x.device.type)
    if dtype is None:
        return x, weight
    # autocast leaves float64 alone
    cast = [t.to(dtype) if t.dtype != torch.float64 else t for t in (x, weight)]
    return cast[0], cast[1]


def conv_out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int, int, int]:
    return conv_out_size(x.shape, weight.shape, stride, padding, dilation)


def conv_out_size(input_size, weight_size, stride, padding, dilation) -> tuple[int, int, int, int]:
    """(N, K, P, Q) of a convolution of an (N, C, H, W) input with a (K, C/g, R, S) weight."""
    n, _, h, w = input_size
    k, _, r, s = weight_size
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return n, k, p, q


def check_conv(x, weight, stride, padding, dilation, groups, autocast: bool = True):
    """Validate a convolution's arguments (after autocast's casts, unless
    `autocast=False`: then dtypes are not compared); returns (x, weight,
    stride, padding, dilation, output shape)."""
    check_activation("x", x)
    check_activation("weight", weight)
    check_device("weight", weight, x.device)
    if autocast:
        x, weight = _autocast(x, weight)
    if autocast and weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    k, c_per_group, r, s = weight.shape
    if k % groups != 0:
        raise ValueError(f"groups={groups} must divide the output channels of weight ({k})")
    if x.shape[1] != c_per_group * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects {c_per_group * groups} "
            f"(weight.shape[1]={c_per_group} x groups={groups})"
        )
    out_shape = conv_out_shape(x, weight, stride, padding, dilation)
    if out_shape[2] < 1 or out_shape[3] < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[2:])} is too small for a {r}x{s} kernel with "
            f"padding={padding} and dilation={dilation}"
        )
    return x, weight, stride, padding, dilation, out_shape


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    residual_channel_offset: Optional[int] = None,
) -> Tensor:
    """`act(conv2d(x, weight) * scale[k] + shift[k] + residual)` in one pass.

    `scale`/`shift` are per-output-channel vectors (fp32 recommended), usually
    `γ / sqrt(var + eps)` and `β − mean·scale` from a BatchNorm in eval mode;
    see `resnet_fused.bn_scale_shift` (ops/fold.py). The epilogue runs in fp32 and the
    result has x's dtype and memory format (NCHW or channels_last).

    `residual_channel_offset` (an int) allows a residual with fewer channels
    than the output, (N, C_r, P, Q): it is added to output channels
    [offset, offset + C_r) and the others get none — the zero-padded identity
    shortcut of the ResNet paper's option A, whose spatial subsampling is a
    strided view (`x[:, :, ::2, ::2]`) that is also read in place. Backends
    that cannot read it in place get a zero-padded copy.

    Differentiable in x, weight, scale, shift and residual on every backend.
    With autograd recording (BN-in-eval fine-tuning, FrozenBatchNorm2d) the
    kernel backends still run their fused forward, with the backward of
    `ops/conv_grad.py`; float64, torch.compile and torch.jit.trace take the
    reference composition instead (`conv_grad.applies` says why).
    """
    x, weight, stride, padding, dilation, out_shape = check_conv(x, weight, stride, padding, dilation, groups)
    k = weight.shape[0]
    check_channel_vector("scale", scale, k, x.device)
    check_channel_vector("shift", shift, k, x.device)
    check_residual(residual, out_shape, x, residual_channel_offset)
    check_relu(relu)
    impl = backends.resolve("conv_bn_act", x.device)
    return _run_conv_bn_act(
        impl, x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, residual_channel_offset
    )


def _run_conv_bn_act(impl, x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, offset):
    """conv_bn_act on checked arguments: backend implementation `impl`,
    through ops/conv_grad.py's Function where autograd records."""
    k = weight.shape[0]

    def run(x, weight, scale, shift, residual):
        return _call_with_residual(
            impl, (x, weight, scale, shift), residual, (relu, stride, padding, dilation, groups), k, offset
        )

    if conv_grad.applies(impl, x, weight, scale, shift, residual):
        return conv_grad.conv_bn_act(run, x, weight, scale, shift, residual, relu, stride, padding, dilation, groups,
                                     offset)
    return run(x, weight, scale, shift, residual)


def batch_norm_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    residual_channel_offset: Optional[int] = None,
) -> Tensor:
    """`act(F.batch_norm(x, ...) + residual)` with F.batch_norm's exact semantics.

    In training the running statistics (when given) are updated in place with
    the unbiased batch variance and factor `momentum`; the caller (the module)
    owns `num_batches_tracked` and passes the cumulative-average factor when
    its momentum is None. Differentiable in x, weight, bias and residual.
    `residual_channel_offset`: as in `conv_bn_act`.
    """
    check_activation("x", x)
    channels = x.shape[1]
    check_batch_norm(
        ("weight", weight), ("bias", bias), running_mean, running_var, momentum, eps, channels, x, training
    )
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    if training and x.numel() > 0 and x.numel() // channels <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got x of shape {tuple(x.shape)}"
        )
    check_residual(residual, tuple(x.shape), x, residual_channel_offset)
    check_relu(relu)
    impl = backends.resolve("batch_norm_act", x.device)
    return _call_with_residual(
        impl, (x, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps)), residual,
        (relu,), channels, residual_channel_offset,
    )


def conv_bn_act_train(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    residual_channel_offset: Optional[int] = None,
) -> Tensor:
    """`act(F.batch_norm(conv2d(x, weight), training=True) + residual)`,
    keeping no convolution output for backward: the convolution is recomputed
    there (one more convolution forward per call, one activation tensor less
    held per call). Same semantics, arguments and running-statistics update
    as `conv2d` followed by `batch_norm_act(..., training=True)`; the BN half
    runs on the selected backend's train-mode kernels. `residual_channel_offset`:
    as in `conv_bn_act` (here the padded residual is always materialised)."""
    x, weight, stride, padding, dilation, out_shape, residual = check_conv_bn_act_train(
        x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual, relu,
        stride, padding, dilation, groups, residual_channel_offset,
    )
    if 0 < out_shape[0] * out_shape[2] * out_shape[3] <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got a convolution output of shape {out_shape}"
        )
    parts = backends.resolve("batch_norm_act_parts", x.device)
    return recompute.conv_bn_act_train(
        parts, x, weight, bn_weight, bn_bias, running_mean, running_var, float(momentum), float(eps),
        residual, relu, stride, padding, dilation, groups,
    )


def conv_bn_act_eval(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float = 1e-5,
    conv_bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    residual_channel_offset: Optional[int] = None,
) -> Tensor:
    """`act(F.batch_norm(conv2d(x, weight, conv_bias), running_mean,
    running_var, bn_weight, bn_bias, training=False, eps=eps) + residual)`:
    `conv_bn_act` taking the BatchNorm's own tensors (BatchNorm2d in eval,
    FrozenBatchNorm2d), what a model's conv+BN pair calls.

    A backend that folds the BN itself runs the pair with no torch op before
    it: the `triton` backend inside its kernel's epilogue (one launch,
    ops/triton/fold.py), the `cpu`/`cuda` backends in their C++ epilogue
    (the convolution, then `bn_eval_add_relu_`). Elsewhere, and where
    autograd records through the call or x is float64, scale and shift come
    from ops/fold.py `scale_shift` and `conv_bn_act` runs.
    `residual_channel_offset`: as in `conv_bn_act`."""
    x, weight, stride, padding, dilation, out_shape = check_conv(x, weight, stride, padding, dilation, groups)
    k = weight.shape[0]
    if running_mean is None or running_var is None:
        raise ValueError("conv_bn_act_eval needs running_mean and running_var (eval-mode BatchNorm)")
    check_batch_norm(("bn_weight", bn_weight), ("bn_bias", bn_bias), running_mean, running_var, 0.0, eps, k, x, False)
    check_channel_vector("conv_bias", conv_bias, k, x.device)
    check_residual(residual, out_shape, x, residual_channel_offset)
    check_relu(relu)
    impl = backends.resolve("conv_bn_act", x.device)
    folds = getattr(impl, "batch_norm_eval", None)
    if folds is None or not common.conv_bn_act_kernels_take(x) or common.records_grad(
        x, weight, bn_weight, bn_bias, running_mean, running_var, conv_bias, residual
    ):
        scale, shift = fold.scale_shift(bn_weight, bn_bias, running_mean, running_var, eps, conv_bias)
        return _run_conv_bn_act(
            impl, x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, residual_channel_offset
        )
    return folds(
        x, weight, bn_weight, bn_bias, running_mean, running_var, float(eps), conv_bias, residual, relu,
        stride, padding, dilation, groups, 0 if residual_channel_offset is None else residual_channel_offset,
    )


def check_conv_bn_act_train(
    x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual, relu,
    stride, padding, dilation, groups, residual_channel_offset,
):
    """The argument checks of `conv_bn_act_train` and of its SyncBatchNorm
    variant (ops/sync_batch_norm.py, which leaves the more-than-one-value rule
    to the whole group): (x, weight, stride, padding, dilation, out_shape,
    residual), the residual zero-padded to full width where it was narrower."""
    x, weight, stride, padding, dilation, out_shape = check_conv(x, weight, stride, padding, dilation, groups)
    k = weight.shape[0]
    check_batch_norm(
        ("bn_weight", bn_weight), ("bn_bias", bn_bias), running_mean, running_var, momentum, eps, k, x, True
    )
    check_residual(residual, out_shape, x, residual_channel_offset)
    check_relu(relu)
    if residual_channel_offset is not None:
        residual = common.pad_residual(residual, k, residual_channel_offset)
    return x, weight, stride, padding, dilation, out_shape, residual


def check_batch_norm_act_train(
    x, weight, bias, running_mean, running_var, momentum, eps, residual, relu, residual_channel_offset,
) -> int:
    """The argument checks of a training `batch_norm_act` shared with its
    SyncBatchNorm variant; returns the channel count."""
    check_activation("x", x)
    channels = x.shape[1]
    check_batch_norm(("weight", weight), ("bias", bias), running_mean, running_var, momentum, eps, channels, x, True)
    check_residual(residual, tuple(x.shape), x, residual_channel_offset)
    check_relu(relu)
    return channels
