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

try:
    from resnet_fused import _C  # noqa: F401  (loading it registers the ops)

    load_error: Optional[BaseException] = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    load_error = e
    warnings.warn(
        f"resnet_fused: the compiled extension resnet_fused._C could not be loaded ({e}); "
        "only the 'eager' backend is available. Reinstall with "
        "`pip install --no-build-isolation .` against the torch you run with.",
        RuntimeWarning,
        stacklevel=2,
    )

OP_NAMES = ("scale_shift_add_relu_",)


def is_loaded() -> bool:
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `_C` registered a `dispatch_key` ("CPU", "CUDA") kernel for `op`."""
    return is_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", dispatch_key)


def unavailable_reason(dispatch_key: str) -> Optional[str]:
    """None if `_C` has kernels for `dispatch_key`, else why not."""
    if not is_loaded():
        return f"resnet_fused._C could not be loaded ({load_error})"
    if not has_kernel(OP_NAMES[0], dispatch_key):
        if dispatch_key == "CUDA":
            return (
                "resnet_fused._C was built without CUDA kernels (CPU-only torch, no nvcc, or "
                "RESNET_FUSED_NO_CUDA=1 at build time)"
            )
        return f"resnet_fused._C has no {dispatch_key} kernels"
    return None


def scale_shift_add_relu_(
    y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None, relu: bool = True
) -> Tensor:
    """In place: `y = act(y * scale[c] + shift[c] + residual)`; returns y.

    y is NCHW- or channels_last-contiguous; scale/shift are fp32 vectors of
    length C; residual has y's shape and dtype (any layout; y itself is allowed).
    """
    if _C is None:
        raise RuntimeError(f"scale_shift_add_relu_ needs resnet_fused._C, which could not be loaded ({load_error})")
    torch.ops.resnet_fused.scale_shift_add_relu_(y, scale, shift, residual, relu)
    return y


if _C is not None:

    @torch.library.register_fake("resnet_fused::scale_shift_add_relu_")
    def _scale_shift_add_relu_fake(y, scale, shift, residual, relu):
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
