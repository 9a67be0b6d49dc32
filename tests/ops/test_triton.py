"""The Triton kernels beyond the op contract: every tiling, int64 offsets,
the stem's flattened reduction, the cuDNN+epilogue path, tuning, BN
reductions (stability, determinism, empty batches), torch.library
registration and tracing. (Ahead-of-time compilation: test_triton_aot.py;
tuning, dynamic shapes, device guards: test_triton_tuning.py.)

Tensors live where Triton runs: on CUDA with a GPU (interpreter off), else
on CPU under TRITON_INTERPRET=1 (set by conftest)."""
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
import triton

import resnet_fused
from resnet_fused import ops
from conftest import OP_TOL, assert_equivalent

triton_conv = pytest.importorskip("resnet_fused.ops.triton.conv")
from resnet_fused.ops.triton import batch_norm, device, library, tuning  # noqa: E402
from resnet_fused.ops.triton.fold import Affine  # noqa: E402

DEVICE = device()

pytestmark = pytest.mark.skipif(
    resnet_fused.backends.reason_unavailable("triton") is not None,
    reason=f"triton backend unavailable: {resnet_fused.backends.reason_unavailable('triton')}",
)


def conv_ref64(x, w, scale, shift, residual, relu, stride, padding, dilation, groups):
    y = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def conv_inputs(n, c, h, w, k, r, stride, padding, dilation, groups, dtype, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = (torch.randn(k, c // groups, r, r, generator=g) / (c // groups * r * r) ** 0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    scale = torch.rand(k, generator=g) + 0.5
    shift = torch.randn(k, generator=g) * 0.3
    conv = dict(stride=(stride,) * 2, padding=(padding,) * 2, dilation=(dilation,) * 2, groups=groups)
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    residual = torch.randn(n, k, p, q, generator=g).to(dtype)
    return (*(t.to(DEVICE) for t in (x, weight, scale, shift, residual)), conv)


def run_launch(x, weight, scale, shift, residual, relu, conv, config, index_64=None):
    shape = ops.conv_out_shape(x, weight, conv["stride"], conv["padding"], conv["dilation"])
    out = triton_conv.output_like(x, shape)
    triton_conv.launch(x, weight, Affine.given(scale, shift), residual, relu, conv["stride"], conv["padding"], conv["dilation"],
                       conv["groups"], out, config, index_64=index_64)
    return out


ALL_CONFIGS = (triton_conv.CONFIGS + triton_conv.CHANNELS_LAST_CONFIGS + triton_conv.WIDE_CONFIGS
               + (triton_conv.INTERPRETER_CONFIG,))
# M = 1·7·9 = 63, K = 70, reduction 40·9 = 360: no multiple of any tile
CHANNEL_BLOCKED = (1, 40, 7, 9, 70, 3, 1, 1, 1, 1)
STEM = (1, 3, 13, 11, 20, 7, 2, 3, 1, 1)  # C = 3: flattened (r, s, c) reduction


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("shape", [CHANNEL_BLOCKED, STEM], ids=["channel_blocked", "stem_flat"])
def test_every_tiling(shape, config):
    x, w, scale, shift, res, conv = conv_inputs(*shape, torch.float16)
    out = run_launch(x, w, scale, shift, res, True, conv, config)
    assert_equivalent(out, conv_ref64(x, w, scale, shift, res, True, **conv), OP_TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [CHANNEL_BLOCKED, STEM], ids=["channel_blocked", "stem_flat"])
def test_int64_offsets(shape, dtype):
    """The int64 addressing variant (taken where a tensor passes 2^30
    elements) computes the same result; forced here on a small shape."""
    x, w, scale, shift, res, conv = conv_inputs(*shape, dtype, channels_last=False)
    out = run_launch(x, w, scale, shift, res, True, conv, triton_conv.WIDE_CONFIGS[0], index_64=True)
    assert_equivalent(out, conv_ref64(x, w, scale, shift, res, True, **conv), OP_TOL[dtype])


def test_int64_chosen_only_for_large_tensors():
    small = torch.empty(8, 256, 56, 56, device="meta")
    large = torch.empty(2612, 256, 56, 56, device="meta")  # > 2^31 elements
    assert not triton_conv.needs_int64(small, None)
    assert triton_conv.needs_int64(small, large)
    assert triton_conv.needs_int64(large.to(memory_format=torch.channels_last))


def test_configs_for_variants():
    assert triton_conv.configs_for(torch.float16, 64, False) == triton_conv.CONFIGS
    assert triton_conv.configs_for(torch.float16, 64, False, True) == (
        triton_conv.CONFIGS + triton_conv.CHANNELS_LAST_CONFIGS)
    for args in ((torch.float32, 64, False), (torch.bfloat16, 3, False), (torch.float16, 64, True)):
        assert triton_conv.configs_for(*args) == triton_conv.WIDE_CONFIGS
        assert triton_conv.configs_for(*args, True) == triton_conv.WIDE_CONFIGS
    names = [c.name for c in ALL_CONFIGS]
    assert len(set(names)) == len(names)
    assert {c.block_k for c in triton_conv.CONFIGS} >= {64} and {c.num_stages for c in triton_conv.CONFIGS} >= {4}


def test_channels_contiguous():
    """What admits CHANNELS_LAST_CONFIGS: unit channel stride in x, the
    weight and the residual (a 1×1 weight has it in either layout)."""
    cl = torch.channels_last
    x = torch.empty(2, 64, 8, 8)
    w3, w1 = torch.empty(32, 64, 3, 3), torch.empty(32, 64, 1, 1)
    res = torch.empty(2, 32, 8, 8)
    assert triton_conv.channels_contiguous(x.to(memory_format=cl), w3.to(memory_format=cl), None)
    assert triton_conv.channels_contiguous(x.to(memory_format=cl), w1, res.to(memory_format=cl))
    assert not triton_conv.channels_contiguous(x, w3.to(memory_format=cl))
    assert not triton_conv.channels_contiguous(x.to(memory_format=cl), w3)
    assert not triton_conv.channels_contiguous(x.to(memory_format=cl), w1, res)


def test_tf32_follows_cudnn_switch():
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert triton_conv.input_precision(torch.float32) == "tf32"
        assert triton_conv.input_precision(torch.bfloat16) == "ieee"
        torch.backends.cudnn.allow_tf32 = False
        assert triton_conv.input_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cudnn_then_triton_epilogue_path(monkeypatch, channels_last):
    monkeypatch.setenv("RESNET_FUSED_TRITON_CONV", "cudnn")
    x, w, scale, shift, res, conv = conv_inputs(2, 16, 6, 5, 24, 3, 2, 1, 1, 1, torch.float32, channels_last)
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act(x, w, scale, shift, res, True, **conv)
    assert_equivalent(out, conv_ref64(x, w, scale, shift, res, True, **conv), OP_TOL[torch.float32])


def test_bad_conv_mode_is_named(monkeypatch):
    monkeypatch.setenv("RESNET_FUSED_TRITON_CONV", "fastest")
    x, w, scale, shift, res, conv = conv_inputs(1, 8, 4, 4, 8, 1, 1, 0, 1, 1, torch.float32)
    with resnet_fused.backend("triton"), pytest.raises(ValueError, match="RESNET_FUSED_TRITON_CONV"):
        ops.conv_bn_act(x, w, scale, shift, res, True, **conv)


# ---- tuning -----------------------------------------------------------------


def test_tuning_measures_once_and_picks_fastest():
    calls = []
    barrier = threading.Barrier(4)
    times = {"a": 3.0, "b": 1.0, "c": 2.0}

    def measure(fn):
        calls.append(fn())
        return times[calls[-1]]

    candidates = {name: (lambda name=name: name) for name in times}
    key = ("test_tuning_measures_once", os.getpid())
    results = []

    def worker():
        barrier.wait()
        results.append(tuning.choose(key, candidates, measure))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["b"] * 4
    assert sorted(calls) == ["a", "b", "c"]  # each candidate timed exactly once


def test_tuning_skips_candidates_that_fail():
    """A tiling that does not fit (Triton's OutOfResources) or does not
    compile is skipped, and the error that ruled out each one is named when
    none is left."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    def measure(fn):
        return fn()

    def too_big():
        raise OutOfResources(300_000, 232_448, "shared memory")

    def miscompiles():
        raise CompilationError("src", None, "unsupported layout")

    key = ("test_tuning_skips", os.getpid())
    assert tuning.choose(key, {"big": too_big, "bad": miscompiles, "ok": lambda: 1.0}, measure) == "ok"
    with pytest.raises(RuntimeError, match="no conv_bn_act candidate.*big: OutOfResources.*shared memory"):
        tuning.choose(key + ("none",), {"big": too_big}, measure)


def test_tuning_lets_cuda_errors_propagate():
    """A CUDA error (sticky: every later launch fails too) is not a failing
    candidate; it reaches the caller, and nothing is cached."""

    def faulty():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    key = ("test_tuning_cuda_error", os.getpid())
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuning.choose(key, {"faulty": faulty, "ok": lambda: 1.0}, lambda fn: fn())
    assert tuning.cached(key) is None


def test_default_config_fits_output_channels():
    narrow = tuning.default_config(triton_conv.CONFIGS, 4, 10_000)  # ResNeXt group: 4 channels
    assert narrow.block_n == 16
    wide = tuning.default_config(triton_conv.CONFIGS, 512, 100_000)
    assert wide.block_n >= 64


# ---- batch_norm_act kernels ------------------------------------------------------


def test_statistics_stable_for_large_mean():
    """x = 1e4 + N(0, 1) in fp32: E[x²] − E[x]² would lose every digit of the
    variance; the chunked Chan merge of pivot-shifted data keeps it to fp32
    rounding (without the shift, chunk means rounded at 1e4 gave 1.2e-4)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 5, 17, 19, generator=g) + 1e4).to(DEVICE)
    assert batch_norm._chunking(batch_norm._tiling(x).tiles, 5)[0] > 1  # several partial summaries merged
    out, mean, invstd, var = batch_norm.forward(x, None, None, 1e-5, None, False, batch_norm.KERNELS)
    exact = x.double()  # the fp32 input's values, exactly
    assert_equivalent(var, exact.var((0, 2, 3), unbiased=False), 1e-5)
    assert_equivalent(mean, exact.mean((0, 2, 3)), 2.4e-7)  # two fp32 ulps
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # what this avoids
    assert (naive.double() - exact.var((0, 2, 3), unbiased=False)).abs().max() > 0.1


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_64_bit_rows_same_result(monkeypatch, channels_last):
    """The 64-bit row-index variant (taken where a row index can pass int32)
    computes bitwise the same as the 32-bit one; forced here on a small shape,
    in both tilings (NCHW's planes, channels_last's rows)."""
    g = torch.Generator().manual_seed(6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 10, 9, 11, generator=g).to(DEVICE, memory_format=fmt)
    res = torch.randn(3, 10, 9, 11, generator=g).to(DEVICE)
    grad = torch.randn(3, 10, 9, 11, generator=g).to(DEVICE)
    w, b = torch.rand(10, generator=g).to(DEVICE), torch.randn(10, generator=g).to(DEVICE)
    runs, rows_64 = [], batch_norm._rows_64
    for wide in (False, True):
        monkeypatch.setattr(batch_norm, "_rows_64", lambda rows, wide=wide: wide)
        out, mean, invstd, var = batch_norm.forward(x, w, b, 1e-5, res, True, batch_norm.KERNELS)
        grads = batch_norm.backward(grad, x, out, w, mean, invstd, True, True, batch_norm.KERNELS)
        y = batch_norm.affine_act_(out.clone(), Affine.given(w, b), res, True, batch_norm.KERNELS)
        runs.append((out, mean, invstd, var, y, *grads))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)
    assert not rows_64(256 * 112 * 112) and rows_64(2**30)


@pytest.mark.parametrize("shape", [(6, 24, 15, 13), (4, 20, 14, 14)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_kernels_bitwise_deterministic(channels_last, shape):
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape, generator=g).to(DEVICE, memory_format=fmt)
    res = torch.randn(*shape, generator=g).to(DEVICE, memory_format=fmt)
    grad = torch.randn(*shape, generator=g).to(DEVICE)
    c = shape[1]
    w, b = torch.rand(c, generator=g).to(DEVICE), torch.randn(c, generator=g).to(DEVICE)
    runs = []
    for _ in range(2):
        out, mean, invstd, var = batch_norm.forward(x, w, b, 1e-5, res, True, batch_norm.KERNELS)
        grads = batch_norm.backward(grad, x, out, w, mean, invstd, True, True, batch_norm.KERNELS)
        y = batch_norm.affine_act_(out.clone(), Affine.given(w, b), res, True, batch_norm.KERNELS)
        runs.append((out, mean, var, y) + grads)
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_deterministic_mode_is_honoured():
    """The reductions have no atomics, so torch's deterministic mode needs no
    other path: results under it equal the default ones bitwise."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, 9, 9, generator=g).to(DEVICE).requires_grad_()
    w = torch.rand(16, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(16, generator=g).to(DEVICE).requires_grad_()
    outs = []
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            with resnet_fused.backend("triton"):
                y = ops.batch_norm_act(x, w, b, None, None, True)
            outs.append((y,) + torch.autograd.grad(y.square().sum(), (x, w, b)))
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_batch_norm_act_low_precision_against_float64(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 20, 6, 7, generator=g) * 2 + 1).to(DEVICE, dtype).requires_grad_()
    res = torch.randn(3, 20, 6, 7, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.rand(20, generator=g) + 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(20, generator=g).to(DEVICE).requires_grad_()
    grad = torch.randn(3, 20, 6, 7, generator=g).to(DEVICE, dtype)
    with resnet_fused.backend("triton"):
        y = ops.batch_norm_act(x, w, b, None, None, True, residual=res, relu=True)
    got = torch.autograd.grad(y, (x, w, b, res), grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, res)]
    pre = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True) + leaves[3]
    # the tested forward's own ReLU decisions (a value within an ulp of zero
    # may round either way in low precision)
    ref = pre * (y.detach() > 0)
    want = torch.autograd.grad(ref, leaves, grad.double())
    assert y.dtype == dtype
    assert_equivalent(y, torch.relu(pre), OP_TOL[dtype])
    for name, a, b_ in zip(("x", "weight", "bias", "residual"), got, want):
        assert_equivalent(a, b_, OP_TOL[dtype] if dtype != torch.float32 else 1e-5, f"grad {name}")


def test_nchw_tiles_along_planes():
    """NCHW walks positions inside one image's planes, with the power of two
    that divides L and every n, c stride claimed to the compiler (VEC, up to
    16 elements); channels_last and NCHW with L = 1 (the same memory) walk
    rows. What the claim buys in the compiled code: test_triton_aot.py."""
    def tiling(shape, fmt=torch.contiguous_format, *others):
        return batch_norm._tiling(torch.empty(shape, device="meta").contiguous(memory_format=fmt), *others)

    for hw, vec in ((56, 16), (28, 16), (112, 16), (14, 4), (7, 1), (3, 1)):
        t = tiling((2, 64, hw, hw))
        block = batch_norm.BLOCK_R if vec > 1 else batch_norm.BLOCK_R // 2  # scalar: half the tile
        assert t.planes and t.vec == vec and t.block_r == min(block, triton.next_power_of_2(hw * hw))
        assert t.tiles == 2 * triton.cdiv(hw * hw, t.block_r)
    assert tiling((2, 64, 6, 7)).vec == 2 and tiling((2, 64, 3, 5)).vec == 1
    assert not tiling((2, 64, 1, 1)).planes
    assert not tiling((2, 64, 14, 14), torch.channels_last).planes
    # a tensor addressed beside x whose strides are not multiples of 4 drops the claim
    odd = torch.empty(2, 64, 14, 15, device="meta")[..., :14]
    assert tiling((2, 64, 14, 14), torch.contiguous_format, odd).vec == 2
    # 2^29 rows fit int32 indices, but c·s_c of NCHW's last channel (4·2^29) does not
    assert tiling((1, 4, 2**15, 2**14)).rows_64 and not tiling((1, 4, 2**15, 2**14), torch.channels_last).rows_64


def _small_tiles(monkeypatch):
    """Tiles of 16 positions × 8 channels and few reduction programs: a plane
    spans several tiles and a chunk several tiles and images."""
    monkeypatch.setattr(batch_norm, "BLOCK_R", 16)
    monkeypatch.setattr(batch_norm, "BLOCK_C", 8)
    monkeypatch.setattr(batch_norm, "TARGET_PROGRAMS", 5)


def _residual(kind: str, shape, g):
    """(residual, channel offset) of each kind the kernels read."""
    n, c, h, w = shape
    if kind == "full":
        return torch.randn(shape, generator=g), 0
    if kind == "narrow_view":  # fewer channels (option A), a view at an unaligned offset
        return torch.randn(n, c, h, w, generator=g)[:, 1:c - 2], 2
    if kind == "strided":  # x[:, :, ::2, ::2] of a larger map, read in place
        return torch.randn(n, c, 2 * h, 2 * w, generator=g)[:, :, ::2, ::2], 0
    if kind == "channels_last":  # another layout than x
        return torch.randn(shape, generator=g).to(memory_format=torch.channels_last), 0
    return None, 0


NCHW_SHAPES = [(2, 70, 7, 7), (1, 13, 3, 5), (3, 5, 14, 14), (4, 6, 1, 1), (1, 6, 20, 23), (5, 9, 6, 7)]


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("kind, relu", [("none", False), ("none", True), ("full", True), ("narrow_view", True),
                                        ("strided", False), ("channels_last", True)],
                         ids=["plain", "relu", "residual_relu", "narrow_view_relu", "strided", "channels_last_res"])
@pytest.mark.parametrize("shape", NCHW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_nchw_against_float64(monkeypatch, shape, kind, relu, tiles):
    """The NCHW kernels (plane tiles: odd L, L = 15, 42, 49, 196, 460 over
    several tiles, N = 1, C not a multiple of BLOCK_C; L = 1 takes the rows)
    forward, backward and the epilogue against float64 F.batch_norm, with
    each residual kind the kernels read."""
    if tiles == "small":
        _small_tiles(monkeypatch)
    g = torch.Generator().manual_seed(11)
    c = shape[1]
    x = torch.randn(shape, generator=g) * 2 + 0.7
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    res, offset = _residual(kind, shape, g)
    grad = torch.randn(shape, generator=g)
    x, w, b, grad = (t.to(DEVICE) for t in (x, w, b, grad))
    res = res.to(DEVICE) if res is not None else None
    out, mean, invstd, var = batch_norm.forward(x, w, b, 1e-5, res, relu, batch_norm.KERNELS, offset)
    gx, gw, gb, gr = batch_norm.backward(
        grad, x, out, w, mean, invstd, relu, res is not None, batch_norm.KERNELS,
        res.shape[1] if res is not None else -1, offset,
    )
    assert out.is_contiguous() and gx.is_contiguous()

    leaves = [t.detach().double().requires_grad_() for t in (x, w, b) + ((res,) if res is not None else ())]
    pre = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.1, 1e-5)
    if res is not None:
        pre = pre + F.pad(leaves[3], (0, 0, 0, 0, offset, c - res.shape[1] - offset))
    assert_equivalent(out, torch.relu(pre) if relu else pre, OP_TOL[torch.float32])
    assert_equivalent(mean, x.double().mean((0, 2, 3)), OP_TOL[torch.float32], "mean")
    assert_equivalent(var, x.double().var((0, 2, 3), unbiased=False), OP_TOL[torch.float32], "var")
    # the tested forward's own ReLU decisions (as test_batch_norm_act does)
    want = torch.autograd.grad(pre * (out.detach() > 0) if relu else pre, leaves, grad.double())
    for name, got, ref in zip(("x", "weight", "bias", "residual"), (gx, gw, gb, gr), want):
        assert_equivalent(got, ref, OP_TOL[torch.float32], f"grad {name}")
    y = batch_norm.affine_act_(x.clone(), Affine.given(w, b), res, relu, batch_norm.KERNELS, offset)
    ref = x.double() * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    if res is not None:
        ref = ref + F.pad(res.double(), (0, 0, 0, 0, offset, c - res.shape[1] - offset))
    assert_equivalent(y, torch.relu(ref) if relu else ref, OP_TOL[torch.float32], "affine_act")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_width_one_ignores_the_size_one_stride(channels_last):
    """W = 1 maps whose stride(3) is not the canonical one (x.transpose(2, 3)
    of an N×C×1×W map is contiguous, stride(3) = W): l = h there, so the
    kernels address positions through stride(2). They read and wrote at
    l·stride(3) before, out of bounds."""
    g = torch.Generator().manual_seed(15)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def odd(t):  # the same values, format-contiguous, stride(3) = 7
        t = t.contiguous(memory_format=fmt)
        odd_ = t.as_strided(t.shape, t.stride()[:3] + (7,))
        assert odd_.is_contiguous(memory_format=fmt) and torch.equal(odd_, t)
        return odd_

    shape = (4, 6, 9, 1)
    x, res, grad = (odd(torch.randn(shape, generator=g)).to(DEVICE) for _ in range(3))
    w, b = (torch.rand(6, generator=g) + 0.5).to(DEVICE), torch.randn(6, generator=g).to(DEVICE)
    out, mean, invstd, _ = batch_norm.forward(x, w, b, 1e-5, res, True, batch_norm.KERNELS)
    got = batch_norm.backward(grad, x, out, w, mean, invstd, True, True, batch_norm.KERNELS)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, res)]
    pre = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.1, 1e-5) + leaves[3]
    assert_equivalent(out, torch.relu(pre), OP_TOL[torch.float32])
    want = torch.autograd.grad(pre * (out.detach() > 0), leaves, grad.double())
    for name, a, b_ in zip(("x", "weight", "bias", "residual"), got, want):
        assert_equivalent(a, b_, OP_TOL[torch.float32], f"grad {name}")
    y = batch_norm.affine_act_(odd(x.clone()), Affine.given(w, b), res, True, batch_norm.KERNELS)
    ref = x.double() * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1) + res.double()
    assert_equivalent(y, torch.relu(ref), OP_TOL[torch.float32], "affine_act")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_batch_norm_nchw_other_dtypes(monkeypatch, tiles, dtype):
    """float64 (ACC float64) and bf16 (VEC counts 2-byte elements) through the
    NCHW plane tiles, 14×14 (VEC 4) and 7×7 (VEC 1)."""
    if tiles == "small":
        _small_tiles(monkeypatch)
    for shape in ((2, 12, 14, 14), (3, 10, 7, 7)):
        g = torch.Generator().manual_seed(12)
        x = (torch.randn(shape, generator=g) * 2 + 0.7).to(DEVICE, dtype)
        res = torch.randn(shape, generator=g).to(DEVICE, dtype)
        w, b = (torch.rand(shape[1], generator=g) + 0.5).to(DEVICE), torch.randn(shape[1], generator=g).to(DEVICE)
        grad = torch.randn(shape, generator=g).to(DEVICE, dtype)
        out, mean, invstd, _ = batch_norm.forward(x, w, b, 1e-5, res, True, batch_norm.KERNELS)
        grads = batch_norm.backward(grad, x, out, w, mean, invstd, True, True, batch_norm.KERNELS)
        leaves = [t.detach().double().requires_grad_() for t in (x, w, b, res)]
        pre = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.1, 1e-5) + leaves[3]
        assert out.dtype == dtype
        assert_equivalent(out, torch.relu(pre), OP_TOL[dtype])
        want = torch.autograd.grad(pre * (out.detach() > 0), leaves, grad.double())
        for name, got, ref in zip(("x", "weight", "bias", "residual"), grads, want):
            assert_equivalent(got, ref, OP_TOL[dtype], f"grad {name}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("shape", [(2, 6, 14, 14), (3, 6, 7, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_nonfinite_as_f_batch_norm(channels_last, shape):
    """NaN, +inf and −inf in x (each in its own channel, one at the channel's
    first element, the statistics' pivot) and a NaN in the residual reach
    the outputs and gradients F.batch_norm + add + relu gives, exactly where
    it gives them; the other channels stay finite and right."""
    g = torch.Generator().manual_seed(13)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[1, 0, 3, 2] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    x[2 % shape[0], 2, 5, 6] = -float("inf")
    res = torch.randn(shape, generator=g, dtype=torch.float64)
    res[0, 4, 1, 1] = float("nan")
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    w, b = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5, torch.randn(shape[1], generator=g, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [t.to(DEVICE, dtype).contiguous(memory_format=fmt).requires_grad_() for t in (x, res)]
        leaves += [t.to(DEVICE, copy=True).requires_grad_() for t in (w, b)]
        out = fn(*leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad.to(DEVICE, dtype)))

    def fused(x_, r_, w_, b_):
        with resnet_fused.backend("triton"):
            return ops.batch_norm_act(x_, w_, b_, None, None, True, 0.1, 1e-5, r_, True)

    got = run(fused, torch.float32)
    want = run(lambda x_, r_, w_, b_: torch.relu(F.batch_norm(x_, None, None, w_, b_, True, 0.1, 1e-5) + r_),
               torch.float64)
    for name, a, b_ in zip(("out", "grad x", "grad residual", "grad weight", "grad bias"), got, want):
        a, b_ = a.double().cpu(), b_.cpu()
        for what, is_ in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            assert torch.equal(is_(a), is_(b_)), f"{name}: {what} at other places"
        finite = torch.isfinite(b_)
        assert finite.any() and (name in ("grad residual", "grad bias") or not finite.all()), name
        assert_equivalent(a[finite], b_[finite], OP_TOL[torch.float32], name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_float64_to_float64_rounding(channels_last):
    """float64 runs the kernels in float64 throughout: forward and backward
    agree with F.batch_norm in float64 to a few ulps (the backward's 1/count
    was an fp32 constant once, 2e-9 off)."""
    g = torch.Generator().manual_seed(14)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(2, 12, 14, 14, generator=g, dtype=torch.float64) * 2 + 0.7).to(DEVICE, memory_format=fmt)
    w = (torch.rand(12, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
    b = torch.randn(12, generator=g, dtype=torch.float64).to(DEVICE)
    grad = torch.randn(2, 12, 14, 14, generator=g, dtype=torch.float64).to(DEVICE)
    out, mean, invstd, _ = batch_norm.forward(x, w, b, 1e-5, None, False, batch_norm.KERNELS)
    got = batch_norm.backward(grad, x, out, w, mean, invstd, False, False, batch_norm.KERNELS)[:3]
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.1, 1e-5)
    assert_equivalent(out, ref, 1e-14)
    for name, a, b_ in zip(("x", "weight", "bias"), got, torch.autograd.grad(ref, leaves, grad)):
        assert_equivalent(a, b_, 1e-14, f"grad {name}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch_matches_f_batch_norm(channels_last):
    """N = 0 in training, as F.batch_norm: an empty output (x's strides), the
    running statistics untouched, dγ = dβ = 0 and empty dx, d(residual)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(0, 6, 4, 5).to(DEVICE)
    res = torch.randn(0, 6, 4, 5).to(DEVICE)
    if channels_last:
        x, res = (t.to(memory_format=torch.channels_last) for t in (x, res))
    w, b = (torch.rand(6, generator=g) + 0.5).to(DEVICE), torch.randn(6, generator=g).to(DEVICE)
    stats = torch.randn(6, generator=g).to(DEVICE), (torch.rand(6, generator=g) + 0.5).to(DEVICE)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, res)]
        rm, rv = (t.clone() for t in stats)
        y = fn(*leaves, rm, rv)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
        return y, rm, rv, grads

    def fused(x_, w_, b_, r_, rm, rv):
        with resnet_fused.backend("triton"):
            return ops.batch_norm_act(x_, w_, b_, rm, rv, True, 0.1, 1e-5, residual=r_, relu=True)

    def torch_ref(x_, w_, b_, r_, rm, rv):
        return torch.relu(F.batch_norm(x_, rm, rv, w_, b_, True, 0.1, 1e-5) + r_)

    got, want = run(fused), run(torch_ref)
    assert got[0].shape == want[0].shape
    # F.batch_norm's own output has x's strides (the add after it may not)
    assert got[0].stride() == F.batch_norm(x, None, None, w, b, True).stride()
    for name, a, b_ in zip(("running_mean", "running_var"), got[1:3], want[1:3]):
        assert torch.equal(a, b_), name
    assert torch.equal(want[1], stats[0])  # what torch does: unchanged
    for name, a, b_ in zip(("x", "weight", "bias", "residual"), got[3], want[3]):
        assert a.shape == b_.shape and torch.equal(a, b_), f"grad {name}"
    # the recompute path's forward half (conv_bn_act_train's) keeps them too
    rm, rv = (t.clone() for t in stats)
    forward = library.OPS["batch_norm_act_parts"][0]
    out, mean, invstd = forward(x, w, b, rm, rv, 0.1, 1e-5, None, True)
    assert out.shape == x.shape and torch.equal(rm, stats[0]) and torch.equal(rv, stats[1])


# ---- registration and tracing ------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_opcheck(with_residual, channels_last):
    x, w, scale, shift, res, conv = conv_inputs(2, 8, 5, 5, 16, 3, 1, 1, 1, 2, torch.float32, channels_last)
    res = res if with_residual else None
    torch.library.opcheck(
        torch.ops.resnet_fused.triton_conv_bn_act,
        (x, w, scale, shift, res, True, list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]), 2),
    )
    g = torch.Generator().manual_seed(4)
    xb = torch.randn(3, 6, 4, 5, generator=g).to(DEVICE)
    if channels_last:
        xb = xb.to(memory_format=torch.channels_last)
    wb, bb = (torch.rand(6, generator=g) + 0.5).to(DEVICE), torch.randn(6, generator=g).to(DEVICE)
    rb = torch.randn(3, 6, 4, 5, generator=g).to(DEVICE) if with_residual else None
    for weight, bias in ((wb, bb), (None, None)):
        args = [t.clone().requires_grad_() if t is not None else None for t in (xb, weight, bias)]
        r = rb.clone().requires_grad_() if rb is not None else None
        torch.library.opcheck(torch.ops.resnet_fused.triton_batch_norm_act_fwd, (*args, 1e-5, r, True))
    out, mean, invstd, _ = torch.ops.resnet_fused.triton_batch_norm_act_fwd(xb, wb, bb, 1e-5, rb, True)
    torch.library.opcheck(
        torch.ops.resnet_fused.triton_batch_norm_act_bwd, (torch.randn_like(xb), xb, out, wb, mean, invstd, True, with_residual)
    )


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces fused blocks with the triton
    backend, eval and a training step (aot_eager: the graph is what is
    checked here; inductor codegen needs a GPU for Triton kernels). Two
    Bottleneck blocks (projection shortcut, then identity) keep tracing short."""
    torch._dynamo.reset()
    model = resnet_fused.resnet50(num_classes=10).layer2[:2].to(DEVICE)
    x = torch.randn(2, 256, 8, 8, device=DEVICE)
    with resnet_fused.backend("triton"):
        model.eval()
        with torch.no_grad():
            want = model(x)
            got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        assert_equivalent(got, want, 1e-6)
        model.train()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def _run_without_interpreter(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU, even on one
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_unavailable_without_gpu_or_interpreter_says_why():
    proc = _run_without_interpreter(
        "import resnet_fused, torch\n"
        "print(resnet_fused.backends.reason_unavailable('triton'))\n"
        "try:\n"
        "    resnet_fused.set_backend('triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
        "print(hasattr(torch.ops.resnet_fused, 'triton_conv_bn_act'))\n"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "no CUDA device" in lines[0] and "TRITON_INTERPRET=1" in lines[0]
    assert lines[1].startswith("ERROR") and "'triton'" in lines[1] and "no CUDA device" in lines[1]
    assert lines[2] == "True"  # the triton_ops are registered for tracing all the same


def test_triton_op_fake_implementation_without_interpreter():
    """The real registration (`triton_op`, kernels through wrap_triton) gives
    output shapes, dtypes and layouts under fake tensors, as torch.compile
    needs on a GPU; here without one."""
    proc = _run_without_interpreter(
        "import torch, resnet_fused\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "ops = torch.ops.resnet_fused\n"
        "with FakeTensorMode():\n"
        "    x = torch.empty(2, 16, 9, 9).to(memory_format=torch.channels_last)\n"
        "    y = ops.triton_conv_bn_act(x, torch.empty(32, 16, 3, 3), torch.empty(32), torch.empty(32),\n"
        "                               torch.empty(2, 32, 5, 5), True, [2, 2], [1, 1], [1, 1], 1)\n"
        "    print(tuple(y.shape), y.stride(), y.dtype)\n"
        "    xb = torch.empty(4, 8, 5, 5, dtype=torch.bfloat16)\n"
        "    out, mean, invstd, var = ops.triton_batch_norm_act_fwd(xb, torch.empty(8), None, 1e-5, None, True)\n"
        "    print(tuple(out.shape), out.dtype, tuple(mean.shape), mean.dtype)\n"
        "    g = ops.triton_batch_norm_act_bwd(torch.empty_like(xb), xb, out, torch.empty(8), mean, invstd, True, True)\n"
        "    print([tuple(t.shape) for t in g])\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "(2, 32, 5, 5) (800, 1, 160, 32) torch.float32",
        "(4, 8, 5, 5) torch.bfloat16 (8,) torch.float32",
        "[(4, 8, 5, 5), (8,), (8,), (4, 8, 5, 5)]",
    ]
