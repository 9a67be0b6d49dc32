"""Which implementation serves each conv_bn_act shape on a CUDA device.

Long on purpose: candidate assembly, the reference check, timing and the
in-process/disk cache lookups are one decision per shape (the disk format
itself is in tuning_cache.py).

For every (shape, dtype, layout, device) the first call runs each candidate
once — the Triton implicit-GEMM kernel in each tile configuration of
`conv.configs_for`, and cuDNN's convolution followed by the fused Triton
epilogue — checks that run's result against the reference convolution on
the same device, times the candidates that pass (warm L2: `cuda_time`), and
caches the fastest for the life of the process and on disk
(`tuning_cache`). A candidate whose result is wrong is never chosen (a
tiling that miscompiles on this GPU, as Inductor's conv template did at
num_warps >= 8, pytorch#173068). The cache is guarded by a lock, so
concurrent first calls measure once.

A choice read from disk (same GPU model, same Triton/torch/CUDA/cuDNN/
resnet_fused versions) is checked once per process against the reference
before eager calls use it, and is not timed again; if it fails the check the
shape is tuned afresh.

A candidate that fails the way a tiling legitimately can — a compile error,
or more shared memory or registers than this GPU has — is skipped; any other
error (a CUDA error above all, which is sticky and poisons every later call)
propagates.

Overrides: `RESNET_FUSED_TRITON_CONV=triton` (implicit GEMM always, tuned
tiles) or `=cudnn` (cuDNN + Triton epilogue always), or `set_choice(key, c)`.
Nothing is timed under TRITON_INTERPRET=1 (there the only candidate tiling is
`conv.INTERPRETER_CONFIG`), while a graph is traced (torch.compile with fake
tensors), or while a CUDA graph is captured (timing would launch and
synchronise inside the capture): a choice cached in this process or on disk
is used if one exists, else the shape heuristic `default_config`. Under
symbolic shapes (dynamic=True) no key exists at all — one traced graph
serves every size — and the heuristic decides from the sizes' hints (any
tiling is correct for any size, so this adds no guard).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from resnet_fused.ops.common import is_channels_last

from resnet_fused.ops.triton import conv, tuning_cache

CUDNN = tuning_cache.CUDNN
Choice = Union[conv.ConvConfig, str]

_lock = threading.Lock()
# key -> choice measured, or read from disk and checked, in this process
_choices: dict[tuple, Choice] = {}
# environment (JSON text) -> problem -> choice, as read from disk; unchecked
_persisted: dict[str, dict[str, Choice]] = {}
_environments: dict[str, Optional[dict]] = {}  # device -> tuning_cache.environment
# what `pick` decided, while `recording()` is active (resnet_fused.tune's summary)
_recorders: list[dict] = []


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
    shapes (keys never hold SymInts). The residual's layout is part of it:
    it changes the kernel's loads and which tilings are offered
    (`conv.channels_contiguous`)."""
    sizes = static_ints((*x.shape, *weight.shape, *stride, *padding, *dilation, groups))
    if sizes is None:
        return None
    res = "none" if residual is None else ("nhwc" if is_channels_last(residual) else "nchw")
    k = (
        sizes[:4], sizes[4:8], x.dtype, is_channels_last(x), is_channels_last(weight),
        res, bool(relu), sizes[8:10], sizes[10:12], sizes[12:14], sizes[14], str(x.device),
        conv.input_precision(x.dtype), mode,
    )
    if residual is not None and residual.shape[1] != weight.shape[0]:
        narrow = static_ints((residual_channel_offset, residual.shape[1]))
        if narrow is None:
            return None
        k += narrow
    return k


# a key's device position and length without the narrow-residual pair (see `key`)
_DEVICE, _KEY_LEN = 11, 14


def problem(k: tuple) -> str:
    """A key as text without the device index: what the disk cache and
    resnet_fused.tune's summary name a problem by."""
    (x, w, dtype, x_cl, w_cl, residual, relu, stride, padding, dilation, groups, _device, precision, mode,
     *narrow) = k

    def dims(v):
        return "x".join(map(str, v))

    text = (
        f"x={dims(x)} w={dims(w)} {str(dtype).replace('torch.', '')} "
        f"{'nhwc' if x_cl else 'nchw'}/{'nhwc' if w_cl else 'nchw'} stride={dims(stride)} pad={dims(padding)} "
        f"dil={dims(dilation)} groups={groups} residual={residual} "
        f"{'relu' if relu else 'no-relu'} {precision} {mode}"
    )
    if narrow:
        text += f" residual-channels={narrow[0]}+{narrow[1]}"
    return text


def set_choice(k: tuple, choice: Choice) -> None:
    """Pin a choice for this process (not written to disk)."""
    with _lock:
        _choices[k] = choice


def cached(k: Optional[tuple]):
    if k is None:
        return None
    with _lock:
        return _choices.get(k)


def choices() -> dict:
    """A copy of this process's {key: choice} (for tools: validate's table)."""
    with _lock:
        return dict(_choices)


def clear() -> None:
    """Forget every choice of this process, and what was read from disk
    (the disk cache itself is left alone): the next call per shape reads the
    disk again, as a new process would."""
    with _lock:
        _choices.clear()
        _persisted.clear()
        _environments.clear()


def _environment(device: str) -> Optional[dict]:
    if device not in _environments:
        _environments[device] = tuning_cache.environment(torch.device(device))
    return _environments[device]


def _disk_table(k: tuple) -> tuple[Optional[dict], dict[str, Choice]]:
    """(environment, its persisted choices) for key `k`'s device; call with
    _lock held. Keys not made by `key` (tests pin arbitrary tuples) have none."""
    if len(k) not in (_KEY_LEN, _KEY_LEN + 2) or not tuning_cache.enabled():
        return None, {}
    env = _environment(k[_DEVICE])
    if env is None:
        return None, {}
    name = json.dumps(env, sort_keys=True)
    if name not in _persisted:
        _persisted[name] = tuning_cache.load(env)
    return env, _persisted[name]


def persisted(k: Optional[tuple]) -> Optional[Choice]:
    """The choice an earlier process stored for `k` on disk, or None."""
    if k is None:
        return None
    with _lock:
        env, table = _disk_table(k)
        return table.get(problem(k)) if env is not None else None


def _persist(k: tuple, choice: Choice) -> None:
    """Store a measured choice on disk; call with _lock held."""
    env, table = _disk_table(k)
    if env is None:
        return
    table[problem(k)] = choice
    tuning_cache.store(env, {problem(k): choice})


@contextlib.contextmanager
def recording():
    """Collect {key: choice} of every conv_bn_act call `pick` serves inside
    the block (resnet_fused.tune's summary)."""
    seen: dict = {}
    with _lock:
        _recorders.append(seen)
    try:
        yield seen
    finally:
        with _lock:
            _recorders.remove(seen)


def _record(k: Optional[tuple], choice: Choice) -> None:
    if _recorders and k is not None:
        with _lock:
            for seen in _recorders:
                seen[k] = choice


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


class _CudaClock:
    """CUDA events on the current stream (a seam for the tests, which have no
    GPU and check the order of launches and events with a fake)."""

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def hold(self, launches: int) -> None:
        # keep the GPU busy while the host queues `launches` calls, so their
        # Python launch overhead (tens of µs for a Triton launch) is not timed
        # as GPU time for small layers: ~50 µs per launch at ~2 GHz
        torch.cuda._sleep(100_000 * launches)

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()


def cuda_time(fn: Callable[[], object], clock=None, rounds: int = 5, target_ms: float = 2.0) -> float:
    """Milliseconds per call of `fn`, median over `rounds` rounds of
    back-to-back calls, with warm L2: a warm-up call first and no cache
    flush between calls, because in a network a layer's input was just
    written by the previous layer and its weights are small — timing with a
    cold L2 (triton.testing.do_bench flushes before every call) ranks tiles
    for traffic a real forward does not have. Refuses during CUDA-graph
    capture (the launches would be recorded into the graph, and synchronising
    there is an error)."""
    clock = _CudaClock() if clock is None else clock
    if clock.capturing():
        raise RuntimeError("resnet_fused: conv_bn_act candidates cannot be timed during CUDA-graph capture")
    fn()  # warm-up: operands into L2, any lazy initialisation done
    clock.synchronize()
    start, end = clock.event(), clock.event()
    start.record()
    fn()
    end.record()
    clock.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    calls = max(1, min(100, int(target_ms / estimate)))
    times = []
    for _ in range(rounds):
        start, end = clock.event(), clock.event()
        clock.hold(calls)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        clock.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


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
    is timed (by `measure`, default `cuda_time`); then the choice is cached,
    in the process and on disk. A choice found on disk is checked the same
    way and, if right, used without timing anything. Concurrent first calls
    measure once. A candidate that fails to compile or to fit this GPU is
    skipped."""
    measure = cuda_time if measure is None else measure
    hit = cached(k)
    if hit is not None:
        return hit
    with _lock:
        if k in _choices:
            return _choices[k]
        times, rejected = {}, {}
        env, table = _disk_table(k)
        stored = table.get(problem(k)) if env is not None else None
        if stored is not None and stored in candidates:
            wrong = _run_checked(stored, candidates[stored], check)
            if wrong is None:
                _choices[k] = stored
                return stored
            rejected[stored] = wrong
            warnings.warn(f"resnet_fused: conv_bn_act choice {_name(stored)} from the tuning cache rejected for "
                          f"{k}: {wrong}; tuning the shape again")
        for choice, fn in candidates.items():
            if choice in rejected:
                continue
            wrong = _run_checked(choice, fn, check)
            if wrong is None:
                try:
                    times[choice] = measure(fn)
                    continue
                except _failed_candidate_errors() as e:
                    wrong = f"{type(e).__name__}: {e}".splitlines()[0]
            rejected[choice] = wrong
            if wrong.startswith("wrong result"):
                warnings.warn(f"resnet_fused: conv_bn_act candidate {_name(choice)} rejected for {k}: "
                              f"{wrong[len('wrong result: '):]}")
        if not times:
            why = "; ".join(f"{_name(c)}: {r}" for c, r in rejected.items())
            raise RuntimeError(f"resnet_fused: no conv_bn_act candidate could run for {k} ({why})")
        best = min(times, key=times.get)
        _choices[k] = best
        _persist(k, best)
        return best


def _run_checked(choice: Choice, fn: Callable[[], object], check) -> Optional[str]:
    """Run a candidate once (compiling it) and check its output: None where it
    is right, else why not ("wrong result: ..." or the Triton error of a
    tiling that cannot run here). Other errors propagate."""
    try:
        out = fn()
    except _failed_candidate_errors() as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    wrong = check(out) if check is not None else None
    return None if wrong is None else f"wrong result: {wrong}"


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
    the shapes are static), else a choice cached in this process, else one
    stored on disk, else `heuristic()`. A cached choice that is not among
    this call's candidates (a tiling the code no longer offers, cuDNN under
    RESNET_FUSED_TRITON_CONV=triton) is never used."""
    if measurable and k is not None:
        choice = choose(k, candidates, check=check)
    else:
        choice = next((c for c in (cached(k), persisted(k)) if c is not None and c in candidates), None)
        if choice is None:
            choice = heuristic()
    _record(k, choice)
    return choice
