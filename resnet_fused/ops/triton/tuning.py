"""Which implementation serves each conv_bn_act shape on a CUDA device.

For every (shape, dtype, layout, device) the first call runs each candidate
once — the Triton implicit-GEMM kernel in each tile configuration of
`conv.CONFIGS`, and cuDNN's convolution followed by the fused Triton
epilogue — checks that run's result against the reference convolution on
the same device, times the candidates that pass, and caches the fastest for
the life of the process. A candidate whose result is wrong is never chosen
(a tiling that miscompiles on this GPU, as Inductor's conv template did at
num_warps >= 8, pytorch#173068). The cache is guarded by a lock, so
concurrent first calls measure once.

A candidate that fails the way a tiling legitimately can — a compile error,
or more shared memory or registers than this GPU has — is skipped; any other
error (a CUDA error above all, which is sticky and poisons every later call)
propagates.

Overrides: `RESNET_FUSED_TRITON_CONV=triton` (implicit GEMM always, tuned
tiles) or `=cudnn` (cuDNN + Triton epilogue always), or `set_choice(key, c)`.
Nothing is timed under TRITON_INTERPRET=1 (there the only candidate tiling is
`conv.INTERPRETER_CONFIG`), while a graph is traced (torch.compile with fake
tensors), or while a CUDA graph is captured (timing would launch and
synchronise inside the capture): a cached choice is used if one exists, else
the shape heuristic `default_config`. Under symbolic shapes (dynamic=True) no
key exists at all — one traced graph serves every size — and the heuristic
decides from the sizes' hints (any tiling is correct for any size, so this
adds no guard).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from resnet_fused.ops.common import is_channels_last

from resnet_fused.ops.triton import conv

CUDNN = "cudnn"
Choice = Union[conv.ConvConfig, str]

_lock = threading.Lock()
_choices: dict[tuple, Choice] = {}


def _failed_candidate_errors() -> tuple[type, ...]:
    """What a tiling that cannot run on this GPU raises: Triton's compile
    errors, ptxas errors and OutOfResources (shared memory, registers) all
    derive from TritonError. CUDA errors (RuntimeError/AcceleratorError) do
    not, and must not be swallowed."""
    from triton.errors import TritonError

    return (TritonError,)


def static_ints(values) -> Optional[tuple[int, ...]]:
    """`values` as plain ints, or None where any is symbolic (a SymInt under
    torch.compile's dynamic shapes: unhashable, and not one size)."""
    if any(isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat)) for v in values):
        return None
    return tuple(int(v) for v in values)


def key(
    x: Tensor, weight: Tensor, residual, relu, stride, padding, dilation, groups, residual_channel_offset=0, mode="auto"
) -> Optional[tuple]:
    """The cache key of one conv_bn_act problem, or None under symbolic
    shapes (keys never hold SymInts)."""
    sizes = static_ints((*x.shape, *weight.shape, *stride, *padding, *dilation, groups))
    if sizes is None:
        return None
    k = (
        sizes[:4], sizes[4:8], x.dtype, is_channels_last(x), is_channels_last(weight),
        residual is not None, bool(relu), sizes[8:10], sizes[10:12], sizes[12:14], sizes[14], str(x.device),
        conv.input_precision(x.dtype), mode,
    )
    if residual is not None and residual.shape[1] != weight.shape[0]:
        narrow = static_ints((residual_channel_offset, residual.shape[1]))
        if narrow is None:
            return None
        k += narrow
    return k


def set_choice(k: tuple, choice: Choice) -> None:
    with _lock:
        _choices[k] = choice


def cached(k: Optional[tuple]):
    if k is None:
        return None
    with _lock:
        return _choices.get(k)


def forced() -> str:
    mode = os.environ.get("RESNET_FUSED_TRITON_CONV", "auto")
    if mode not in ("auto", "triton", CUDNN):
        raise ValueError(f"RESNET_FUSED_TRITON_CONV must be 'auto', 'triton' or 'cudnn', got {mode!r}")
    return mode


def _hint(v, fallback: int) -> int:
    """A size for a heuristic: the value, or a symbolic size's hint without
    adding a guard."""
    if isinstance(v, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return optimization_hint(v, fallback=fallback)
    return int(v)


def default_config(configs: tuple, k_per_group, m) -> conv.ConvConfig:
    """A sensible tile without measuring: the first (widest) one whose N tile
    the output channels fill, with a 64-row tile unless M is large."""
    k_per_group, m = _hint(k_per_group, 64), _hint(m, 4096)
    for cfg in configs:
        if cfg.block_n <= max(16, k_per_group) and (cfg.block_m <= 64 or m >= 4096):
            return cfg
    return configs[-1]


def can_measure(x: Tensor) -> bool:
    """Timing needs real CUDA tensors outside graph tracing and outside
    CUDA-graph capture."""
    from torch._subclasses.fake_tensor import FakeTensor

    return (
        x.device.type == "cuda"
        and not isinstance(x, FakeTensor)
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


def cuda_time(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


# ||out - ref|| / ||ref|| and |out - ref| <= tol·(max|ref| + |ref|) accepted
# per output dtype (and fp32 precision). The reference is the same
# convolution in fp32 without TF32 on the same device. A wrong tiling is
# off by O(1) (lost or doubled tiles), far beyond these.
TOLERANCE = {
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
    (torch.float32, "ieee"): 1e-4,
    (torch.float32, "tf32"): 1e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return TOLERANCE[(dtype, conv.input_precision(dtype))]
    return TOLERANCE[dtype]


def mismatch(out: Tensor, ref: Tensor, tol: float) -> Optional[str]:
    """Why `out` does not match `ref` within `tol`, or None where it does.
    Where the reference is not finite (NaN or inf in the data), `out` must
    not be either; elsewhere both the relative norm and every element must
    be within tolerance (a norm alone would hide one wrong tile)."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite):
        return "non-finite values where the reference has none, or the reverse"
    out, ref = out[finite], ref[finite]
    if ref.numel() == 0:
        return None
    scale = ref.abs().max()
    err = (out - ref).abs()
    norm = ref.norm()
    rel = (err.norm() / norm).item() if norm > 0 else err.norm().item()
    if rel > tol:
        return f"relative error {rel:.3e} > {tol:.0e}"
    worst = (err - tol * (scale + ref.abs())).max().item()
    if worst > 0:
        return f"an element is off by {worst:.3e} beyond tolerance {tol:.0e}"
    return None


def choose(
    k: tuple,
    candidates: dict[Choice, Callable[[], object]],
    measure: Optional[Callable[[Callable[[], object]], float]] = None,
    check: Optional[Callable[[object], Optional[str]]] = None,
) -> Choice:
    """The fastest correct one of `candidates` (choice -> zero-argument
    launcher returning its output) for key `k`: each candidate runs once and
    `check(output)` (None: correct, else why not) must accept it before it
    is timed (by `measure`, default `cuda_time`); then the choice is cached.
    Concurrent first calls measure once. A candidate that fails to compile
    or to fit this GPU is skipped."""
    measure = cuda_time if measure is None else measure
    hit = cached(k)
    if hit is not None:
        return hit
    with _lock:
        if k in _choices:
            return _choices[k]
        times, rejected = {}, {}
        for choice, fn in candidates.items():
            try:
                out = fn()  # compiles; the one run that is checked
                wrong = check(out) if check is not None else None
                if wrong is None:
                    times[choice] = measure(fn)
            except _failed_candidate_errors() as e:
                rejected[choice] = f"{type(e).__name__}: {e}".splitlines()[0]
                continue
            if wrong is not None:
                rejected[choice] = f"wrong result: {wrong}"
                warnings.warn(f"resnet_fused: conv_bn_act candidate {_name(choice)} rejected for {k}: {wrong}")
        if not times:
            why = "; ".join(f"{_name(c)}: {r}" for c, r in rejected.items())
            raise RuntimeError(f"resnet_fused: no conv_bn_act candidate could run for {k} ({why})")
        best = min(times, key=times.get)
        _choices[k] = best
        return best


def _name(choice: Choice) -> str:
    return choice.name if isinstance(choice, conv.ConvConfig) else str(choice)


def pick(
    k: Optional[tuple],
    candidates: dict[Choice, Callable[[], object]],
    heuristic: Callable[[], Choice],
    measurable: bool,
    check: Optional[Callable[[object], Optional[str]]] = None,
) -> Choice:
    """The choice for one call: measured (`choose`) where `measurable` (and
    the shapes are static), else a cached choice, else `heuristic()`."""
    if measurable and k is not None:
        return choose(k, candidates, check=check)
    hit = cached(k)
    return hit if hit is not None else heuristic()
