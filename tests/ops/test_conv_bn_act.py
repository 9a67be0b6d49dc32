"""ops.conv_bn_act against an independent float64 computation, per backend."""
import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from conftest import (
    OP_TOL, PAIRS, assert_equivalent, device_backend_params, device_params, pair_marks, runnable_pairs,
)

# (N, C, H, W, K, R, stride, padding, dilation, groups): every conv shape the
# ten models use, plus odd sizes.
SHAPES = [
    (2, 3, 33, 29, 64, 7, 2, 3, 1, 1),  # stem, C=3
    (2, 64, 14, 14, 64, 3, 1, 1, 1, 1),  # basic block 3x3
    (2, 64, 15, 13, 128, 3, 2, 1, 1, 1),  # strided 3x3, odd spatial
    (2, 256, 7, 7, 64, 1, 1, 0, 1, 1),  # bottleneck 1x1 reduce
    (2, 64, 9, 9, 256, 1, 2, 0, 1, 1),  # strided 1x1 downsample
    (2, 128, 9, 9, 128, 3, 1, 1, 1, 32),  # ResNeXt groups=32
    (1, 256, 8, 8, 256, 3, 1, 2, 2, 64),  # groups=64, dilation 2
    (1, 64, 10, 10, 64, 3, 1, 4, 4, 1),  # dilation 4 (segmentation)
    (3, 13, 1, 1, 7, 1, 1, 0, 1, 1),  # 1x1 spatial, odd channels
    (1, 5, 3, 2, 11, 3, 1, 1, 1, 1),  # tiny, odd everything
    (1, 64, 6, 5, 48, 3, 2, 1, 1, 2),  # groups with 32 channels each, stride 2
]
# Triton's interpreter runs every program in Python (~3 ms per reduction
# step): the grouped shapes shrink to the same structure at fewer pixels.
INTERPRETER_SHAPES = {
    (2, 128, 9, 9, 128, 3, 1, 1, 1, 32): (1, 64, 6, 5, 64, 3, 1, 1, 1, 32),
    (1, 256, 8, 8, 256, 3, 1, 2, 2, 64): (1, 128, 5, 6, 128, 3, 1, 2, 2, 64),
}
EPILOGUES = ["relu", "residual_relu", "residual", "none"]


def reference64(x, w, scale, shift, residual, relu, stride, padding, dilation, groups):
    y = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def make_inputs(shape, dtype, memory_format, with_residual, seed=0, device="cpu"):
    """Drawn on the CPU (the same values on every device), then moved."""
    n, c, h, w_, k, r, stride, padding, dilation, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w_, generator=g).to(device, dtype).to(memory_format=memory_format)
    weight = (torch.randn(k, c // groups, r, r, generator=g) * (2.0 / (c // groups * r * r)) ** 0.5).to(device, dtype)
    weight = weight.to(memory_format=memory_format)
    scale = (torch.rand(k, generator=g) + 0.5).to(device)
    shift = (torch.randn(k, generator=g) * 0.3).to(device)
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w_ + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    residual = None
    if with_residual:
        residual = torch.randn(n, k, p, q, generator=g).to(device, dtype).to(memory_format=memory_format)
    return x, weight, scale, shift, residual, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


# The kernel backends hand float64 to the reference; fp16 is a tensor-core
# dtype (on CPU only the triton backend, a GPU backend interpreted, takes it).
DTYPES = {
    ("cpu", "eager"): [torch.float32, torch.bfloat16, torch.float64],
    ("cpu", "cpu"): [torch.float32, torch.bfloat16, torch.float64],
    ("cpu", "triton"): [torch.float32, torch.bfloat16, torch.float16],
    ("cuda", "eager"): [torch.float32, torch.bfloat16, torch.float16, torch.float64],
    ("cuda", "cuda"): [torch.float32, torch.bfloat16, torch.float16, torch.float64],
    ("cuda", "triton"): [torch.float32, torch.bfloat16, torch.float16],
}


def _cases():
    for device, backend in PAIRS:
        for shape in SHAPES:
            epilogues = EPILOGUES
            if (device, backend) == ("cpu", "triton") and shape in INTERPRETER_SHAPES:
                shape, epilogues = INTERPRETER_SHAPES[shape], ["residual_relu", "none"]
            for epilogue in epilogues:
                for fmt, fmt_id in ((torch.contiguous_format, "nchw"), (torch.channels_last, "nhwc")):
                    for dtype in DTYPES[device, backend]:
                        ids = "-".join(["x".join(map(str, shape)), epilogue, fmt_id, str(dtype)[6:], device, backend])
                        yield pytest.param(
                            shape, epilogue, fmt, dtype, device, backend, id=ids, marks=pair_marks(device, backend)
                        )


@pytest.mark.parametrize("shape, epilogue, memory_format, dtype, device, backend", list(_cases()))
def test_matches_float64(shape, epilogue, memory_format, dtype, device, backend):
    with_residual = epilogue.startswith("residual")
    relu = epilogue.endswith("relu")
    x, w, scale, shift, res, conv = make_inputs(shape, dtype, memory_format, with_residual, device=device)
    with resnet_fused.backend(backend):
        out = ops.conv_bn_act(x, w, scale, shift, res, relu, **conv)
    ref = reference64(x, w, scale, shift, res, relu, **conv)
    assert out.dtype == dtype and out.device == x.device
    assert out.is_contiguous(memory_format=memory_format)
    if relu:
        assert (out >= 0).all()
    assert_equivalent(out, ref, OP_TOL[dtype])


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_nan_propagates(device, backend):
    x, w, scale, shift, _, conv = make_inputs(SHAPES[1], torch.float32, torch.contiguous_format, False, device=device)
    x[0, 0, 3, 3] = float("nan")
    with resnet_fused.backend(backend):
        out = ops.conv_bn_act(x, w, scale, shift, None, True, **conv)
    assert torch.isnan(out).any()


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_gradients_match_float64(device, backend):
    """Eval-mode fine-tuning differentiates through conv_bn_act."""
    shape = (2, 6, 7, 7, 8, 3, 1, 1, 1, 2)
    x, w, scale, shift, res, conv = make_inputs(shape, torch.float64, torch.contiguous_format, True, device=device)
    inputs = [t.clone().requires_grad_() for t in (x, w, scale.double(), shift.double(), res)]
    with resnet_fused.backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: ops.conv_bn_act(*a, relu=True, **conv), inputs, eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fp32_gradients_with_each_backend(memory_format, device):
    """With autograd recording, every backend's result is differentiable and
    matches the eager backend's gradients."""
    x, w, scale, shift, res, conv = make_inputs(SHAPES[2], torch.float32, memory_format, True, device=device)
    grads = []
    backends = [b for _, b in runnable_pairs(devices=(device,))]
    assert backends[0] == "eager" and len(backends) >= 2  # eager and the kernel backends this device runs
    for backend in backends:
        leaves = [t.clone().requires_grad_() for t in (x, w, scale, shift, res)]
        with resnet_fused.backend(backend):
            ops.conv_bn_act(*leaves, relu=True, **conv).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for backend, other in zip(backends[1:], grads[1:]):
        for a, b in zip(grads[0], other):
            assert_equivalent(b, a, OP_TOL[torch.float32], f"{backend} gradient")


def test_result_independent_of_thread_count():
    x, w, scale, shift, res, conv = make_inputs(SHAPES[2], torch.float32, torch.channels_last, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.conv_bn_act(x, w, scale, shift, res, True, **conv)
        torch.set_num_threads(max(2, threads))
        many = ops.conv_bn_act(x, w, scale, shift, res, True, **conv)
    finally:
        torch.set_num_threads(threads)
    assert_equivalent(many, one, OP_TOL[torch.float32])
