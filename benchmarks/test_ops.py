"""Fused ops vs the eager composition they replace, side by side in one run.

    pytest benchmarks/test_ops.py --benchmark-only

Groups per op and layer shape; each group holds the eager composition and
every available backend on the same tensors (CPU fp32 here; CUDA when
present). `extra_info` carries GB/s of the minimum traffic each op must move.
"""
import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from run_info import default_device, device_backends

# (N, C, H, W): a ResNet-50 stage-1 and stage-3 activation at batch 8, 112px input
SHAPES = [(8, 256, 28, 28), (8, 1024, 7, 7)]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _sync(t):
    if t.is_cuda:
        torch.cuda.synchronize()


def _device():
    return default_device()


def _backends():
    return device_backends()


def _info(benchmark, shape, dtype, passes_bytes):
    benchmark.extra_info.update(shape=list(shape), dtype=str(dtype), min_bytes=passes_bytes, threads=torch.get_num_threads())


def _activation(g, shape, fmt, device):
    return torch.randn(*shape, generator=g).to(device).to(memory_format=FORMATS[fmt])


def _finish(benchmark, nbytes):
    benchmark.extra_info["GB_per_s_of_min_traffic"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["torch-eager-composition"] + [f"resnet_fused-{b}" for b in _backends()])
def test_batch_norm_act_train_forward_backward(benchmark, impl, shape, fmt):
    """Train step of BN(batch stats) + residual + ReLU: forward and backward."""
    device = _device()
    g = torch.Generator().manual_seed(0)
    x = _activation(g, shape, fmt, device).requires_grad_()
    r = _activation(g, shape, fmt, device).requires_grad_()
    c = shape[1]
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    grad = _activation(g, shape, fmt, device)

    if impl == "torch-eager-composition":

        def step():
            out = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
            out = torch.relu(out + r)
            out.backward(grad)
            _sync(out)

    else:
        backend = impl.split("-", 1)[1]

        def step():
            with resnet_fused.backend(backend):
                out = ops.batch_norm_act(x, w, b, rm, rv, True, 0.1, 1e-5, r, True)
            out.backward(grad)
            _sync(out)

    benchmark.group = f"batch_norm_act train fwd+bwd {'x'.join(map(str, shape))} {fmt}"
    # minimum traffic: fwd reads x, r, writes out; bwd reads grad, x, out, writes dx, dr
    nbytes = 8 * x.numel() * x.element_size()
    _info(benchmark, shape, x.dtype, nbytes)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    _finish(benchmark, nbytes)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["torch-eager-composition"] + [f"resnet_fused-{b}" for b in _backends()])
def test_inference_epilogue(benchmark, impl, shape, fmt):
    """BN(running stats) + residual + ReLU after a convolution's output."""
    device = _device()
    g = torch.Generator().manual_seed(0)
    y = _activation(g, shape, fmt, device)
    r = _activation(g, shape, fmt, device)
    c = shape[1]
    rm, rv = torch.randn(c, device=device) * 0.1, torch.rand(c, device=device) + 0.5
    w, b = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    scale = (w / torch.sqrt(rv + 1e-5)).float()
    shift = (b - rm * scale).float()

    if impl == "torch-eager-composition":

        def step():
            with torch.no_grad():
                out = F.batch_norm(y, rm, rv, w, b, False, 0.1, 1e-5)
                out += r
                out.relu_()
            _sync(out)

    elif impl == "resnet_fused-eager":

        def step():
            # what the eager backend's conv_bn_act does after its convolution
            with torch.no_grad():
                out = torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1)).add_(r).relu_()
            _sync(out)

    elif impl == "resnet_fused-triton":
        from resnet_fused.ops.triton import batch_norm
        from resnet_fused.ops.triton.fold import Affine

        def step():
            # the Triton epilogue behind cuDNN in the triton backend, in place
            batch_norm.affine_act_(y, Affine.given(scale, shift), r, True, batch_norm.KERNELS)
            _sync(y)

    else:
        from resnet_fused.ops import extension

        def step():
            # in place on the convolution's output, as conv_bn_act uses it
            # (repeated calls change y's values, not the work done)
            extension.scale_shift_add_relu_(y, scale, shift, r, True)
            _sync(y)

    benchmark.group = f"inference epilogue {'x'.join(map(str, shape))} {fmt}"
    nbytes = 3 * y.numel() * y.element_size()  # read y and r, write out
    _info(benchmark, shape, y.dtype, nbytes)
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    _finish(benchmark, nbytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch-max_pool2d", "resnet_fused-max_pool2d"])
def test_stem_max_pool(benchmark, impl, dtype):
    """The stem's 3×3/2 max-pool on a resnet50 batch-8 stem output (CPU,
    channels_last, inference): ATen's max_pool2d (which also computes
    indices) against the extension's kernel the fused models use."""
    from resnet_fused.ops import extension

    if impl.startswith("resnet_fused") and not extension.has_kernel("max_pool2d", "CPU"):
        pytest.skip(f"no CPU kernels: {extension.unavailable_reason('CPU')}")
    shape = (8, 64, 112, 112)
    g = torch.Generator().manual_seed(0)
    x = _activation(g, shape, "nhwc", "cpu").relu().to(dtype)
    pool = F.max_pool2d if impl == "torch-max_pool2d" else extension.max_pool2d

    def step():
        with torch.no_grad():
            return pool(x, 3, 2, 1)

    benchmark.group = f"stem max-pool {'x'.join(map(str, shape))} nhwc {dtype}"
    nbytes = (x.numel() + x.numel() // 4) * x.element_size()  # read x once, write the output
    _info(benchmark, shape, dtype, nbytes)
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    _finish(benchmark, nbytes)


# ResNet-50's 3x3 stride-1 convolutions at batch 8, 224px input: (N, C, H, W), K = C
CONV3X3_SHAPES = [(8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)]


@pytest.mark.parametrize("shape", CONV3X3_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["torch-conv2d+relu", "onednn-direct", "resnet_fused-winograd"])
def test_conv3x3_bias_relu(benchmark, impl, shape):
    """A folded conv+BN+ReLU on CPU (fp32, channels_last, inference), three
    ways: torch's conv2d then ReLU; the oneDNN convolution with bias and ReLU
    post-ops on pre-packed weights (the cpu backend with
    set_cpu_winograd(False), and what torch.compile's inductor calls); the
    extension's Winograd F(4x4, 3x3) kernel (the cpu backend's default)."""
    from resnet_fused.ops import extension
    from resnet_fused.ops.cpu import onednn

    if impl == "resnet_fused-winograd" and not extension.has_kernel("winograd_conv3x3", "CPU"):
        pytest.skip(f"no CPU kernels: {extension.unavailable_reason('CPU')}")
    if impl == "onednn-direct" and onednn.UNAVAILABLE is not None:
        pytest.skip(onednn.UNAVAILABLE)
    n, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = _activation(g, shape, "nhwc", "cpu")
    weight = torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5
    bias = torch.randn(c, generator=g)
    if impl == "torch-conv2d+relu":
        def step():
            with torch.no_grad():
                return F.conv2d(x, weight, bias, padding=1).relu_()
    elif impl == "onednn-direct":
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [1, 1], [1, 1], [1, 1], 1, list(shape))

        def step():
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
    else:
        transformed = torch.ops.resnet_fused.winograd_weight(weight)

        def step():
            return torch.ops.resnet_fused.winograd_conv3x3(x, transformed, bias, None, True)

    benchmark.group = f"conv3x3+bias+relu {'x'.join(map(str, shape))} nhwc float32"
    nbytes = 2 * x.numel() * x.element_size() + weight.numel() * weight.element_size()
    _info(benchmark, shape, torch.float32, nbytes)
    benchmark.extra_info["gflop"] = 2 * n * h * w * c * c * 9 / 1e9
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    _finish(benchmark, nbytes)


# ResNet-50's 1x1 convolutions at batch 8, 224px input: (N, C, H, W, K, stride, residual)
CONV1X1_SHAPES = [
    (8, 256, 56, 56, 64, 1, False), (8, 64, 56, 56, 256, 1, True), (8, 256, 56, 56, 512, 2, True),
    (8, 1024, 14, 14, 256, 1, False), (8, 512, 7, 7, 2048, 1, True),
]


@pytest.mark.parametrize("shape", CONV1X1_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-s{s[5]}" + ("-add" if s[6] else ""))
@pytest.mark.parametrize("impl", ["torch-conv2d+relu", "onednn", "resnet_fused-gemm"])
def test_conv1x1_bias_add_relu(benchmark, impl, shape):
    """A folded 1x1 conv+BN(+residual)+ReLU on CPU (fp32, channels_last,
    inference), three ways: torch's conv2d, add and ReLU; the oneDNN
    convolution with bias, sum and ReLU post-ops on pre-packed weights (what
    torch.compile's inductor calls, and the cpu backend with
    RESNET_FUSED_CPU_GEMM=0), the residual summed in place; the extension's
    GEMM (csrc/cpu/gemm.h, the cpu backend's default), the residual summed
    in place."""
    from resnet_fused.ops import extension
    from resnet_fused.ops.cpu import onednn

    if impl == "resnet_fused-gemm" and not extension.has_kernel("conv1x1", "CPU"):
        pytest.skip(f"no CPU kernels: {extension.unavailable_reason('CPU')}")
    if impl == "onednn" and onednn.UNAVAILABLE is not None:
        pytest.skip(onednn.UNAVAILABLE)
    n, c, h, w, k, stride, add = shape
    g = torch.Generator().manual_seed(0)
    x = _activation(g, (n, c, h, w), "nhwc", "cpu")
    weight = torch.randn(k, c, 1, 1, generator=g) / c ** 0.5
    bias = torch.randn(k, generator=g)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    residual = _activation(g, (n, k, p, q), "nhwc", "cpu") if add else None
    if impl == "torch-conv2d+relu":
        def step():
            with torch.no_grad():
                y = F.conv2d(x, weight, bias, stride=stride)
                return (y.add_(residual) if add else y).relu_()
    elif impl == "onednn":
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [0, 0], [stride] * 2, [1, 1], 1, list(x.shape))

        def step():
            if add:
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    residual, x, packed, bias, [0, 0], [stride] * 2, [1, 1], 1, "add", 1.0, "relu", [], "")
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [0, 0], [stride] * 2, [1, 1], 1, "relu", [], "")
    else:
        packed = torch.ops.resnet_fused.conv1x1_weight(weight)

        def step():
            if add:
                return torch.ops.resnet_fused.conv1x1_add_(residual, x, packed, bias, True, stride)
            return torch.ops.resnet_fused.conv1x1(x, packed, bias, None, True, stride)

    benchmark.group = f"conv1x1+bias{'+add' if add else ''}+relu {'x'.join(map(str, shape[:5]))} s{stride} nhwc float32"
    out_numel = n * k * p * q
    nbytes = (x.numel() // (stride * stride) + (2 if add else 1) * out_numel + weight.numel()) * 4
    _info(benchmark, shape[:4], torch.float32, nbytes)
    benchmark.extra_info["gflop"] = 2 * out_numel * c / 1e9
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    _finish(benchmark, nbytes)


# ResNeXt-50 32x4d's grouped 3x3 convolutions (N, C, H, W, stride; 32 groups)
# at batch 1 and 8: 4, 8, 16 and 32 channels per group, both strides
GROUPED_SHAPES = [
    (n, c, h, h, s) for n in (1, 8)
    for c, h, s in [(128, 56, 1), (256, 28, 1), (512, 14, 1), (1024, 7, 1), (256, 56, 2), (512, 28, 2), (1024, 14, 2)]
]


@pytest.mark.parametrize("shape", GROUPED_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-s{s[4]}")
@pytest.mark.parametrize("impl", ["torch-conv2d+relu", "onednn", "resnet_fused-grouped"])
def test_grouped_conv3x3_bias_relu(benchmark, impl, shape):
    """A folded grouped 3x3 conv+BN+ReLU on CPU (fp32, channels_last,
    inference, 32 groups), three ways: torch's conv2d and ReLU; the oneDNN
    convolution with bias and ReLU post-ops on pre-packed weights (what
    torch.compile's inductor calls, and the cpu backend with
    RESNET_FUSED_CPU_GROUPED=0); the extension's grouped kernel
    (csrc/cpu/grouped.h, the cpu backend's default)."""
    from resnet_fused.ops import extension
    from resnet_fused.ops.cpu import onednn

    if impl == "resnet_fused-grouped" and not extension.has_kernel("grouped_conv3x3", "CPU"):
        pytest.skip(f"no CPU kernels: {extension.unavailable_reason('CPU')}")
    if impl == "onednn" and onednn.UNAVAILABLE is not None:
        pytest.skip(onednn.UNAVAILABLE)
    n, c, h, w, stride = shape
    groups = 32
    g = torch.Generator().manual_seed(0)
    x = _activation(g, (n, c, h, w), "nhwc", "cpu")
    weight = torch.randn(c, c // groups, 3, 3, generator=g) / (9 * c // groups) ** 0.5
    bias = torch.randn(c, generator=g)
    if impl == "torch-conv2d+relu":
        def step():
            with torch.no_grad():
                return F.conv2d(x, weight, bias, stride=stride, padding=1, groups=groups).relu_()
    elif impl == "onednn":
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [1, 1], [stride] * 2, [1, 1], groups, list(x.shape))

        def step():
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [1, 1], [stride] * 2, [1, 1], groups, "relu",
                                                            [], "")
    else:
        packed = torch.ops.resnet_fused.grouped_conv3x3_weight(weight)

        def step():
            return torch.ops.resnet_fused.grouped_conv3x3(x, packed, bias, None, True, stride)

    benchmark.group = f"grouped conv3x3+bias+relu {'x'.join(map(str, shape[:4]))} s{stride} g{groups} nhwc float32"
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    nbytes = (x.numel() + n * c * p * q + weight.numel()) * 4
    _info(benchmark, shape[:4], torch.float32, nbytes)
    benchmark.extra_info["gflop"] = 2 * n * c * p * q * (c // groups) * 9 / 1e9
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    _finish(benchmark, nbytes)


# The k x k convolutions neither Winograd nor the grouped kernel takes: the
# stem and ResNet-18's / ResNet-50's 3x3 stride-2 ones, at batch 1 and 8
# (N, C, H, W, K, kernel, stride)
CONV_KXK_SHAPES = [
    (n, c, h, h, k, r, s) for n in (1, 8)
    for c, h, k, r, s in [(3, 224, 64, 7, 2), (64, 56, 128, 3, 2), (128, 56, 128, 3, 2), (256, 14, 512, 3, 2)]
]


@pytest.mark.parametrize("shape", CONV_KXK_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-k{s[5]}s{s[6]}")
@pytest.mark.parametrize("impl", ["torch-conv2d+relu", "onednn", "resnet_fused-conv_gemm"])
def test_conv_kxk_bias_relu(benchmark, impl, shape):
    """A folded k x k conv+BN+ReLU on CPU (fp32, channels_last, inference),
    three ways: torch's conv2d and ReLU; the oneDNN convolution with bias and
    ReLU post-ops on pre-packed weights (what torch.compile's inductor calls,
    and the cpu backend's default for all but the stem); the extension's
    implicit GEMM (csrc/cpu/conv_gemm.cpp, the cpu backend's default for the
    stem where the GEMM kernel is AVX2)."""
    from resnet_fused.ops import extension
    from resnet_fused.ops.cpu import onednn

    if impl == "resnet_fused-conv_gemm" and not extension.has_kernel("conv_gemm", "CPU"):
        pytest.skip(f"no CPU kernels: {extension.unavailable_reason('CPU')}")
    if impl == "onednn" and onednn.UNAVAILABLE is not None:
        pytest.skip(onednn.UNAVAILABLE)
    n, c, h, w, k, r, stride = shape
    pad = r // 2
    g = torch.Generator().manual_seed(0)
    x = _activation(g, (n, c, h, w), "nhwc", "cpu")
    weight = torch.randn(k, c, r, r, generator=g) / (r * r * c) ** 0.5
    bias = torch.randn(k, generator=g)
    if impl == "torch-conv2d+relu":
        def step():
            with torch.no_grad():
                return F.conv2d(x, weight, bias, stride=stride, padding=pad).relu_()
    elif impl == "onednn":
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [pad] * 2, [stride] * 2, [1, 1], 1, list(x.shape))

        def step():
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [pad] * 2, [stride] * 2, [1, 1], 1, "relu",
                                                            [], "")
    else:
        packed = torch.ops.resnet_fused.conv_gemm_weight(weight)

        def step():
            return torch.ops.resnet_fused.conv_gemm(x, packed, bias, None, True, [r, r], stride, pad)

    benchmark.group = f"conv{r}x{r}+bias+relu {'x'.join(map(str, shape[:5]))} s{stride} nhwc float32"
    p = (h + 2 * pad - r) // stride + 1
    nbytes = (x.numel() + n * k * p * p + weight.numel()) * 4
    _info(benchmark, shape[:4], torch.float32, nbytes)
    benchmark.extra_info["gflop"] = 2 * n * k * p * p * c * r * r / 1e9
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    _finish(benchmark, nbytes)
