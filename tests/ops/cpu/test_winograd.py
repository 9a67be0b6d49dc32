"""The cpu backend's Winograd F(4x4, 3x3) convolution
(torch.ops.resnet_fused.winograd_conv3x3, csrc/cpu/winograd.cpp) and how the
oneDNN inference path uses it (resnet_fused.ops.cpu.onednn)."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from resnet_fused.ops import extension
from resnet_fused.ops.cpu import onednn
from conftest import NET_TOL, OP_TOL, assert_equivalent, gemm_unpack, randomize_norms

pytestmark = pytest.mark.skipif(not extension.is_loaded(), reason="resnet_fused._C is not built")

ops = torch.ops.resnet_fused


def case(n, c, k, h, w, seed=0, residual=True, fmt=torch.channels_last):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(memory_format=fmt)
    weight = torch.randn(k, c, 3, 3, generator=g) / math.sqrt(9 * c)
    bias = torch.randn(k, generator=g)
    res = torch.randn(n, k, h, w, generator=g).to(memory_format=fmt) if residual else None
    return x, weight, bias, res


def reference(x, weight, bias, res, relu):
    """The same epilogue order, in float64: act(conv + bias + residual)."""
    y = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    if res is not None:
        y = y + res.double()
    return y.relu() if relu else y


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 16, 16, 1, 1),      # one pixel: a single tile, mostly padding
        (1, 16, 32, 2, 3),      # C != K, smaller than a tile
        (2, 32, 16, 5, 7),      # partial tiles on both edges
        (3, 64, 64, 13, 9),     # odd batch and sizes
        (1, 48, 80, 16, 16),    # whole tiles only
        (2, 512, 512, 44, 44),  # 242 tiles: four even chunks of the workspace (61, 61, 61, 59)
    ],
)
def test_matches_a_float64_convolution(shape, residual, relu):
    x, weight, bias, res = case(*shape, residual=residual)
    out = ops.winograd_conv3x3(x, ops.winograd_weight(weight), bias, res, relu)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_equivalent(out, reference(x, weight, bias, res, relu), OP_TOL[torch.float32])


def test_keeps_the_input_memory_format():
    x, weight, bias, res = case(2, 32, 48, 9, 6, fmt=torch.contiguous_format)
    out = ops.winograd_conv3x3(x, ops.winograd_weight(weight), bias, res, True)
    assert out.is_contiguous()
    assert_equivalent(out, reference(x, weight, bias, res, True), OP_TOL[torch.float32])
    # a channels_last residual with an NCHW input (and the other way round)
    res_cl = res.to(memory_format=torch.channels_last)
    assert torch.equal(ops.winograd_conv3x3(x, ops.winograd_weight(weight), bias, res_cl, True), out)


@pytest.mark.parametrize("k", [48, 80])  # one panel narrower than 64; a whole one and a narrower one
def test_weight_transform_is_g_w_gt_rounded_once(k):
    """winograd_weight(w) holds, for each point i * 6 + j, the (C x K)
    matrix (G w[k, c] G^T)[i, j] for the points 0, 1, -1, 1/2, -2
    (computed here from the Lagrange basis), packed for the CPU GEMM."""
    points = [0.0, 1.0, -1.0, 0.5, -2.0]
    G = torch.zeros(6, 3, dtype=torch.float64)
    for i, p in enumerate(points):
        den = math.prod(p - q for j, q in enumerate(points) if j != i)
        G[i] = torch.tensor([1.0, p, p * p], dtype=torch.float64) / den
    G[5] = torch.tensor([0.0, 0.0, 1.0])
    w = torch.randn(k, 16, 3, 3, generator=torch.Generator().manual_seed(3))
    expected = torch.einsum("ia,kcab,jb->ijck", G, w.double(), G).reshape(36, 16, k)
    got = ops.winograd_weight(w)
    assert got.dtype == torch.float32 and got.shape == (36, 16 * k)
    got = torch.stack([gemm_unpack(got[p], 16, k) for p in range(36)])
    # one rounding of a float64 result: within an fp32 ulp (2^-23) of it
    torch.testing.assert_close(got.double(), expected, rtol=2.0**-23, atol=0.0)


def test_results_do_not_depend_on_the_thread_count():
    x, weight, bias, res = case(2, 512, 512, 44, 44, seed=4)
    v = ops.winograd_weight(weight)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ops.winograd_conv3x3(x, v, bias, res, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_nan_in_the_input_reaches_the_outputs_that_read_it():
    """A NaN spreads to the whole 4x4 tiles whose 6x6 patches hold it (a
    direct convolution: its 3x3 neighbourhood), so every output the direct
    convolution makes NaN is NaN here too; the rest stays finite."""
    x, weight, bias, _ = case(1, 16, 16, 12, 12, seed=5)
    x[0, 3, 5, 6] = float("nan")
    out = ops.winograd_conv3x3(x, ops.winograd_weight(weight), bias, None, False)
    direct = F.conv2d(x, weight, bias, padding=1)
    assert out.isnan()[direct.isnan()].all()
    assert out[:, :, 8:, :].isfinite().all() and out[:, :, :, :4].isfinite().all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"].double()), "x must be float32"),
        (lambda a: a.update(weight=a["weight"].double()), "weight must be float32"),
        (lambda a: a.update(bias=a["bias"].half()), "bias must be float32"),
        (lambda a: a.update(x=a["x"][0]), "x must be 4-D"),
        (lambda a: a.update(x=torch.randn(2, 24, 5, 5)), "x has 24 channels but weight \\(256 values per point\\)"),
        (lambda a: a.update(weight=a["weight"][:, :128].contiguous()), "multiples of 16, got C=16, K=8"),
        (lambda a: a.update(weight=a["weight"][:35]), "weight must be a contiguous \\(36, C \\* K\\)"),
        (lambda a: a.update(weight=a["weight"][:, ::2]), "weight must be a contiguous \\(36, C \\* K\\)"),
        (lambda a: a.update(bias=a["bias"][:5]), "bias must be a contiguous \\(16,\\)"),
        (lambda a: a.update(residual=a["residual"][:, :, 1:]), "residual must be \\[2, 16, 5, 5\\]"),
        (lambda a: a.update(residual=a["residual"].double()), "residual must be float32"),
    ],
)
def test_bad_arguments_are_named(change, message):
    x, weight, bias, res = case(2, 16, 16, 5, 5)
    args = {"x": x, "weight": ops.winograd_weight(weight), "bias": bias, "residual": res}
    change(args)
    with pytest.raises(RuntimeError, match=message):
        ops.winograd_conv3x3(args["x"], args["weight"], args["bias"], args["residual"], True)
    with pytest.raises(RuntimeError, match="weight must be \\(K, C, 3, 3\\)"):
        ops.winograd_weight(torch.randn(4, 4, 1, 1))
    with pytest.raises(RuntimeError, match="winograd_weight: weight must be float32"):
        ops.winograd_weight(torch.randn(4, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="winograd_weight: output channels must be a multiple of 16, got K=24"):
        ops.winograd_weight(torch.randn(24, 4, 3, 3))


def winograd_convs(model):
    return {c for c in model.modules() if any(p.winograd for p in onednn.cached(c))}


@pytest.mark.skipif(onednn.UNAVAILABLE is not None, reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE}")
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wide_resnet50_2"])
def test_models_use_it_for_their_3x3_stride_1_convolutions(arch):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(torchvision.models, arch)()).eval()
    fused = resnet_fused.fuse(tv).eval()
    # layer3 sees 6x8 maps: 4 tiles an image, 8 in all; layer4 3x4: 1 an image, too few for
    # 512+ channels (test_few_tiles_of_wide_convolutions_stay_on_onednn)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(6))
    in_layer4 = set(fused.layer4.modules())
    expected = {
        m for m in fused.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.groups == 1
        and m not in in_layer4
    }
    assert expected and resnet_fused.cpu_winograd()
    with torch.no_grad():
        ref = tv(x)
        out = fused(x)
        assert winograd_convs(fused) == expected
        assert_equivalent(out, ref, NET_TOL[torch.float32])
        assert torch.equal(fused(x), out)  # the warm (planned) forward: the same calls
        try:
            resnet_fused.set_cpu_winograd(False)  # repacks: every conv on oneDNN
            direct = fused(x)
            assert not winograd_convs(fused)
        finally:
            resnet_fused.set_cpu_winograd(True)
        assert_equivalent(direct, ref, NET_TOL[torch.float32])
        assert not torch.equal(direct, out)
        assert torch.equal(fused(x), out)
        assert winograd_convs(fused) == expected
        # bf16 stays on oneDNN's bf16 convolutions where the CPU has them; without
        # them (AVX2-only) bf16 layers compute in fp32, Winograd included
        onednn.clear_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused(x)
        assert winograd_convs(fused) == (set() if onednn.BF16_NATIVE else expected) and onednn.cache_size() > 0


def test_set_cpu_winograd_wants_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        resnet_fused.set_cpu_winograd(1)


@pytest.mark.parametrize(
    "conv, dtype, fits",
    [
        (torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.float32, True),
        (torch.nn.Conv2d(16, 48, 3, padding=1), torch.float32, True),
        (torch.nn.Conv2d(64, 64, 3, padding=1), torch.bfloat16, False),
        (torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.float32, False),
        # dilated with padding = dilation: d² undilated sub-image convolutions
        (torch.nn.Conv2d(64, 64, 3, padding=2, dilation=2), torch.float32, True),
        (torch.nn.Conv2d(64, 64, 3, padding=4, dilation=4), torch.float32, True),
        (torch.nn.Conv2d(64, 64, 3, padding=3, dilation=3), torch.float32, True),  # 28 % 3 != 0: padded
        (torch.nn.Conv2d(64, 64, 3, padding=1, dilation=2), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, padding=(2, 4), dilation=(2, 4)), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, padding=0), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, padding=1, groups=2), torch.float32, False),
        (torch.nn.Conv2d(40, 64, 3, padding=1), torch.float32, False),
        (torch.nn.Conv2d(64, 24, 3, padding=1), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 1), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 7, padding=3), torch.float32, False),
    ],
)
def test_only_3x3_stride_1_float32_convolutions_with_16_channel_multiples_use_it(conv, dtype, fits):
    size = (2, conv.in_channels, 28, 28)
    assert onednn._winograd_fits(conv, dtype, size) is fits
    try:
        resnet_fused.set_cpu_winograd(False)
        assert onednn._winograd_fits(conv, dtype, size) is False
    finally:
        resnet_fused.set_cpu_winograd(True)


@pytest.mark.parametrize(
    "dilation, size, fits",
    [
        (2, (1, 64, 28, 28), True), (4, (1, 64, 28, 28), True), (2, (1, 64, 65, 65), True),
        (4, (1, 64, 65, 65), True),   # DeepLab's layer3/layer4 at 224² and 520²
        (12, (1, 64, 65, 65), False), (24, (1, 64, 65, 65), False), (12, (2, 64, 28, 28), False),
        (36, (2, 64, 28, 28), False),  # its ASPP: tiles mostly over padding oneDNN skips
    ],
)
def test_dilated_convolutions_whose_sub_images_are_mostly_padding_stay_on_onednn(dilation, size, fits):
    conv = torch.nn.Conv2d(64, 64, 3, padding=dilation, dilation=dilation, bias=False)
    assert onednn._winograd_fits(conv, torch.float32, size) is fits


@pytest.mark.parametrize(
    "channels, size, fits",
    [
        (512, (1, 512, 7, 7), False),    # 4 tiles: the filters' transform outweighs the savings
        (256, (1, 256, 7, 7), False),
        (256, (2, 256, 5, 5), True),     # 8 tiles
        (512, (8, 512, 4, 4), True),
        (128, (1, 128, 1, 1), True),     # narrow: still cheaper
    ],
)
def test_few_tiles_of_wide_convolutions_stay_on_onednn(channels, size, fits):
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    assert onednn._winograd_fits(conv, torch.float32, size) is fits


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), ("False", False), ("1", True), ("", True)])
def test_the_environment_variable_sets_the_default(value, enabled):
    code = "import resnet_fused; print(resnet_fused.cpu_winograd())"
    env = dict(os.environ, RESNET_FUSED_CPU_WINOGRAD=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(enabled)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_opcheck(fmt, residual):
    """Schema, fake kernels (shapes, dtype and memory format under tracing)
    and dispatch of both ops agree (torch.library.opcheck)."""
    x, weight, bias, res = case(2, 16, 32, 7, 9, seed=11, residual=residual, fmt=fmt)
    torch.library.opcheck(ops.winograd_weight, (weight,))
    torch.library.opcheck(ops.winograd_conv3x3, (x, ops.winograd_weight(weight), bias, res, True))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fw = ops.winograd_weight(mode.from_tensor(weight))
        out = ops.winograd_conv3x3(fx, fw, mode.from_tensor(bias), None, False)
    assert fw.shape == (36, 16 * 32) and out.shape == (2, 32, 7, 9)
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.skipif(onednn.UNAVAILABLE is not None, reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE}")
@pytest.mark.parametrize("dilation, h, w", [(2, 24, 16), (4, 24, 16), (2, 26, 18), (4, 30, 28), (3, 34, 24)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_dilated_convolutions_run_as_sub_image_winograd(dilation, h, w, residual, fmt):
    """DeepLab/FCN's dilated 3x3 layers: the cached convolution is the
    Winograd kernel on the d² interleaved sub-images (a map not divisible
    by d zero-padded up to one: the 65x65 of a 520² input), within the
    per-op fp32 bound of a float64 convolution, in the input's layout."""
    torch.manual_seed(dilation)
    conv = torch.nn.Conv2d(32, 48, 3, padding=dilation, dilation=dilation, bias=False)
    bn = randomize_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(48)))[0]
    conv.eval(), bn.eval()
    x = torch.randn(2, 32, h, w).contiguous(memory_format=fmt)
    r = torch.randn(2, 48, h, w).contiguous(memory_format=fmt) if residual else None
    onednn.clear_cache()
    with torch.no_grad():
        out = resnet_fused.layers.conv_norm_act(conv, bn, x, residual=r)
        ref = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double()))
        ref = (ref + r.double() if residual else ref).relu()
    assert [p.winograd for p in onednn.cached(conv)] == [True]
    assert_equivalent(out, ref, OP_TOL[torch.float32])
    assert out.is_contiguous(memory_format=fmt)
