"""The `triton` backend: Triton kernels for conv_bn_act (implicit-GEMM
convolution with the fused epilogue) and train-mode batch_norm_act.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slowly,
for tests). Importing this package never fails: without Triton the backend
is registered as unavailable with the reason.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from resnet_fused import backends

try:
    import triton  # noqa: F401

    _import_error: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - triton ships with CUDA torch
    _import_error = e


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device() -> str:
    """Where Triton kernels run here: CUDA tensors when a GPU is visible and
    the interpreter is off, else CPU tensors (under TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def unavailable_reason() -> Optional[str]:
    if _import_error is not None:
        return f"Triton could not be imported ({_import_error}); `pip install triton`"
    if not interpreting() and not torch.cuda.is_available():
        return (
            "no CUDA device is visible to torch (Triton kernels need one; "
            "TRITON_INTERPRET=1 runs them on CPU tensors, slowly, for testing)"
        )
    return None


if _import_error is None:
    from resnet_fused.ops.triton import library

    _ops = dict(library.OPS)
else:
    _ops = {}

backends.register(
    backends.Backend(
        "triton",
        ("cuda", "cpu") if interpreting() else ("cuda",),
        _ops,
        unavailable_reason,
    )
)
