"""What every validate stage uses: the context a stage process runs in (its
device, its share of the work, where its rows go), checks against a
tolerance, and timing (CUDA events on a GPU, the wall clock on the CPU)."""
from __future__ import annotations

import collections
import contextlib
import json
import math
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_fused import check

# ‖out − ref‖ / ‖ref‖ against a float64 reference on the device, per compute
# dtype; "tf32" is fp32 with TF32 tensor cores allowed (10-bit mantissa).
TOL = {"float64": 1e-12, "float32": 1e-5, "tf32": 5e-3, "bfloat16": 1e-2, "float16": 1e-2}
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass
class Context:
    device: torch.device
    quick: bool
    shard: int
    shards: int
    rows_path: str
    broken: Optional[str] = None  # --self-test-break: the backend made wrong on purpose
    repeats: int = 20  # timed runs per measurement

    def emit(self, **row) -> dict:
        with open(self.rows_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
        return row

    def mine(self, items: list) -> list:
        """This process's share of `items` (every shards-th, from shard)."""
        return items[self.shard::self.shards]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def check(self, table: str, name: str, fn: Callable[[], tuple], **info) -> dict:
        """Run fn() -> (error, tolerance[, extra info dict]) and emit a check
        row; an exception fails the check with its message as the error."""
        try:
            result = fn()
            err, tol = result[0], result[1]
            extra = result[2] if len(result) > 2 else {}
            ok = isinstance(err, (int, float)) and math.isfinite(err) and err <= tol
            return self.emit(table=table, name=name, ok=bool(ok), err=err, tol=tol, **info, **extra)
        except Exception as e:  # a wrong or crashing case is a failed check, not a stopped stage
            detail = traceback.format_exc(limit=-3).strip().splitlines()
            return self.emit(table=table, name=name, ok=False, err=f"{type(e).__name__}: {e}"[:300], tol=None,
                             where=" / ".join(detail[-4:-1])[:300], **info)

    def time_ms(self, fn: Callable[[], object], repeats: int, warmup: Optional[int] = None) -> float:
        """Median milliseconds of fn() over `repeats` calls after `warmup`
        (default 3, 1 with --quick), each timed with CUDA events on a GPU
        (nothing else synchronises inside the timed span)."""
        for _ in range((1 if self.quick else 3) if warmup is None else warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖/‖ref‖ in float64 (inf for non-finite outputs); shapes must match."""
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
    return check.rel_err(out, ref)


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref|: catches a few wrong elements that a norm
    over a large tensor would hide."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def worst_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The larger of the relative L2 and the max-element error."""
    return max(rel_err(out, ref), max_err(out, ref))


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for cuDNN convolutions (and so the Triton kernel's fp32 input
    precision, which follows it) inside the block only."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@contextlib.contextmanager
def one_tile():
    """Inside the block the triton backend's tuner gets only the first tiling
    of each kernel variant (and cuDNN + epilogue in "cudnn" mode): one
    compile per variant instead of one per tiling, seconds apiece on a GPU.
    For checks of a backend's results, not its speed (the tilings
    themselves are checked one by one in the ops stage)."""
    from resnet_fused.ops.triton import conv, tuning

    choose = tuning.choose

    def first_tile(key, candidates, *args, **kwargs):
        tiles = [c for c in candidates if isinstance(c, conv.ConvConfig)]
        if tiles:
            candidates = {tiles[0]: candidates[tiles[0]]}
        return choose(key, candidates, *args, **kwargs)

    tuning.choose = first_tile
    try:
        yield
    finally:
        tuning.choose = choose


def break_backend(name: str) -> None:
    """--self-test-break: make `name`'s ops add 1e-2 to every output, so a
    run proves that validate fails on a wrong backend (tests/test_validate.py)."""
    from resnet_fused import backends

    b = backends.registered(name)

    def wrong(fn):
        def op(*args, **kwargs):
            out = fn(*args, **kwargs)
            return out + 1e-2 if isinstance(out, torch.Tensor) else out

        for attr in ("reads_padded_residual",):
            if hasattr(fn, attr):
                setattr(op, attr, getattr(fn, attr))
        return op

    for op in ("conv_bn_act", "batch_norm_act"):
        if op in b.ops:
            b.ops[op] = wrong(b.ops[op])


def capture_graph(fn: Callable[[], object]) -> tuple[Callable[[], None], object]:
    """fn() run three times on a side stream (tuning, packing and compiling
    done before the capture; nothing is timed during it), then captured in
    a CUDA graph: (replay, the graph's static output). The caller holds the
    contexts fn runs under (no_grad, autocast without its weight cache, the
    backend)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched at the top level, by name (a custom op's
    own inner ops are not seen: the mode is off while it runs): the CPU
    analogue of counting launches, and what the tests count with."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
