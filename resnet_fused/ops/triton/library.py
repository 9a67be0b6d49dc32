"""torch.library registration of the Triton kernels and the `triton` backend's
op implementations.

The ops are `torch.library.triton_op`s whose kernels are launched through
`wrap_triton`, so torch.compile sees the kernels themselves (no graph break,
no opaque call), and fake tensors get their shapes from the same Python code.
`triton_conv_bn_act` takes a per-channel scale and shift;
`triton_conv_bn_act_eval` takes an eval-mode BN's own tensors and folds them
inside the kernel's epilogue (fold.py), the one launch a model's pair costs.
`triton_batch_norm_act_fwd` has autograd registered; its backward is the op
`triton_batch_norm_act_bwd`.

Under TRITON_INTERPRET=1 kernels are Python functions that cannot be traced
into a graph, so there the same functions are registered as opaque
`custom_op`s instead (fake implementation: the same code, which launches
nothing on tensors without storage). That keeps `opcheck` and
torch.compile meaningful on CPU: they exercise the schema, fake shapes,
autograd and the compiled graph around an opaque call.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from resnet_fused.ops import common, reference
from resnet_fused.ops.triton import batch_norm, conv, conv_tma, cudnn_fused, fold, tuning


def _launchable(*tensors: Optional[Tensor]) -> bool:
    """False while tracing under the interpreter: interpreted kernels cannot
    be traced (wrap_triton hands them back unwrapped) and need real storage,
    which fake and functional tensors lack; their outputs need no values."""
    if not conv.interpreting():
        return True
    return all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors if t is not None)


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (as
    the C++ ops' CUDAGuard does), so tensors on cuda:1 work while device 0
    is current."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _on_device(x: Tensor):
    """The device guard around an op's launches; none while tracing (fake and
    functional tensors launch nothing; a compiled graph guards its own)."""
    if type(x) in (Tensor, torch.nn.Parameter):
        return _device_guard(x.device)
    return contextlib.nullcontext()


def _define(name: str):
    def register(fn):
        if not conv.interpreting():
            return triton_op(name, mutates_args=())(fn)
        op = custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return register


def _wrapped(kernels: dict) -> dict:
    return {name: wrap_triton(k) for name, k in kernels.items()}


def out_needs_int64(shape) -> bool:
    n, k, p, q = shape
    return n * k * p * q > 2**30


@_define("resnet_fused::triton_conv_bn_act")
def triton_conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    residual_channel_offset: int = 0,
) -> Tensor:
    return _conv_affine_act(
        x, weight, fold.Affine.given(scale, shift), residual, relu, stride, padding, dilation, groups,
        residual_channel_offset,
    )


@_define("resnet_fused::triton_conv_bn_act_eval")
def triton_conv_bn_act_eval(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    conv_bias: Optional[Tensor],
    residual: Optional[Tensor],
    relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    residual_channel_offset: int = 0,
) -> Tensor:
    """conv_bn_act with the eval-mode BN folded inside the kernel's epilogue
    (fold.py): one launch per conv+BN pair, no torch op before it."""
    affine = fold.Affine.batch_norm(bn_weight, bn_bias, running_mean, running_var, eps, conv_bias)
    return _conv_affine_act(
        x, weight, affine, residual, relu, stride, padding, dilation, groups, residual_channel_offset
    )


@functools.cache
def _kernels() -> tuple:
    """The kernels as wrap_triton launchers, wrapped once per process (not
    per call): (conv, Hopper conv, batch_norm.KERNELS)."""
    return (
        wrap_triton(conv.conv_bn_act_kernel), wrap_triton(conv_tma.conv_tma_kernel), _wrapped(batch_norm.KERNELS)
    )


def _conv_affine_act(
    x: Tensor, weight: Tensor, affine: fold.Affine, residual: Optional[Tensor], relu: bool, stride, padding,
    dilation, groups: int, residual_channel_offset: int,
) -> Tensor:
    """Both ops' body: the tuned choice among the implicit-GEMM tilings, the
    Hopper kernel's, cuDNN + the epilogue kernel and cuDNN's fused
    convolution (cudnn_fused.py), `affine` their epilogue."""
    from resnet_fused.ops import conv_out_shape

    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    with _on_device(x):
        shape = conv_out_shape(x, weight, stride, padding, dilation)
        launchable = _launchable(x, weight, residual, *affine.tensors())
        kernel, tma_kernel, bn_kernels = _kernels()
        fmt = common.memory_format(x)

        def implicit_gemm(cfg: conv.ConvConfig) -> Tensor:
            out = conv.output_like(x, shape)
            if launchable:
                conv.launch(
                    x, weight, affine, residual, relu, stride, padding, dilation, groups, out, cfg, kernel,
                    residual_channel_offset=residual_channel_offset,
                )
            return out

        def cudnn_then_epilogue() -> Tensor:
            # cuDNN picks its output layout from x's and the weight's; the
            # op's is x's whichever candidate runs
            y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
            if y.stride() != conv.output_strides(shape, fmt):
                y = conv.output_like(x, shape).copy_(y)
            if launchable:
                y = batch_norm.affine_act_(y, affine, residual, relu, bn_kernels, residual_channel_offset)
            return y

        mode = tuning.forced()
        configs = _configs(x, weight, residual, shape)
        candidates = {}
        if mode in ("auto", "triton"):
            candidates.update({cfg: (lambda cfg=cfg: implicit_gemm(cfg)) for cfg in configs})
            # the Hopper kernel's tilings, on sm_90 where it applies: real
            # tensors only (its alignment check reads data_ptr; under tracing
            # the kernel above serves), timed, never a heuristic pick
            if launchable and type(x) in (Tensor, torch.nn.Parameter):
                candidates.update(conv_tma.candidates(
                    x, weight, affine, residual, relu, stride, padding, dilation, groups,
                    residual_channel_offset, tma_kernel))
        if mode in ("auto", tuning.CUDNN):
            candidates[tuning.CUDNN] = cudnn_then_epilogue
            # cuDNN's own conv + bias [+ z] + ReLU, the BN folded into its weight
            if launchable and cudnn_fused.applies(x, weight, residual, relu, residual_channel_offset):
                candidates[cudnn_fused.NAME] = lambda: cudnn_fused.run(
                    x, weight, affine, residual, stride, padding, dilation, groups, lambda s: conv.output_like(x, s)
                )

        def heuristic() -> tuning.Choice:
            if mode == tuning.CUDNN:
                return tuning.CUDNN
            return tuning.default_config(configs, weight.shape[0] // groups, shape[0] * shape[2] * shape[3])

        ref: list[Tensor] = []  # computed once, for the first candidate checked

        def check(out: Tensor):
            if not ref:  # rounded to the output dtype: where that overflows, every candidate does
                ref.append(_reference(
                    x, weight, *affine.scale_shift(), residual, relu, stride, padding, dilation, groups,
                    residual_channel_offset,
                ).to(out.dtype))
            return tuning.mismatch(out, ref[0], tuning.tolerance(x.dtype))

        key = tuning.key(x, weight, residual, relu, stride, padding, dilation, groups, residual_channel_offset, mode)
        choice = tuning.pick(key, candidates, heuristic, launchable and tuning.can_measure(x), check)
        if choice == tuning.CUDNN:
            return cudnn_then_epilogue()
        if isinstance(choice, conv_tma.TmaConfig) or choice == cudnn_fused.NAME:
            if choice in candidates:
                return candidates[choice]()
            # cached for this key, but this call cannot take it (a traced
            # call, an x whose storage offset breaks TMA's alignment, a
            # device whose fused cuDNN ReLU drops NaN)
            choice = heuristic()
            if choice == tuning.CUDNN:
                return cudnn_then_epilogue()
        return implicit_gemm(choice)


def _configs(x: Tensor, weight: Tensor, residual: Optional[Tensor], shape) -> tuple[conv.ConvConfig, ...]:
    """The tilings the tuner may pick for this call (one under the
    interpreter: nothing is tuned there)."""
    if conv.interpreting():
        return (conv.INTERPRETER_CONFIG,)
    index_64 = conv.needs_int64(x, weight, residual) or out_needs_int64(shape)
    return conv.configs_for(x.dtype, weight.shape[1], index_64, conv.channels_contiguous(x, weight, residual))


def _reference(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, residual_channel_offset):
    """What a tuning candidate must match: the convolution in fp32 without
    TF32 (cuDNN on a GPU), then the epilogue, on x's device."""
    residual = common.pad_residual(residual, weight.shape[0], residual_channel_offset)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        return reference.conv_bn_act(
            x.float(), weight.float(), scale, shift, None if residual is None else residual.float(), relu,
            stride, padding, dilation, groups,
        )


@_define("resnet_fused::triton_batch_norm_act_fwd")
def triton_batch_norm_act_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
    residual_channel_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = _kernels()[2] if _launchable(x, weight, bias, residual) else batch_norm.NO_LAUNCH
    with _on_device(x):
        return batch_norm.forward(x, weight, bias, eps, residual, relu, kernels, residual_channel_offset)


@_define("resnet_fused::triton_batch_norm_act_bwd")
def triton_batch_norm_act_bwd(
    grad_out: Tensor,
    x: Tensor,
    out: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
    residual_grad: bool,
    residual_channels: int = -1,
    residual_channel_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    launchable = _launchable(grad_out, x, out, weight, mean, invstd)
    kernels = _kernels()[2] if launchable else batch_norm.NO_LAUNCH
    with _on_device(x):
        return batch_norm.backward(
            grad_out, x, out, weight, mean, invstd, relu, residual_grad, kernels, residual_channels,
            residual_channel_offset,
        )


_bn_setup_context, _bn_backward = common.bn_autograd(triton_batch_norm_act_bwd)
triton_batch_norm_act_fwd.register_autograd(_bn_backward, setup_context=_bn_setup_context)


# ---- the `triton` backend's op implementations ------------------------------


def conv_bn_act(
    x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, residual_channel_offset=0
) -> Tensor:
    if common.conv_bn_act_needs_reference(x, weight, scale, shift, residual):
        residual = common.pad_residual(residual, weight.shape[0], residual_channel_offset)
        return reference.conv_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return torch.ops.resnet_fused.triton_conv_bn_act(
        x, weight, scale.float().contiguous(), shift.float().contiguous(), residual, relu,
        list(stride), list(padding), list(dilation), groups, residual_channel_offset,
    )


def conv_bn_act_eval(
    x, weight, bn_weight, bn_bias, running_mean, running_var, eps, conv_bias, residual, relu, stride, padding,
    dilation, groups, residual_channel_offset=0,
) -> Tensor:
    """ops.conv_bn_act_eval on this backend: the BN folded in the kernel.
    The caller (ops.conv_bn_act_eval) sends float64 and calls autograd
    records through to conv_bn_act instead."""
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return torch.ops.resnet_fused.triton_conv_bn_act_eval(
        x, weight, bn_weight, bn_bias, running_mean, running_var, eps, conv_bias, residual, relu,
        list(stride), list(padding), list(dilation), groups, residual_channel_offset,
    )


conv_bn_act.reads_padded_residual = True  # see ops.conv_bn_act(residual_channel_offset=)
# its tiles are laid out for channels_last (C contiguous: vector loads); models
# run inference there (plan.Plan.channels_last)
conv_bn_act.prefers_channels_last = True
# the eval-mode BN folded in the kernel: ops.conv_bn_act_eval's fast path
conv_bn_act.batch_norm_eval = conv_bn_act_eval

OPS = {
    "conv_bn_act": conv_bn_act,
    **common.train_batch_norm_ops(triton_batch_norm_act_fwd, triton_batch_norm_act_bwd, reads_padded_residual=True),
}
batch_norm_act = OPS["batch_norm_act"]
