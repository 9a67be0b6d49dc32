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
exists, else the shape heuristic `default_config`.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Union

import torch
from torch import Tensor

from resnet_fused.ops.triton import conv

CUDNN = "cudnn"
Choice = Union[conv.ConvConfig, str]

_lock = threading.Lock()
_choices: dict[tuple, Choice] = {}


def key(x: Tensor, weight: Tensor, residual, relu, stride, padding, dilation, groups) -> tuple:
    return (
        tuple(x.shape), tuple(weight.shape), x.dtype, conv._is_channels_last(x), conv._is_channels_last(weight),
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


def _is_tracing(*tensors: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) for t in tensors) or torch.compiler.is_compiling()


def choose(k: tuple, x: Tensor, candidates: dict[Choice, Callable[[], object]], fallback: Choice) -> Choice:
    """The fastest of `candidates` (name -> zero-argument launcher) for key
    `k`, measured once; `fallback` where nothing can be measured."""
    if conv.interpreting():
        return conv.INTERPRETER_CONFIG
    hit = cached(k)
    if hit is not None:
        return hit
    if _is_tracing(x) or x.device.type != "cuda":
        return fallback
    from triton.testing import do_bench

    with _lock:
        if k in _choices:
            return _choices[k]
        times = {}
        for name, fn in candidates.items():
            try:
                times[name] = do_bench(fn, warmup=5, rep=20)
            except Exception:  # a tile that does not fit this GPU (shared memory, registers)
                continue
        best = min(times, key=times.get) if times else fallback
        _choices[k] = best
        return best
