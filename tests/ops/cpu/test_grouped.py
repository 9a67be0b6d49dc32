"""The cpu backend's grouped 3x3 convolution (torch.ops.resnet_fused.grouped_conv3x3,
csrc/cpu/grouped_conv.cpp) and how the oneDNN inference path uses it for
ResNeXt's middle convolutions (resnet_fused.ops.cpu.onednn)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from resnet_fused.ops import extension
from resnet_fused.ops.cpu import onednn
from conftest import assert_nonfinite_like, fits_in_a_new_process, on_every_cpu_kernel, NET_TOL, OP_TOL, assert_equivalent, randomize_norms

pytestmark = pytest.mark.skipif(not extension.is_loaded(), reason="resnet_fused._C is not built")

ops = torch.ops.resnet_fused


def case(n, c, groups, h, w, stride=1, seed=0, residual=True, fmt=torch.channels_last):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(memory_format=fmt)
    weight = torch.randn(c, c // groups, 3, 3, generator=g) / math.sqrt(9 * c // groups)
    bias = torch.randn(c, generator=g)
    p, q = (h - 1) // stride + 1 if h else 0, (w - 1) // stride + 1 if w else 0
    res = torch.randn(n, c, p, q, generator=g).to(memory_format=fmt) if residual else None
    return x, weight, bias, res


def reference(x, weight, bias, res, relu, groups, stride=1):
    """The same epilogue order, in float64: act(conv + bias + residual)."""
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride=stride, padding=1,
                 groups=groups)
    if res is not None:
        y = y + res.double()
    return y.relu() if relu else y


def kernels():
    """The grouped kernel follows the GEMM's ISA choice (`cpu_gemm_isa`):
    the AVX2 tile wherever a vector GEMM runs, else the scalar one."""
    current = extension.cpu_gemm_isa()
    return [current] + ([] if current == "generic" else ["generic"])


# (N, C, groups, H, W, stride): ResNeXt's channels per group (4, 8, 16, 32, 64)
# at both strides, partial tiles of 6 pixels, maps smaller than the 3x3 window
SHAPES = [
    (1, 128, 32, 9, 11, 1),   # 4 per group (resnext50_32x4d's layer1)
    (2, 256, 32, 7, 6, 2),    # 8 per group, stride 2
    (1, 64, 4, 5, 5, 1),      # 16 per group
    (3, 64, 2, 4, 7, 2),      # 32 per group, odd batch
    (1, 128, 2, 3, 3, 1),     # 64 per group: a column block of 16 in the middle of a group
    (2, 48, 12, 1, 1, 1),     # one pixel: every outer tap is padding
    (1, 16, 4, 2, 13, 2),     # one column block
]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_a_float64_convolution(shape, residual, relu):
    n, c, groups, h, w, stride = shape
    x, weight, bias, res = case(n, c, groups, h, w, stride, residual=residual)
    out = ops.grouped_conv3x3(x, ops.grouped_conv3x3_weight(weight), bias, res, relu, stride)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_equivalent(out, reference(x, weight, bias, res, relu, groups, stride), OP_TOL[torch.float32])


@pytest.mark.parametrize("shape", [
    SHAPES[0], SHAPES[1], SHAPES[3], (1, 512, 32, 14, 14, 1), (2, 1024, 32, 7, 7, 2),
    (3, 128, 32, 20, 20, 1),  # 614 KB of input: chunks of 16 tiles that cross images
])
def test_every_kernel_and_thread_count_gives_the_same_bits(shape):
    """Each output is one fused multiply-add chain over the taps, then the
    group's channels, whatever the kernel or the split over threads (or
    into chunks of tiles, each fetching the next one's input and output
    lines while it runs: inputs beyond 256 KB)."""
    n, c, groups, h, w, stride = shape
    x, weight, bias, res = case(n, c, groups, h, w, stride, seed=3)
    packed = ops.grouped_conv3x3_weight(weight)
    outs = on_every_cpu_kernel(lambda: ops.grouped_conv3x3(x, packed, bias, res, True, stride), kernels(), (1, 2, 3))
    first = outs[extension.cpu_gemm_isa(), 1]
    assert all(torch.equal(first, o) for o in outs.values()), sorted(outs)
    assert_equivalent(first, reference(x, weight, bias, res, True, groups, stride), OP_TOL[torch.float32])


def test_weight_reorder_is_the_documented_layout():
    _, weight, _, _ = case(1, 64, 8, 3, 3)
    packed = ops.grouped_conv3x3_weight(weight)
    assert packed.shape == (4, 3, 3, 8, 16)
    for o, i, r, s in [(0, 0, 0, 0), (17, 5, 2, 1), (63, 7, 1, 2), (40, 3, 0, 2)]:
        assert packed[o // 16, r, s, i, o % 16] == weight[o, i, r, s]


def test_keeps_the_input_memory_format_and_works_without_bias():
    x, weight, _, res = case(2, 64, 16, 6, 5, fmt=torch.contiguous_format)
    out = ops.grouped_conv3x3(x, ops.grouped_conv3x3_weight(weight), None, res, True)
    assert out.is_contiguous()
    assert_equivalent(out, reference(x, weight, None, res, True, 16), OP_TOL[torch.float32])
    cl = ops.grouped_conv3x3(x.to(memory_format=torch.channels_last), ops.grouped_conv3x3_weight(weight), None,
                             res.to(memory_format=torch.channels_last), True)
    assert torch.equal(cl, out)


@pytest.mark.parametrize("groups", [32, 16, 4])  # 4, 8 and 32 channels per group
@pytest.mark.parametrize("relu", [True, False])
def test_nan_and_infinity_stay_in_their_group(groups, relu):
    """Every product of a real input is formed, and no other group's input
    enters a sum: NaN, +inf and -inf land exactly where a float64 direct
    convolution puts them, on every kernel."""
    x, weight, bias, res = case(2, 128, groups, 6, 7, seed=5)
    cg = 128 // groups
    x[0, 3, 2, 4] = float("nan")
    x[1, cg:2 * cg, 1, 1] = float("inf")  # one group's channels at one pixel: inf by weights of both signs
    x[1, 5, 4, 0] = float("-inf")         # on the border: its taps meet padding
    res[0, 7, 5, 5] = float("inf")
    ref = reference(x, weight, bias, res, relu, groups)
    packed = ops.grouped_conv3x3_weight(weight)
    outs = on_every_cpu_kernel(lambda: ops.grouped_conv3x3(x, packed, bias, res, relu), kernels())
    assert len(outs) == len(kernels())
    for (isa, _), out in outs.items():
        assert_nonfinite_like(out, ref, OP_TOL[torch.float32], isa)
    # the NaN reaches its own group's channels around (2, 4) and no other channel
    hit = ref[0].isnan().any(dim=(1, 2))
    assert hit[:cg].all() and not hit[cg:].any()


def test_relu_keeps_negative_zero_and_nan_like_torch_relu():
    x = torch.zeros(1, 16, 1, 2).to(memory_format=torch.channels_last)
    weight = torch.zeros(16, 4, 3, 3)
    bias = torch.full((16,), -0.0)
    bias[3] = float("nan")
    out = ops.grouped_conv3x3(x, ops.grouped_conv3x3_weight(weight), bias, None, True)
    ref = torch.relu(F.conv2d(x, weight, bias, padding=1, groups=4))
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 2
    assert torch.equal(torch.signbit(out[~out.isnan()]), torch.signbit(ref[~ref.isnan()]))


def test_empty_batches_and_maps():
    x, weight, bias, _ = case(0, 32, 8, 5, 5, residual=False)
    assert ops.grouped_conv3x3(x, ops.grouped_conv3x3_weight(weight), bias, None, True, 2).shape == (0, 32, 3, 3)
    x = torch.randn(2, 32, 0, 4).to(memory_format=torch.channels_last)
    assert ops.grouped_conv3x3(x, ops.grouped_conv3x3_weight(weight), bias, None, True).shape == (2, 32, 0, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"].double()), "grouped_conv3x3: x must be float32"),
        (lambda a: a.update(weight=a["weight"].double()), "grouped_conv3x3: weight must be float32"),
        (lambda a: a.update(bias=a["bias"].half()), "grouped_conv3x3: bias must be float32"),
        (lambda a: a.update(x=a["x"][0]), "grouped_conv3x3: x must be 4-D"),
        (lambda a: a.update(weight=a["weight"].view(2, 9, 8, 16)), "weight must be a contiguous \\(C / 16, 3, 3"),
        (lambda a: a.update(x=torch.randn(2, 48, 5, 5)), "weight is for 32 channels, x has 48"),
        (lambda a: a.update(bias=a["bias"][:5]), "bias must be a contiguous \\(32,\\)"),
        (lambda a: a.update(residual=a["residual"][:, :, 1:]), "residual must be \\[2, 32, 5, 5\\]"),
        (lambda a: a.update(residual=a["residual"].double()), "residual must be float32"),
        (lambda a: a.update(stride=3), "stride must be 1 or 2, got 3"),
    ],
)
def test_bad_arguments_are_named(change, message):
    x, weight, bias, res = case(2, 32, 4, 5, 5)
    args = {"x": x, "weight": ops.grouped_conv3x3_weight(weight), "bias": bias, "residual": res, "stride": 1}
    change(args)
    with pytest.raises(RuntimeError, match=message):
        ops.grouped_conv3x3(args["x"], args["weight"], args["bias"], args["residual"], True, args["stride"])


@pytest.mark.parametrize(
    "weight, message",
    [
        (torch.randn(32, 8, 1, 1), "weight must be \\(C, C / groups, 3, 3\\)"),
        (torch.randn(32, 2, 3, 3), "channels per group \\(weight.size\\(1\\)\\) must be 4, 8 or a multiple of 16, got 2"),
        (torch.randn(32, 24, 3, 3), "must be 4, 8 or a multiple of 16, got 24"),
        (torch.randn(24, 8, 3, 3), "output channels must be a multiple of 16"),
        (torch.randn(32, 8, 3, 3).double(), "grouped_conv3x3_weight: weight must be float32"),
    ],
)
def test_bad_weights_are_named(weight, message):
    with pytest.raises(RuntimeError, match=message):
        ops.grouped_conv3x3_weight(weight)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("residual", [True, False])
def test_opcheck(fmt, residual):
    """Schema, fake (meta) kernel, dispatch and autograd registration agree
    (torch.library.opcheck)."""
    x, weight, bias, res = case(2, 32, 8, 5, 6, stride=2, fmt=fmt)
    torch.library.opcheck(ops.grouped_conv3x3_weight, (weight,))
    packed = ops.grouped_conv3x3_weight(weight)
    torch.library.opcheck(ops.grouped_conv3x3, (x, packed, bias, res if residual else None, True, 2))


def grouped_convs(model):
    return {m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and any(p.grouped for p in onednn.cached(m))}


def test_resnext_runs_its_grouped_convolutions_on_it():
    torch.manual_seed(0)
    tv = randomize_norms(torchvision.models.resnext50_32x4d()).eval()
    fused = resnet_fused.fuse(copy.deepcopy(tv)).eval()
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(6))
    expected = {m for m in fused.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    with torch.no_grad():
        ref = tv.double()(x.double())
        out = fused(x)
        assert len(expected) == 16 and grouped_convs(fused) == (expected if onednn._vector_gemm() else set())
        assert_equivalent(out, ref, NET_TOL[torch.float32])
        assert torch.equal(fused(x), out)  # the warm (planned) forward: the same calls
    for conv in expected:  # one reorder for every input size
        with torch.no_grad():
            fused(x[:1, :, :40])
        packs = onednn.cached(conv)
        assert len(packs) == 2 and packs[0].weight is packs[1].weight


@pytest.mark.parametrize("value, used", [("0", False), ("off", False), ("1", True)])
def test_the_environment_variable_keeps_grouped_convolutions_on_onednn(value, used, tmp_path):
    fitted = fits_in_a_new_process("RESNET_FUSED_CPU_GROUPED", value, "torch.nn.Conv2d(128, 128, 3, padding=1, groups=32)", "_grouped_fits", tmp_path)
    assert fitted is (used and extension.cpu_gemm_isa() != "generic")


@pytest.mark.parametrize(
    "conv, dtype, fits",
    [
        (torch.nn.Conv2d(128, 128, 3, padding=1, groups=32, bias=False), torch.float32, True),
        (torch.nn.Conv2d(256, 256, 3, stride=2, padding=1, groups=32), torch.float32, True),
        (torch.nn.Conv2d(512, 512, 3, padding=1, groups=8), torch.float32, True),     # 64 per group
        (torch.nn.Conv2d(128, 128, 3, padding=1, groups=32), torch.bfloat16, False),
        (torch.nn.Conv2d(64, 64, 3, padding=1), torch.float32, False),                # one group: Winograd's
        (torch.nn.Conv2d(64, 64, 3, padding=1, groups=64), torch.float32, False),     # depthwise
        (torch.nn.Conv2d(96, 96, 3, padding=1, groups=4), torch.float32, False),      # 24 per group
        (torch.nn.Conv2d(128, 256, 3, padding=1, groups=32), torch.float32, False),   # more out than in
        (torch.nn.Conv2d(128, 128, 3, padding=2, dilation=2, groups=32), torch.float32, False),
        (torch.nn.Conv2d(128, 128, 3, stride=(1, 2), padding=1, groups=32), torch.float32, False),
        (torch.nn.Conv2d(128, 128, 3, stride=3, padding=1, groups=32), torch.float32, False),
        (torch.nn.Conv2d(128, 128, 3, padding=0, groups=32), torch.float32, False),
    ],
)
def test_only_float32_grouped_3x3_convolutions_it_tiles_use_it(conv, dtype, fits):
    assert onednn._grouped_fits(conv, dtype) is (fits and extension.cpu_gemm_isa() != "generic")
