import atexit
import os
import shutil
import tempfile
from typing import Optional

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter.
# This must happen before resnet_fused (and so every @triton.jit) is imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The suite never reads or writes a user's tuning cache (~/.cache/resnet_fused,
# ops/triton/tuning_cache.py): with a GPU it tunes into a directory of its own,
# fresh each run; under the interpreter the disk cache stays off except where
# a test points it at a temporary directory.
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    os.environ.pop("RESNET_FUSED_CACHE_DIR", None)
else:
    os.environ["RESNET_FUSED_CACHE_DIR"] = tempfile.mkdtemp(prefix="resnet_fused_tuning_")
    atexit.register(shutil.rmtree, os.environ["RESNET_FUSED_CACHE_DIR"], ignore_errors=True)

# Exact fp32 everywhere: the equivalence tolerances below assume no TF32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import resnet_fused  # noqa: E402  (after TRITON_INTERPRET: it fixes the triton backend's devices)
from resnet_fused.validate.common import OpCounter  # noqa: E402,F401  (the tests' op counter)

HAS_CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
NO_CUDA_REASON = "needs a CUDA GPU: none is visible to torch"

# Every (device, backend) pair the suite knows, in the order tests run them:
# a backend on the tensors of one device type. `cpu` serves CPU tensors only
# and `cuda` CUDA tensors only; `eager` serves both; `triton` serves CUDA
# tensors, and CPU tensors under the interpreter only.
PAIRS = (
    ("cpu", "eager"), ("cpu", "cpu"), ("cpu", "triton"),
    ("cuda", "eager"), ("cuda", "cuda"), ("cuda", "triton"),
)


def pair_skip_reason(device: str, backend: str) -> Optional[str]:
    """None when this machine should run `backend` on `device` tensors, else
    why not. Only the machine decides (a GPU, the interpreter): a pair this
    machine should run is never skipped, so a backend that is missing where
    it should work fails its tests instead of vanishing from them."""
    if device == "cuda" and not HAS_CUDA:
        return NO_CUDA_REASON
    if (device, backend) == ("cpu", "triton") and not INTERPRETER:
        return "triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1), which is off where a GPU is"
    return None


def runnable_pairs(backends=None, devices=("cpu", "cuda")) -> list[tuple[str, str]]:
    """The (device, backend) pairs of PAIRS this machine runs."""
    return [p for p in _select(backends, devices) if pair_skip_reason(*p) is None]


def _select(backends, devices) -> list[tuple[str, str]]:
    return [(d, b) for d, b in PAIRS if d in devices and (backends is None or b in backends)]


def pair_marks(device: str, backend: str) -> list:
    """Marks for a test param on the pair: skipped with the reason where this
    machine cannot run it; `gpu` on CUDA (the loan script runs `pytest -m gpu`)."""
    reason = pair_skip_reason(device, backend)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    return marks


def device_backend_params(backends=None, devices=("cpu", "cuda")) -> list:
    """pytest params "device, backend" for `@pytest.mark.parametrize`: every
    pair of PAIRS among `backends` and `devices`, with `pair_marks`."""
    return [pytest.param(d, b, marks=pair_marks(d, b), id=f"{d}-{b}") for d, b in _select(backends, devices)]


def device_params(devices=("cpu", "cuda")) -> list:
    """pytest params "device": CUDA skipped without a GPU, and marked `gpu`."""
    return [pytest.param(d, marks=pair_marks(d, "eager"), id=d) for d in devices]


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
requires_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (set without a GPU)"
)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on CUDA tensors (benchmarks/gpu_loan.sh runs `pytest -m gpu`)")


# Tolerances on ||out - ref|| / ||ref|| (docs/design.md §5).
OP_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NET_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    num = (out - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def assert_equivalent(
    out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output", elementwise_tol: float = None
) -> None:
    """Relative-norm check (‖out − ref‖/‖ref‖ ≤ tol) plus an elementwise check
    that catches localised errors a norm over a large tensor could hide:
    |out − ref| ≤ e·max|ref| + e·|ref| with e = elementwise_tol (default tol).
    NaN/inf never pass."""
    elementwise_tol = tol if elementwise_tol is None else elementwise_tol
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert torch.isfinite(ref).all(), f"{what}: non-finite values in the reference"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    scale = ref.detach().abs().max().double().item()
    torch.testing.assert_close(
        out.detach().double().cpu(),
        ref.detach().double().cpu(),
        rtol=elementwise_tol,
        atol=max(elementwise_tol * scale, 1e-30),
        msg=lambda m: f"{what}: {m}",
    )


def assert_scripts_and_traces(model: torch.nn.Module, x: torch.Tensor, want: dict) -> None:
    """torch.jit.script and torch.fx.symbolic_trace of `model` run on `x` and
    give `want` (a dict of outputs) within the fp32 network bound."""
    with torch.no_grad():
        scripted = torch.jit.script(model)(x)
        traced = torch.fx.symbolic_trace(model)(x)
    for k in want:
        assert_equivalent(scripted[k], want[k], NET_TOL[torch.float32], f"scripted {k}")
        assert_equivalent(traced[k], want[k], NET_TOL[torch.float32], f"traced {k}")


def randomize_norms(model: torch.nn.Module, seed: int = 1, last_norms=()) -> torch.nn.Module:
    """Non-trivial BN state: random γ, β, running mean and variance.

    The last BN of each residual block gets γ in [0.1, 0.4], as in trained
    ResNets: with γ ≥ 0.5 there too, every block amplifies the residual stream
    and three SGD steps on a 100-layer net reach losses of 1e33, a chaotic
    problem on which no two implementations (not even two fp64 ones) agree.
    `last_norms`: those BNs of models not built from torchvision blocks."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    last_norms = {id(m) for m in last_norms}
    for m in model.modules():
        if isinstance(m, Bottleneck):
            last_norms.add(id(m.bn3))
        elif isinstance(m, BasicBlock):
            last_norms.add(id(m.bn2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.num_features if isinstance(m, torch.nn.BatchNorm2d) else m.running_mean.numel()
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    low, span = (0.1, 0.3) if id(m) in last_norms else (0.5, 1.0)
                    m.weight.copy_(torch.rand(c, generator=g) * span + low)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


@pytest.fixture(autouse=True)
def _default_backend():
    """Each test starts from the default selection."""
    import resnet_fused

    resnet_fused.set_backend("auto")
    yield
    resnet_fused.set_backend("auto")


@pytest.fixture(autouse=True)
def _one_triton_tile(request):
    """On CUDA, the triton backend times every tiling of a new shape and
    compiles each (seconds apiece): for the `gpu` tests the first tiling of
    each variant stands for the rest, so the suite's GPU part fits a loan.
    `resnet-fused-validate` runs every tiling; RESNET_FUSED_TEST_TUNING=1
    restores the tuner here."""
    if request.node.get_closest_marker("gpu") is None or os.environ.get("RESNET_FUSED_TEST_TUNING") == "1":
        yield
        return
    from resnet_fused.validate.common import one_tile

    with one_tile():
        yield


def time_fastest_when_called(monkeypatch, calls: list) -> None:
    """The triton tuner measures (CPU tensors are never timed otherwise), and
    a candidate that appends to `calls` while it runs times fastest (1.0
    against 5.0): which candidate the choice keeps, made deterministic."""
    from resnet_fused.ops.triton import tuning

    def measure(fn):
        before = len(calls)
        fn()
        return 1.0 if len(calls) > before else 5.0

    monkeypatch.setattr(tuning, "can_measure", lambda x: True)
    monkeypatch.setattr(tuning, "cuda_time", measure)


def gemm_unpack(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The (rows x cols) matrix B that the CPU GEMM's packed panels hold
    (csrc/cpu/gemm.h: panels of 64 columns, the last one narrower, each
    row-major), written here from the layout's description."""
    flat = packed.reshape(-1)
    assert flat.numel() == rows * cols
    parts = []
    for n0 in range(0, cols, 64):
        width = min(64, cols - n0)
        parts.append(flat[n0 * rows:(n0 + width) * rows].reshape(rows, width))
    return torch.cat(parts, dim=1)


def fits_in_a_new_process(variable: str, value: str, conv: str, fits: str, tmp_path) -> bool:
    """`onednn.<fits>(<conv>, torch.float32)` in a fresh process whose
    environment sets `variable` to `value` (the cpu backend's switches are
    read at import); asserts the extension loaded there. Run outside the
    repository: from its root, `import resnet_fused` finds the uncompiled
    sources."""
    import subprocess
    import sys

    code = (
        "import torch, resnet_fused\n"
        "from resnet_fused.ops import extension\n"
        "from resnet_fused.ops.cpu import onednn\n"
        f"conv = {conv}\n"
        f"print(extension.is_loaded(), onednn.{fits}(conv, torch.float32))\n"
    )
    env = dict(os.environ, **{variable: value})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    loaded, fitted = out.stdout.strip().splitlines()[-1].split()
    assert loaded == "True", out.stdout
    return fitted == "True"


def on_every_cpu_kernel(run, isas, threads=(None,)) -> dict:
    """{(isa, t): run()} with the CPU GEMM's kernel (`extension.cpu_gemm_isa`,
    which the grouped kernel follows too) set to each of `isas` and torch's
    thread count to each of `threads` (None: as it is); both restored after."""
    from resnet_fused.ops import extension

    current, before = extension.cpu_gemm_isa(), torch.get_num_threads()
    outs = {}
    try:
        for isa in isas:
            extension.cpu_gemm_isa(isa)
            for t in threads:
                torch.set_num_threads(before if t is None else t)
                outs[isa, t] = run()
    finally:
        extension.cpu_gemm_isa(current)
        torch.set_num_threads(before)
    return outs


def assert_nonfinite_like(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """NaN, +inf and -inf exactly where `ref` has them, and the finite rest
    within `tol` of it."""
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN"
    assert torch.equal(out == float("inf"), ref == float("inf")), f"{what}: +inf"
    assert torch.equal(out == float("-inf"), ref == float("-inf")), f"{what}: -inf"
    finite = ref.isfinite()
    assert_equivalent(out[finite], ref[finite], tol, what)
