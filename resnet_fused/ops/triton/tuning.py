"""Which implementation serves each conv_bn_act shape on a CUDA device.

For every (shape, dtype, layout, device) the first call times each candidate
once — the Triton implicit-GEMM kernel in each tile configuration of
`conv.CONFIGS`, and cuDNN's convolution followed by the fused Triton
epilogue — and the fastest is cached for the life of the process. The cache
is guarded by a lock, so concurrent first calls measure once.

Overrides: `RESNET_FUSED_TRITON_CONV=triton` (implicit GEMM always, tuned
tiles) or `=cudnn` (cuDNN + Triton epilogue always), or `set_choice(key, c)`.
Under TRITON_INTERPRET=1 nothing is timed: the implicit-GEMM kernel runs with
`conv.INTERPRETER_CONFIG`. While a graph is being traced (torch.compile with
fake tensors) nothing can be timed either: a cached choice is used if one
exists, else the shape heuristic `default_config` (the caller decides, see
`library.triton_conv_bn_act`).
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Union

import torch
from torch import Tensor

from resnet_fused.ops.common import is_channels_last

from resnet_fused.ops.triton import conv

CUDNN = "cudnn"
Choice = Union[conv.ConvConfig, str]

_lock = threading.Lock()
_choices: dict[tuple, Choice] = {}


def key(x: Tensor, weight: Tensor, residual, relu, stride, padding, dilation, groups) -> tuple:
    return (
        tuple(x.shape), tuple(weight.shape), x.dtype, is_channels_last(x), is_channels_last(weight),
        residual is not None, stride, padding, dilation, groups, str(x.device),
        conv.input_precision(x.dtype),
    )


def set_choice(k: tuple, choice: Choice) -> None:
    with _lock:
        _choices[k] = choice


def cached(k: tuple):
    with _lock:
        return _choices.get(k)


def forced() -> str:
    mode = os.environ.get("RESNET_FUSED_TRITON_CONV", "auto")
    if mode not in ("auto", "triton", CUDNN):
        raise ValueError(f"RESNET_FUSED_TRITON_CONV must be 'auto', 'triton' or 'cudnn', got {mode!r}")
    return mode


def default_config(configs: tuple, k_per_group: int, m: int) -> conv.ConvConfig:
    """A sensible tile without measuring: the first (widest) one whose N tile
    the output channels fill, with a 64-row tile unless M is large."""
    for cfg in configs:
        if cfg.block_n <= max(16, k_per_group) and (cfg.block_m <= 64 or m >= 4096):
            return cfg
    return configs[-1]


def can_measure(x: Tensor) -> bool:
    """Timing needs real CUDA tensors outside graph tracing."""
    from torch._subclasses.fake_tensor import FakeTensor

    return x.device.type == "cuda" and not isinstance(x, FakeTensor) and not torch.compiler.is_compiling()


def cuda_time(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


def choose(
    k: tuple,
    candidates: dict[Choice, Callable[[], object]],
    measure: Callable[[Callable[[], object]], float] = cuda_time,
) -> Choice:
    """The fastest of `candidates` (choice -> zero-argument launcher) for
    key `k`: measured once per process, then cached. Concurrent first calls
    measure once. A candidate that fails to launch (a tiling that does not
    fit this GPU's shared memory) is skipped."""
    hit = cached(k)
    if hit is not None:
        return hit
    with _lock:
        if k in _choices:
            return _choices[k]
        times = {}
        for choice, fn in candidates.items():
            try:
                times[choice] = measure(fn)
            except Exception:
                continue
        if not times:
            raise RuntimeError(f"resnet_fused: no conv_bn_act candidate could run for {k}")
        best = min(times, key=times.get)
        _choices[k] = best
        return best
