"""The CPU GEMM (csrc/cpu/gemm.h) and the 1x1 convolutions it runs
(torch.ops.resnet_fused.conv1x1 / conv1x1_add_, csrc/cpu/conv1x1.cpp), and how
the cpu backend's inference path uses them (resnet_fused.ops.cpu.onednn)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from resnet_fused.ops import extension
from resnet_fused.ops.cpu import onednn
from conftest import assert_nonfinite_like, fits_in_a_new_process, on_every_cpu_kernel, NET_TOL, OP_TOL, assert_equivalent, gemm_unpack, randomize_norms

pytestmark = pytest.mark.skipif(not extension.is_loaded(), reason="resnet_fused._C is not built")

ops = torch.ops.resnet_fused


def case(n, c, k, h, w, stride=1, seed=0, residual=True, fmt=torch.channels_last):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(memory_format=fmt)
    weight = torch.randn(k, c, 1, 1, generator=g) / math.sqrt(c)
    bias = torch.randn(k, generator=g)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = torch.randn(n, k, p, q, generator=g).to(memory_format=fmt) if residual else None
    return x, weight, bias, res


def reference(x, weight, bias, res, relu, stride=1):
    """The same epilogue order, in float64: act(conv + bias + residual)."""
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride=stride)
    if res is not None:
        y = y + res.double()
    return y.relu() if relu else y


def isas():
    """The GEMM kernels this CPU can run, the one in use first."""
    current = extension.cpu_gemm_isa()
    found = [current]
    for isa in ("avx512", "avx2", "generic"):
        if isa != current:
            try:
                extension.cpu_gemm_isa(isa)
                found.append(isa)
            except ValueError:
                pass
    extension.cpu_gemm_isa(current)
    return found


SHAPES = [
    # (n, c, k, h, w, stride)
    (1, 16, 16, 1, 1, 1),        # one pixel, one tile of 16 columns
    (2, 64, 256, 9, 7, 1),       # 126 rows: whole tiles of 6; four panels of 64
    (3, 40, 80, 5, 3, 1),        # 45 rows: a last tile of 3; a panel of 64 and one of 16
    (1, 256, 48, 13, 13, 2),     # stride 2 on odd maps: the rows read every other pixel
    (2, 64, 144, 8, 10, 3),      # stride 3
    (1, 1100, 32, 5, 6, 1),      # K > 1024: three blocks of k whose partial sums go through the output
    (2, 2048, 64, 3, 3, 1),      # ResNet-50's last reduce: four blocks of k
    (1, 512, 512, 3, 3, 1),      # 9 rows, four blocks of B: each block fetches the next one's (gemm.h Ahead)
]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_a_float64_convolution(shape, residual, relu):
    n, c, k, h, w, stride = shape
    x, weight, bias, res = case(n, c, k, h, w, stride, residual=residual)
    out = ops.conv1x1(x, ops.conv1x1_weight(weight), bias, res, relu, stride)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    assert_equivalent(out, reference(x, weight, bias, res, relu, stride), OP_TOL[torch.float32])
    if residual:  # in place: the same bits, written into the residual
        into = res.clone()
        assert ops.conv1x1_add_(into, x, ops.conv1x1_weight(weight), bias, relu, stride) is None
        assert torch.equal(into, out)


def test_no_bias_and_the_input_memory_format():
    x, weight, _, res = case(2, 32, 48, 6, 5, fmt=torch.contiguous_format)
    out = ops.conv1x1(x, ops.conv1x1_weight(weight), None, res, True)
    assert out.is_contiguous()
    assert_equivalent(out, reference(x, weight, None, res, True), OP_TOL[torch.float32])
    res_cl = res.to(memory_format=torch.channels_last)
    assert torch.equal(ops.conv1x1(x, ops.conv1x1_weight(weight), None, res_cl, True), out)


def test_weight_packing_is_the_documented_panel_layout():
    w = torch.randn(80, 24, 1, 1)
    packed = ops.conv1x1_weight(w)
    assert packed.shape == (80 * 24,)
    assert torch.equal(gemm_unpack(packed, 24, 80), w[:, :, 0, 0].t())


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[6], SHAPES[7]])
def test_every_kernel_and_thread_count_gives_the_same_bits(shape):
    """Each output is one fused multiply-add chain over the input channels
    in order, whatever the ISA's tile, the blocking or the thread split."""
    n, c, k, h, w, stride = shape
    x, weight, bias, res = case(n, c, k, h, w, stride, seed=3)
    packed = ops.conv1x1_weight(weight)
    outs = on_every_cpu_kernel(lambda: ops.conv1x1(x, packed, bias, res, True, stride), isas(), (1, 2, 3))
    first = outs[extension.cpu_gemm_isa(), 1]
    assert all(torch.equal(first, o) for o in outs.values()), sorted(outs)
    # and an fma chain it is: the generic kernel is std::fma, one rounding a step
    assert_equivalent(first, reference(x, weight, bias, res, True, stride), OP_TOL[torch.float32])


def block_lines(K, N, n0, n1, k0, k1):
    """The 64-byte lines of the packed rows k0..k1 of the panels that columns
    n0..n1 fall in (B at a 64-byte aligned address), panel by panel: what a
    block reading that block of B touches, in the order of its first row tile."""
    lines = []
    for panel in range(n0, n1, 64):
        w = min(64, N - panel)
        first, last = panel * K + k0 * w, panel * K + k1 * w  # floats
        lines += range(first // 16, (last + 15) // 16)
    return lines


def fetched_lines(spans):
    assert all(first % 16 == 0 for first, _ in spans)  # whole lines
    return [first // 16 + i for first, lines in spans for i in range(lines)]


@pytest.mark.parametrize("M, N, K, count", [
    (9, 512, 512, 0),     # 1x1 at batch 1: four blocks of B, the thread's next task's block fetched
    (16, 80, 2500, 0),    # five blocks of k, a panel of 64 and one of 16 columns
    (200, 4096, 32, 0),   # blocks of 32 panels: the fetch cut at 16 spans
    (16, 256, 256, 36),   # Winograd products at 14x14, batch 1: each the next product's 256 KB
    (4, 512, 512, 36),    # 512 channels: 1 MB of B per product, the fetch cut at 256 KB
    (500, 64, 64, 2),     # two products cut into row tasks: the same B again is not fetched
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_each_block_fetches_the_next_blocks_b(M, N, K, count, threads):
    """Every GEMM block a thread runs fetches, while it runs, the lines of B
    that the thread's next block reads (gemm.h Ahead): that block's packed
    rows panel by panel, up to 256 KB and 16 spans, nothing outside the
    products' B; nothing where the next block reads the same block of B, and
    nothing after the last. Checked on every split of the tasks a thread
    may get (at::parallel_for's are contiguous ranges)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # the plan depends on it
    try:
        every = extension._C.cpu_gemm_schedule(M, N, K, count, 0, -1)
        tasks = len({(b[0], b[1], b[3]) for b in every})
        ranges = {(0, tasks), (0, 1), (1, tasks), (0, tasks // 2), (tasks // 2, tasks), (tasks - 1, tasks)}
        schedules = [extension._C.cpu_gemm_schedule(M, N, K, count, lo, hi) for lo, hi in ranges if lo < hi]
    finally:
        torch.set_num_threads(saved)
    assert tasks > 1
    fetching = 0
    for blocks in schedules:
        for block, after in zip(blocks, blocks[1:] + [None]):
            spans = block[7]
            if after is None:
                assert spans == []
                continue
            product, _, _, n0, n1, k0, k1, _ = after
            if (product, n0, k0) == (block[0], block[3], block[5]):
                assert spans == []  # the same block of B: still in L2
                continue
            want = [product * K * N // 16 + line for line in block_lines(K, N, n0, n1, k0, k1)]
            got = fetched_lines(spans)
            assert got == want[:len(got)]
            assert len(spans) <= 16 and len(got) <= (256 << 10) // 64
            if len(got) < len(want):  # cut: at 256 KB or at 16 spans
                assert len(got) == (256 << 10) // 64 or len(spans) == 16
            fetching += 1
    assert fetching > 0


def test_the_schedule_covers_every_task_and_k_block_once():
    """The blocks of all tasks of a product, in order: each task's rows and
    columns over k blocks 0..K in order (the partial sums' order)."""
    blocks = extension._C.cpu_gemm_schedule(50, 192, 1100, 0, 0, -1)
    cover = {}
    for product, m0, m1, n0, n1, k0, k1, _ in blocks:
        cover.setdefault((m0, m1, n0, n1), []).append((k0, k1))
    assert sum((m1 - m0) * (n1 - n0) for m0, m1, n0, n1 in cover) == 50 * 192
    for ks in cover.values():
        assert ks[0][0] == 0 and ks[-1][1] == 1100 and all(a[1] == b[0] for a, b in zip(ks, ks[1:]))


def test_the_schedule_hook_names_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 16"):
        extension._C.cpu_gemm_schedule(4, 24, 64, 0, 0, -1)
    with pytest.raises(ValueError, match="count <= 64"):
        extension._C.cpu_gemm_schedule(4, 64, 64, 65, 0, -1)


def test_winograd_products_are_the_same_bits_on_every_kernel():
    x = torch.randn(2, 32, 9, 11).to(memory_format=torch.channels_last)
    v = ops.winograd_weight(torch.randn(48, 32, 3, 3) / 17)
    bias = torch.randn(48)
    outs = list(on_every_cpu_kernel(lambda: ops.winograd_conv3x3(x, v, bias, None, True), isas()).values())
    assert len(outs) == len(isas()) and all(torch.equal(outs[0], o) for o in outs)


def test_cpu_gemm_isa_names_what_it_takes():
    assert extension.cpu_gemm_isa() in ("avx512", "avx2", "generic")
    with pytest.raises(ValueError, match="isa must be one of 'avx512', 'avx2', 'generic' or ''"):
        extension.cpu_gemm_isa("sse")
    assert extension.cpu_gemm_isa("") == isas()[0]


@pytest.mark.parametrize("relu", [True, False])
def test_nan_and_infinity_land_where_a_direct_convolution_puts_them(relu):
    """Every product is formed and the ReLU keeps NaN: NaN, +inf and -inf
    outputs are exactly those of a float64 convolution, on every kernel."""
    x, weight, bias, res = case(2, 32, 48, 6, 7, seed=5)
    x[0, 3, 2, 4] = float("nan")
    x[1, :, 1, 1] = float("inf")   # inf times weights of both signs: NaN
    x[1, 5, 4, 2] = float("-inf")  # one infinity: ±inf by each weight's sign
    res[0, 7, 5, 5] = float("inf")
    weight[11, 5, 0, 0] = 0.0      # -inf · 0 = NaN for output channel 11 at pixel (1, 4, 2)
    ref = reference(x, weight, bias, res, relu)
    packed = ops.conv1x1_weight(weight)
    for (isa, _), out in on_every_cpu_kernel(lambda: ops.conv1x1(x, packed, bias, res, relu), isas()).items():
        assert_nonfinite_like(out, ref, OP_TOL[torch.float32], isa)
    assert ref[1, 11, 4, 2].isnan() and ref.isnan().any() and (ref == float("inf")).any()


def test_relu_keeps_negative_zero_and_nan_like_torch_relu():
    x = torch.zeros(1, 16, 1, 2).to(memory_format=torch.channels_last)
    weight = torch.zeros(16, 16, 1, 1)
    bias = torch.full((16,), -0.0)
    bias[3] = float("nan")
    out = ops.conv1x1(x, ops.conv1x1_weight(weight), bias, None, True)
    ref = torch.relu(F.conv2d(x, weight, bias))
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 2
    assert torch.equal(torch.signbit(out[~out.isnan()]), torch.signbit(ref[~ref.isnan()]))


def test_empty_batches_and_maps():
    x, weight, bias, _ = case(0, 32, 48, 5, 5)
    out = ops.conv1x1(x, ops.conv1x1_weight(weight), bias, None, True, 2)
    assert out.shape == (0, 48, 3, 3)
    res = torch.empty(0, 48, 3, 3).to(memory_format=torch.channels_last)
    ops.conv1x1_add_(res, x, ops.conv1x1_weight(weight), bias, True, 2)
    x = torch.randn(2, 32, 0, 4).to(memory_format=torch.channels_last)
    assert ops.conv1x1(x, ops.conv1x1_weight(weight), bias, None, True).shape == (2, 48, 0, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"].double()), "conv1x1: x must be float32"),
        (lambda a: a.update(weight=a["weight"].double()), "conv1x1: weight must be float32"),
        (lambda a: a.update(bias=a["bias"].half()), "conv1x1: bias must be float32"),
        (lambda a: a.update(x=a["x"][0]), "conv1x1: x must be 4-D"),
        (lambda a: a.update(weight=a["weight"].view(16, 16)), "weight must be a contiguous 1-D tensor"),
        (lambda a: a.update(weight=a["weight"][:128]), "does not hold a multiple of 16 output channels"),
        (lambda a: a.update(x=torch.randn(2, 24, 5, 5)), "does not hold a multiple of 16 output channels"),
        (lambda a: a.update(bias=a["bias"][:5]), "bias must be a contiguous \\(16,\\)"),
        (lambda a: a.update(residual=a["residual"][:, :, 1:]), "residual must be \\[2, 16, 5, 5\\]"),
        (lambda a: a.update(residual=a["residual"].double()), "residual must be float32"),
        (lambda a: a.update(stride=0), "stride must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_named(change, message):
    x, weight, bias, res = case(2, 16, 16, 5, 5)
    args = {"x": x, "weight": ops.conv1x1_weight(weight), "bias": bias, "residual": res, "stride": 1}
    change(args)
    with pytest.raises(RuntimeError, match=message):
        ops.conv1x1(args["x"], args["weight"], args["bias"], args["residual"], True, args["stride"])


def test_bad_arguments_of_the_packing_and_the_in_place_op_are_named():
    with pytest.raises(RuntimeError, match="conv1x1_weight: weight must be \\(K, C, 1, 1\\)"):
        ops.conv1x1_weight(torch.randn(16, 4, 3, 3))
    with pytest.raises(RuntimeError, match="conv1x1_weight: output channels must be a multiple of 16, got K=24"):
        ops.conv1x1_weight(torch.randn(24, 4, 1, 1))
    with pytest.raises(RuntimeError, match="conv1x1_weight: weight must be float32"):
        ops.conv1x1_weight(torch.randn(16, 4, 1, 1, dtype=torch.float64))
    x, weight, bias, res = case(2, 16, 16, 5, 5)
    packed = ops.conv1x1_weight(weight)
    with pytest.raises(RuntimeError, match="conv1x1_add_: residual must be channels_last"):
        ops.conv1x1_add_(res.contiguous(), x, packed, bias, True)
    with pytest.raises(RuntimeError, match="conv1x1_add_: residual must be \\[2, 16, 3, 3\\]"):
        ops.conv1x1_add_(res, x, packed, bias, True, 2)
    with pytest.raises(RuntimeError, match="conv1x1_add_: residual must not share memory with x"):
        ops.conv1x1_add_(x, x, packed, bias, True)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_opcheck(fmt, residual):
    """Schema, fake kernels (shapes, dtype and memory format under tracing)
    and dispatch agree (torch.library.opcheck), the in-place op's too."""
    x, weight, bias, res = case(2, 16, 32, 7, 9, stride=2, seed=11, residual=True, fmt=fmt)
    packed = ops.conv1x1_weight(weight)
    torch.library.opcheck(ops.conv1x1_weight, (weight,))
    torch.library.opcheck(ops.conv1x1, (x, packed, bias, res if residual else None, True, 2))
    torch.library.opcheck(ops.conv1x1_add_, (res.to(memory_format=torch.channels_last), x, packed, bias, True, 2))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fw = ops.conv1x1_weight(mode.from_tensor(weight))
        out = ops.conv1x1(fx, fw, mode.from_tensor(bias), None, False, 2)
    assert fw.shape == (16 * 32,) and out.shape == (2, 32, 4, 5)
    assert out.is_contiguous(memory_format=fmt)


def gemm_convs(model):
    """The 1x1 convolutions on the GEMM (the stem's implicit GEMM: test_conv_gemm.py)."""
    return {c for c in model.modules() if any(p.gemm and p.kernel_size == (1, 1) for p in onednn.cached(c))}


@pytest.mark.skipif(onednn.UNAVAILABLE is not None, reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE}")
@pytest.mark.skipif(extension.is_loaded() and extension.cpu_gemm_isa() == "generic",
                    reason="this CPU has neither AVX2 with FMA nor AVX-512")
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_models_run_their_1x1_convolutions_on_it(arch):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(torchvision.models, arch)()).eval()
    fused = resnet_fused.fuse(tv).eval()
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(6))
    expected = {m for m in fused.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)}
    with torch.no_grad():
        ref = tv(x)
        out = fused(x)
        assert expected and gemm_convs(fused) == expected
        assert_equivalent(out, ref, NET_TOL[torch.float32])
        assert torch.equal(fused(x), out)  # the warm (planned) forward: the same calls
        small = fused(x[:1, :, :40])
        assert_equivalent(small, tv(x[:1, :, :40]), NET_TOL[torch.float32])
    for conv in expected:  # one packing for both sizes
        packs = onednn.cached(conv)
        assert len(packs) == 2 and packs[0].weight is packs[1].weight


@pytest.mark.parametrize("value, used", [("0", False), ("off", False), ("1", True)])
def test_the_environment_variable_keeps_1x1_convolutions_on_onednn(value, used, tmp_path):
    fitted = fits_in_a_new_process("RESNET_FUSED_CPU_GEMM", value, "torch.nn.Conv2d(32, 64, 1)", "_gemm_fits", tmp_path)
    assert fitted is (used and extension.cpu_gemm_isa() != "generic")


@pytest.mark.parametrize(
    "conv, dtype, fits",
    [
        (torch.nn.Conv2d(64, 256, 1, bias=False), torch.float32, True),
        (torch.nn.Conv2d(256, 512, 1, stride=2, bias=False), torch.float32, True),
        (torch.nn.Conv2d(64, 48, 1), torch.float32, True),
        (torch.nn.Conv2d(64, 64, 1), torch.bfloat16, False),
        (torch.nn.Conv2d(64, 24, 1), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 1, padding=1), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 1, groups=2), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 1, stride=(1, 2)), torch.float32, False),
        (torch.nn.Conv2d(64, 64, 3, padding=1), torch.float32, False),
    ],
)
def test_only_float32_1x1_convolutions_with_16_output_channel_multiples_use_it(conv, dtype, fits):
    assert onednn._gemm_fits(conv, dtype) is (fits and extension.cpu_gemm_isa() != "generic")
