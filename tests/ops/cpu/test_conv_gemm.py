"""The k x k convolutions as an implicit GEMM (torch.ops.resnet_fused.conv_gemm,
csrc/cpu/conv_gemm.cpp, over the GEMM of csrc/cpu/gemm.h) and where the cpu
backend's inference path uses them (resnet_fused.ops.cpu.onednn)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from resnet_fused.ops import extension
from resnet_fused.ops.cpu import onednn
from conftest import (assert_equivalent, assert_nonfinite_like, fits_in_a_new_process, gemm_unpack, NET_TOL,
                      on_every_cpu_kernel, OP_TOL, randomize_norms)
from test_gemm import isas

pytestmark = pytest.mark.skipif(not extension.is_loaded(), reason="resnet_fused._C is not built")

ops = torch.ops.resnet_fused


def case(n, c, k, h, w, kernel, stride, padding, seed=0, residual=True, fmt=torch.channels_last):
    g = torch.Generator().manual_seed(seed)
    r, s = kernel
    x = torch.randn(n, c, h, w, generator=g).to(memory_format=fmt)
    weight = torch.randn(k, c, r, s, generator=g) / math.sqrt(c * r * s)
    bias = torch.randn(k, generator=g)
    p, q = (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1
    res = torch.randn(n, k, p, q, generator=g).to(memory_format=fmt) if residual else None
    return x, weight, bias, res


def reference(x, weight, bias, res, relu, stride, padding):
    """The same epilogue order, in float64: act(conv + bias + residual)."""
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride=stride, padding=padding)
    if res is not None:
        y = y + res.double()
    return y.relu() if relu else y


SHAPES = [
    # (n, c, k, h, w, kernel, stride, padding)
    (1, 3, 64, 40, 34, (7, 7), 2, 3),       # the stem: runs of 7 x 3 values, odd map sizes
    (2, 64, 128, 13, 11, (3, 3), 2, 1),     # a stride-2 3x3 layer
    (1, 32, 48, 7, 7, (3, 3), 1, 1),        # stride 1 with padding: rows are not the input's pixels
    (1, 128, 256, 6, 6, (3, 3), 2, 1),      # K = 1152 > 1024: k blocks cut across the runs
    (1, 256, 32, 4, 5, (3, 3), 1, 1),       # K = 2304: five blocks of 461, none on a run's edge
    (2, 40, 80, 9, 6, (3, 1), 1, 1),        # R != S: a panel of 64 and one of 16
    (1, 16, 16, 5, 8, (1, 3), 3, 0),        # stride 3, no padding
]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_a_float64_convolution(shape, residual, relu):
    n, c, k, h, w, kernel, stride, padding = shape
    x, weight, bias, res = case(n, c, k, h, w, kernel, stride, padding, residual=residual)
    out = ops.conv_gemm(x, ops.conv_gemm_weight(weight), bias, res, relu, kernel, stride, padding)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    assert_equivalent(out, reference(x, weight, bias, res, relu, stride, padding), OP_TOL[torch.float32])


def test_no_bias_and_the_input_memory_format():
    x, weight, _, res = case(2, 24, 32, 9, 8, (3, 3), 2, 1, fmt=torch.contiguous_format)
    out = ops.conv_gemm(x, ops.conv_gemm_weight(weight), None, res, True, (3, 3), 2, 1)
    assert out.is_contiguous()
    assert_equivalent(out, reference(x, weight, None, res, True, 2, 1), OP_TOL[torch.float32])


def test_weight_packing_is_taps_then_channels_in_the_gemms_panels():
    w = torch.randn(80, 6, 3, 2)
    packed = ops.conv_gemm_weight(w)
    assert packed.shape == (80 * 6 * 3 * 2,)
    assert torch.equal(gemm_unpack(packed, 3 * 2 * 6, 80), w.permute(2, 3, 1, 0).reshape(36, 80))


def test_a_1x1_weight_packs_as_conv1x1_weight_packs_it():
    """The cpu backend packs every GEMM convolution's weight with
    conv_gemm_weight, its 1x1 ones too, for the conv1x1 op."""
    w = torch.randn(80, 24, 1, 1)
    assert torch.equal(ops.conv_gemm_weight(w), ops.conv1x1_weight(w))


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]])
def test_every_kernel_and_thread_count_gives_the_same_bits(shape):
    """Each output is one fused multiply-add chain over the taps and channels
    in order, whatever the ISA's tile, the blocking or the thread split."""
    n, c, k, h, w, kernel, stride, padding = shape
    x, weight, bias, res = case(n, c, k, h, w, kernel, stride, padding, seed=3)
    packed = ops.conv_gemm_weight(weight)
    outs = on_every_cpu_kernel(lambda: ops.conv_gemm(x, packed, bias, res, True, kernel, stride, padding), isas(),
                               (1, 2, 3))
    first = outs[extension.cpu_gemm_isa(), 1]
    assert all(torch.equal(first, o) for o in outs.values()), sorted(outs)
    assert_equivalent(first, reference(x, weight, bias, res, True, stride, padding), OP_TOL[torch.float32])


@pytest.mark.parametrize("relu", [True, False])
def test_nan_and_infinity_land_where_a_direct_convolution_puts_them(relu):
    x, weight, bias, res = case(2, 16, 32, 8, 9, (3, 3), 2, 1, seed=5)
    x[0, 3, 2, 4] = float("nan")
    x[1, :, 0, 0] = float("inf")    # at the border: inf times weights of both signs, NaN
    x[1, 5, 5, 6] = float("-inf")   # one infinity: ±inf by each weight's sign
    res[0, 7, 3, 3] = float("inf")
    ref = reference(x, weight, bias, res, relu, 2, 1)
    packed = ops.conv_gemm_weight(weight)
    for (isa, _), out in on_every_cpu_kernel(lambda: ops.conv_gemm(x, packed, bias, res, relu, (3, 3), 2, 1),
                                             isas()).items():
        assert_nonfinite_like(out, ref, OP_TOL[torch.float32], isa)
    assert ref.isnan().any() and (ref.isinf()).any()


def test_empty_batches():
    x, weight, bias, _ = case(0, 16, 32, 9, 9, (3, 3), 2, 1)
    out = ops.conv_gemm(x, ops.conv_gemm_weight(weight), bias, None, True, (3, 3), 2, 1)
    assert out.shape == (0, 32, 5, 5) and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"].double()), "conv_gemm: x must be float32"),
        (lambda a: a.update(weight=a["weight"].double()), "conv_gemm: weight must be float32"),
        (lambda a: a.update(bias=a["bias"].half()), "conv_gemm: bias must be float32"),
        (lambda a: a.update(x=a["x"][0]), "conv_gemm: x must be 4-D"),
        (lambda a: a.update(weight=a["weight"].view(16, -1)), "weight must be a contiguous 1-D tensor"),
        (lambda a: a.update(weight=a["weight"][:128]), "does not hold a multiple of 16 output channels"),
        (lambda a: a.update(kernel=(5, 1)), "does not hold a multiple of 16 output channels of 5x1 taps"),
        (lambda a: a.update(kernel=(3, 0)), "kernel_size must be two positive sizes"),
        (lambda a: a.update(bias=a["bias"][:5]), "bias must be a contiguous \\(16,\\)"),
        (lambda a: a.update(residual=a["residual"][:, :, 1:]), "residual must be \\[2, 16, 3, 3\\]"),
        (lambda a: a.update(residual=a["residual"].double()), "residual must be float32"),
        (lambda a: a.update(stride=0), "stride must be at least 1, got 0"),
        (lambda a: a.update(padding=-1), "padding must be at least 0, got -1"),
        (lambda a: a.update(x=a["x"][:, :, :1, :1], padding=0), "the padded input \\(1x1\\) is smaller than the kernel"),
    ],
)
def test_bad_arguments_are_named(change, message):
    x, weight, bias, res = case(2, 8, 16, 5, 5, (3, 3), 2, 1)
    args = {"x": x, "weight": ops.conv_gemm_weight(weight), "bias": bias, "residual": res, "kernel": (3, 3),
            "stride": 2, "padding": 1}
    change(args)
    with pytest.raises(RuntimeError, match=message):
        ops.conv_gemm(args["x"], args["weight"], args["bias"], args["residual"], True, args["kernel"], args["stride"],
                      args["padding"])


def test_bad_weights_to_pack_are_named():
    with pytest.raises(RuntimeError, match="conv_gemm_weight: output channels must be a multiple of 16, got K=24"):
        ops.conv_gemm_weight(torch.randn(24, 4, 3, 3))
    with pytest.raises(RuntimeError, match="conv_gemm_weight: weight must be float32"):
        ops.conv_gemm_weight(torch.randn(16, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="conv_gemm_weight: weight must be \\(K, C, R, S\\)"):
        ops.conv_gemm_weight(torch.randn(16, 4, 3))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_opcheck(fmt, residual):
    """Schema, fake kernels (shapes, dtype and memory format under tracing)
    and dispatch agree (torch.library.opcheck)."""
    x, weight, bias, res = case(2, 8, 32, 7, 9, (3, 3), 2, 1, seed=11, fmt=fmt)
    packed = ops.conv_gemm_weight(weight)
    torch.library.opcheck(ops.conv_gemm_weight, (weight,))
    torch.library.opcheck(ops.conv_gemm, (x, packed, bias, res if residual else None, True, [3, 3], 2, 1))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fw = ops.conv_gemm_weight(mode.from_tensor(weight))
        out = ops.conv_gemm(mode.from_tensor(x), fw, mode.from_tensor(bias), None, False, [3, 3], 2, 1)
    assert fw.shape == (32 * 8 * 9,) and out.shape == (2, 32, 4, 5)
    assert out.is_contiguous(memory_format=fmt)


def conv_gemm_convs(model):
    return {c for c in model.modules() if any(p.gemm and p.kernel_size != (1, 1) for p in onednn.cached(c))}


@pytest.fixture
def conv_gemm_everywhere(monkeypatch):
    """The rule as RESNET_FUSED_CPU_CONV_GEMM=1 sets it (every k x k
    convolution, on every CPU with a vector GEMM kernel), with a fresh weight
    cache before and after."""
    monkeypatch.setattr(onednn, "_conv_gemm", "1")
    onednn.clear_cache()
    yield
    onednn.clear_cache()


@pytest.mark.skipif(onednn.UNAVAILABLE is not None, reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE}")
@pytest.mark.skipif(extension.is_loaded() and extension.cpu_gemm_isa() == "generic",
                    reason="this CPU has neither AVX2 with FMA nor AVX-512")
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_models_run_their_stem_and_strided_3x3_convolutions_on_it(arch, conv_gemm_everywhere):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(torchvision.models, arch)()).eval()
    fused = resnet_fused.fuse(tv).eval()
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(6))
    kxk = {m for m in fused.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)}
    strided = {m for m in kxk if m.stride != (1, 1)}  # the stem and the stride-2 3x3 ones
    with torch.no_grad():
        ref = tv(x)
        out = fused(x)
        # every k x k convolution that Winograd does not take (at this size
        # also the 3x3 ones of layer3 and layer4: too few tiles)
        winograd = {m for m in kxk if any(p.winograd for p in onednn.cached(m))}
        assert strided and conv_gemm_convs(fused) == kxk - winograd and strided <= conv_gemm_convs(fused)
        assert_equivalent(out, ref, NET_TOL[torch.float32])
        assert torch.equal(fused(x), out)  # the warm (planned) forward: the same calls
        small = fused(x[:1, :, :40])
        assert_equivalent(small, tv(x[:1, :, :40]), NET_TOL[torch.float32])
    for conv in strided:  # one packing for both sizes
        packs = onednn.cached(conv)
        assert len(packs) == 2 and packs[0].weight is packs[1].weight


@pytest.mark.skipif(onednn.UNAVAILABLE is not None, reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE}")
def test_by_default_only_the_stem_runs_on_it_and_only_on_avx2(monkeypatch):
    monkeypatch.setattr(onednn, "_conv_gemm", "auto")
    onednn.clear_cache()
    tv = randomize_norms(torchvision.models.resnet18()).eval()
    fused = resnet_fused.fuse(tv).eval()
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_equivalent(fused(x), tv(x), NET_TOL[torch.float32])
    assert conv_gemm_convs(fused) == ({fused.conv1} if extension.cpu_gemm_isa() == "avx2" else set())
    onednn.clear_cache()


@pytest.mark.skipif(onednn.UNAVAILABLE is not None, reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE}")
def test_nonfinite_weights_keep_the_layer_off_it(conv_gemm_everywhere):
    """A NaN in a weight: the layer runs the composed path (`lookup`), and
    NaN reaches the output as in torch."""
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1).eval()
    with torch.no_grad():
        conv.weight[3, 2, 1, 1] = float("nan")
    packed = onednn.pack(conv, None, torch.float32, (1, 16, 8, 8))
    assert not packed.finite and not packed.gemm


@pytest.mark.parametrize("value", ["0", "1", "auto"])
@pytest.mark.parametrize("conv, stem", [("torch.nn.Conv2d(3, 64, 7, 2, 3)", True),
                                        ("torch.nn.Conv2d(64, 128, 3, 2, 1)", False)])
def test_the_environment_variable_picks_where_it_runs(value, conv, stem, tmp_path):
    """Default ("auto"): convolutions of fewer than 16 input channels (the
    stem) where the GEMM kernel is AVX2; 1: every k x k one wherever the GEMM
    has a vector kernel; 0: none."""
    fitted = fits_in_a_new_process("RESNET_FUSED_CPU_CONV_GEMM", value, conv, "_conv_gemm_fits", tmp_path)
    isa = extension.cpu_gemm_isa()
    expected = {"0": False, "1": isa != "generic", "auto": stem and isa == "avx2"}[value]
    assert fitted is expected


def test_a_bad_environment_value_is_named(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import resnet_fused.ops.cpu.onednn"], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(__import__("os").environ, RESNET_FUSED_CPU_CONV_GEMM="yes"))
    assert out.returncode != 0 and "RESNET_FUSED_CPU_CONV_GEMM must be 'auto', '1' or '0', got 'yes'" in out.stderr


@pytest.mark.parametrize(
    "conv, dtype, fits",
    [
        (torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), torch.float32, True),
        (torch.nn.Conv2d(128, 256, 3, stride=2, padding=1, bias=False), torch.float32, True),
        (torch.nn.Conv2d(512, 512, 3, padding=1), torch.float32, True),
        (torch.nn.Conv2d(64, 64, 3, padding=1), torch.bfloat16, False),
        (torch.nn.Conv2d(64, 24, 3, padding=1), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 1), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, padding=1, groups=2), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, padding=2, dilation=2), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, stride=(1, 2), padding=1), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, padding=(1, 0)), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, padding="same"), torch.float32, False),
    ],
)
def test_only_float32_ungrouped_undilated_convolutions_use_it(conv, dtype, fits, monkeypatch):
    monkeypatch.setattr(onednn, "_conv_gemm", "1")
    assert onednn._conv_gemm_fits(conv, dtype) is (fits and extension.cpu_gemm_isa() != "generic")
