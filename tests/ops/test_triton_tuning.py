"""The Triton conv_bn_act op around its kernel: tracing with symbolic shapes,
the tuner's correctness check of every candidate, which errors it skips,
no timing under CUDA-graph capture, one output layout whatever wins, and
the device guard around every launch.

Tensors live where Triton runs (CUDA with a GPU, else CPU under
TRITON_INTERPRET=1); the CUDA-only logic (capture, the guard's device) is
checked with mocks."""
import contextlib
import functools
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from conftest import OP_TOL, assert_equivalent

triton_conv = pytest.importorskip("resnet_fused.ops.triton.conv")
from resnet_fused.ops.triton import device, library, tuning  # noqa: E402

pytestmark = pytest.mark.skipif(
    resnet_fused.backends.reason_unavailable("triton") is not None,
    reason=f"triton backend unavailable: {resnet_fused.backends.reason_unavailable('triton')}",
)

DEVICE = device()
OP = torch.ops.resnet_fused.triton_conv_bn_act
CONV = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)


def inputs(n, c=8, hw=5, k=16, seed=0, weight_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g)
    w = (torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5).contiguous(memory_format=weight_format)
    scale, shift = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g) * 0.3
    return [t.to(DEVICE) for t in (x, w, scale, shift)]


def reference(x, w, scale, shift):
    y = F.conv2d(x.double(), w.double(), None, CONV["stride"], CONV["padding"], CONV["dilation"], CONV["groups"])
    return torch.relu(y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))


def conv_op(x, w, scale, shift):
    return OP(x, w, scale, shift, None, True, CONV["stride"], CONV["padding"], CONV["dilation"], CONV["groups"])


@pytest.fixture
def fresh_choices(monkeypatch):
    """An empty tuning cache, so an earlier test's choice is not reused, and
    no disk cache (tests/ops/test_triton_tuning_cache.py tests that)."""
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_persisted", {})
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", "0")


# ---- symbolic shapes --------------------------------------------------------


def test_key_never_holds_symints(fresh_choices, monkeypatch):
    """Under symbolic shapes there is no key (a SymInt is unhashable, and one
    graph serves every size): the heuristic decides, from size hints."""
    from torch.fx.experimental.proxy_tensor import make_fx

    keys, heuristics = [], []
    real_key, real_default = tuning.key, tuning.default_config
    monkeypatch.setattr(tuning, "key", lambda *a, **k: keys.append(real_key(*a, **k)) or keys[-1])
    monkeypatch.setattr(tuning, "default_config", lambda *a: heuristics.append(real_default(*a)) or heuristics[-1])
    graph = make_fx(conv_op, tracing_mode="symbolic")(*inputs(2))
    assert keys == [None]
    assert len(heuristics) == 1 and isinstance(heuristics[0], triton_conv.ConvConfig)
    assert any(n.target is OP.default for n in graph.graph.nodes)
    for n in (2, 3):  # the traced graph serves both sizes
        args = inputs(n, seed=n)
        assert_equivalent(graph(*args), reference(*args), OP_TOL[torch.float32])
    static = real_key(*inputs(2)[:2], None, True, (1, 1), (1, 1), (1, 1), 1)
    assert static is not None and hash(static) is not None


def test_torch_compile_dynamic_two_batch_sizes(fresh_choices):
    """dynamic=True: one compiled graph (no recompile) for both batch sizes,
    each result right."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(conv_op, dynamic=True, backend=counter, fullgraph=True)
    for n in (2, 3):
        args = inputs(n, seed=n)
        assert_equivalent(compiled(*args), reference(*args), OP_TOL[torch.float32])
    assert counter.frame_count == 1


def test_symbolic_trace_of_the_triton_op_registration():
    """The real registration (triton_op, what a GPU machine runs) traces
    with symbolic shapes, here without a GPU: it used to raise
    `TypeError: unhashable type: non-nested SymInt` from the tuning key."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = (
        "import torch, resnet_fused\n"
        "from torch.fx.experimental.proxy_tensor import make_fx\n"
        "op = torch.ops.resnet_fused.triton_conv_bn_act\n"
        "f = lambda x, w, s, b: op(x, w, s, b, None, True, [1, 1], [1, 1], [1, 1], 1)\n"
        "g = make_fx(f, tracing_mode='symbolic')(torch.randn(2, 8, 5, 5), torch.randn(16, 8, 3, 3),\n"
        "                                        torch.rand(16), torch.rand(16))\n"
        "print([str(n.target) for n in g.graph.nodes if n.op == 'call_function'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['resnet_fused.triton_conv_bn_act.default']"


# ---- the tuner checks every candidate ----------------------------------------


def test_wrong_candidate_is_never_chosen():
    """The fastest candidate gives a wrong result: it is rejected (with a
    warning) before it is timed, and the correct one wins."""
    ref = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    timed = []
    times = {"fast_wrong": 1.0, "slow_right": 2.0}
    outputs = {"fast_wrong": ref * 1.5, "slow_right": ref.to(torch.bfloat16)}
    candidates = {name: (lambda name=name: (name, outputs[name])) for name in times}

    def measure(fn):
        name, _ = fn()
        timed.append(name)
        return times[name]

    def check(result):
        return tuning.mismatch(result[1], ref, tuning.tolerance(torch.bfloat16))

    key = ("test_wrong_candidate", os.getpid())
    with pytest.warns(UserWarning, match="fast_wrong rejected.*relative error"):
        assert tuning.choose(key, candidates, measure, check) == "slow_right"
    assert timed == ["slow_right"]
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="fast_wrong: wrong result"):
        tuning.choose(key + ("alone",), {"fast_wrong": candidates["fast_wrong"]}, measure, check)


def test_mismatch_tolerance_per_dtype():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(4, 16, 8, 8, generator=g).double()
    bf16 = ref.to(torch.bfloat16)
    assert tuning.mismatch(bf16, ref, tuning.tolerance(torch.bfloat16)) is None
    # bf16 rounding is far outside what an fp32 (ieee) result may differ by
    assert tuning.mismatch(bf16, ref, tuning.tolerance(torch.float32)) is not None
    big = torch.randn(8, 64, 16, 16, generator=g).double()
    lost = big.clone()
    lost[0, 0, 0, :2] = big[0, 0, 0, :2] + 1  # wrong elements: small in norm, caught elementwise
    assert "element" in tuning.mismatch(lost, big, 1e-2)
    assert "shape" in tuning.mismatch(ref[:2], ref, 1e-2)
    with_nan = ref.clone()
    with_nan[0, 0, 0, 0] = float("nan")  # NaN in the data: the candidate must agree
    assert tuning.mismatch(with_nan.clone(), with_nan, 1e-5) is None
    assert "non-finite" in tuning.mismatch(ref, with_nan, 1e-5)


def test_tolerance_follows_tf32_switch():
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        ieee = tuning.tolerance(torch.float32)
        torch.backends.cudnn.allow_tf32 = True
        assert tuning.tolerance(torch.float32) > ieee
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("corrupt", [False, True], ids=["control", "wrong_gemm"])
def test_op_rejects_a_wrong_tiling(fresh_choices, monkeypatch, corrupt):
    """Through the op: every implicit-GEMM candidate is made the fastest, and
    (in the wrong_gemm case) deliberately wrong by 1%. A wrong one is never
    chosen — cuDNN + epilogue serves, and the output is right; the control
    shows the same timer would otherwise have picked the GEMM."""
    launched = []
    real_launch = triton_conv.launch

    def launch(*args, **kwargs):
        out = real_launch(*args, **kwargs)
        launched.append(args[11])  # the config
        if corrupt:
            out.mul_(1.01)
        return out

    def timer(fn):
        launched.clear()
        fn()
        return 0.0 if launched else 1.0

    monkeypatch.setattr(triton_conv, "launch", launch)
    monkeypatch.setattr(tuning, "can_measure", lambda x: True)  # as on a GPU
    monkeypatch.setattr(tuning, "cuda_time", timer)
    args = inputs(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with resnet_fused.backend("triton"):
            out = ops.conv_bn_act(*args, None, True, **CONV)
    (choice,) = tuning.choices().values()
    if corrupt:
        assert choice == tuning.CUDNN
        assert any("rejected" in str(w.message) for w in caught)
        assert_equivalent(out, reference(*args), OP_TOL[torch.float32])
    else:
        assert isinstance(choice, triton_conv.ConvConfig)
        assert not any("rejected" in str(w.message) for w in caught)


# ---- errors, capture, layout ---------------------------------------------------


def _cuda_like():
    return types.SimpleNamespace(device=torch.device("cuda", 0))


def test_no_timing_during_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tuning.can_measure(_cuda_like())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not tuning.can_measure(_cuda_like())


def test_pick_without_measuring_uses_cache_then_heuristic(fresh_choices):
    def never():
        raise AssertionError("a candidate ran while nothing may be timed")

    key = ("test_pick", os.getpid())
    assert tuning.pick(key, {"a": never}, lambda: "heuristic", measurable=False) == "heuristic"
    tuning.set_choice(key, "a")
    assert tuning.pick(key, {"a": never}, lambda: "heuristic", measurable=False) == "a"
    assert tuning.pick(None, {"a": never}, lambda: "heuristic", measurable=True) == "heuristic"


@pytest.mark.parametrize(
    "x_format, w_format",
    [(torch.contiguous_format, torch.channels_last), (torch.channels_last, torch.contiguous_format)],
    ids=["nchw_x_nhwc_w", "nhwc_x_nchw_w"],
)
def test_output_layout_independent_of_the_winner(monkeypatch, x_format, w_format):
    """cuDNN picks its output layout from x's and the weight's; the op's
    output has x's layout whichever candidate serves."""
    x, w, scale, shift = inputs(2, weight_format=w_format)
    x = x.contiguous(memory_format=x_format)
    strides = {}
    for mode in ("triton", "cudnn"):
        monkeypatch.setenv("RESNET_FUSED_TRITON_CONV", mode)
        out = conv_op(x, w, scale, shift)
        assert_equivalent(out, reference(x, w, scale, shift), OP_TOL[torch.float32], mode)
        strides[mode] = out.stride()
    assert strides["triton"] == strides["cudnn"] == triton_conv.output_strides(tuple(out.shape), x_format)


# ---- device guard ---------------------------------------------------------------


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def cuda_device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    with library._device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with library._device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]  # none for CPU tensors


@pytest.mark.parametrize("mode", ["triton", "cudnn"])
def test_every_launch_runs_inside_the_device_guard(monkeypatch, mode):
    """conv_bn_act (either path) and batch_norm_act forward and backward:
    each kernel launch happens with the guard entered on the tensors' device."""
    active, seen = [], []

    @contextlib.contextmanager
    def guard(d):
        active.append(d)
        try:
            yield
        finally:
            active.pop()

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(list(active))
                return self.kernel[grid](*args, **kwargs)

            return launch

    real_wrap = library.wrap_triton
    monkeypatch.setattr(library, "_device_guard", guard)
    monkeypatch.setattr(library, "wrap_triton", lambda k: Spy(real_wrap(k)))
    # the kernels are wrapped once per process: wrap them again, spied, for this test only
    monkeypatch.setattr(library, "_kernels", functools.cache(library._kernels.__wrapped__))
    monkeypatch.setenv("RESNET_FUSED_TRITON_CONV", mode)
    x, w, scale, shift = inputs(2)
    conv_op(x, w, scale, shift)
    xb = x.clone().requires_grad_()
    with resnet_fused.backend("triton"):
        ops.batch_norm_act(xb, None, None, None, None, True).sum().backward()
    assert len(seen) >= 1 + 3 + 3  # the conv (or its epilogue), BN forward and backward
    assert all(s == [x.device] for s in seen), seen
