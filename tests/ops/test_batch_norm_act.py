"""ops.batch_norm_act against float64 references: outputs, running statistics, gradients."""
import pytest
import torch

import resnet_fused
from resnet_fused import ops
from conftest import OP_TOL, PAIRS, assert_equivalent, device_backend_params, pair_marks


def reference64(x, weight, bias, mean, var, training, momentum, eps, residual, relu, relu_mask=None):
    """Batch norm written from its definition in float64 (not F.batch_norm).

    relu_mask, if given, replaces the ReLU by multiplication with that mask
    (the tested forward's own decisions: in bf16, rounding can flip a value
    within an ulp of zero, which is a forward difference, not a gradient one)."""
    xd = x.double()
    if training:
        dims = (0, 2, 3)
        bmean = xd.mean(dims)
        bvar = xd.var(dims, unbiased=False)
        n = x.numel() // x.shape[1]
        new_stats = None
        if mean is not None:
            new_stats = (
                (1 - momentum) * mean.double() + momentum * bmean,
                (1 - momentum) * var.double() + momentum * bvar * n / max(n - 1, 1),
            )
    else:
        bmean, bvar, new_stats = mean.double(), var.double(), None
    y = (xd - bmean.view(1, -1, 1, 1)) / torch.sqrt(bvar.view(1, -1, 1, 1) + eps)
    if weight is not None:
        y = y * weight.double().view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    if relu_mask is not None:
        return y * relu_mask, new_stats
    return (torch.relu(y) if relu else y), new_stats


def make(n, c, h, w, dtype, memory_format, seed=0, device="cpu"):
    """Drawn on the CPU (the same values on every device), then moved."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.7).to(device, dtype).to(memory_format=memory_format)
    weight = (torch.rand(c, generator=g) + 0.5).to(device)
    bias = (torch.randn(c, generator=g) * 0.3).to(device)
    mean = (torch.randn(c, generator=g) * 0.2).to(device)
    var = (torch.rand(c, generator=g) + 0.5).to(device)
    residual = torch.randn(n, c, h, w, generator=g).to(device, dtype).to(memory_format=memory_format)
    return x, weight, bias, mean, var, residual


SHAPES = [(4, 16, 8, 8), (2, 13, 5, 7), (3, 7, 1, 1), (1, 64, 3, 3), (2, 130, 3, 3)]


def _with_dtypes(dtypes, cuda_only=(torch.float16,)):
    """"device, backend, dtype" params: every pair of conftest.PAIRS with each
    dtype; `cuda_only` ones (fp16, a GPU dtype) on CUDA tensors only."""
    return [
        pytest.param(d, b, dtype, marks=pair_marks(d, b), id=f"{d}-{b}-{str(dtype)[6:]}")
        for d, b in PAIRS for dtype in dtypes if d == "cuda" or dtype not in cuda_only
    ]


@pytest.mark.parametrize("device, backend, dtype", _with_dtypes([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("epilogue", ["relu", "residual_relu", "residual", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_running_stats(shape, epilogue, training, memory_format, device, backend, dtype):
    x, weight, bias, mean, var, residual = make(*shape, dtype, memory_format, device=device)
    if not training:
        # eval normalises with the running statistics in x's dtype
        mean, var = mean.to(dtype), var.to(dtype)
        weight, bias = weight.to(dtype), bias.to(dtype)
    elif dtype == torch.float64:
        weight, bias, mean, var = (t.to(dtype) for t in (weight, bias, mean, var))
    res = residual if epilogue.startswith("residual") else None
    relu = epilogue.endswith("relu")
    ref, new_stats = reference64(x, weight, bias, mean, var, training, 0.1, 1e-5, res, relu)
    m, v = mean.clone(), var.clone()
    with resnet_fused.backend(backend):
        out = ops.batch_norm_act(x, weight, bias, m, v, training, 0.1, 1e-5, res, relu)
    assert out.dtype == dtype and out.device == x.device
    assert out.is_contiguous(memory_format=memory_format)
    assert_equivalent(out, ref, OP_TOL[dtype])
    if training:
        stats_tol = OP_TOL[torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype]  # fp32 statistics
        assert_equivalent(m, new_stats[0], stats_tol, "running_mean")
        assert_equivalent(v, new_stats[1], stats_tol, "running_var")
    else:
        assert torch.equal(m, mean) and torch.equal(v, var)


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_no_running_stats_and_no_affine(device, backend):
    x, *_ = make(2, 5, 4, 4, torch.float32, torch.contiguous_format, device=device)
    ref, _ = reference64(x, None, None, None, None, True, 0.1, 1e-3, None, True)
    with resnet_fused.backend(backend):
        out = ops.batch_norm_act(x, None, None, None, None, True, 0.1, 1e-3)
    assert_equivalent(out, ref, OP_TOL[torch.float32])


@pytest.mark.parametrize("device, backend, dtype", _with_dtypes([torch.float32, torch.bfloat16, torch.float16]))
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_gradients_against_float64(with_residual, relu, memory_format, device, backend, dtype):
    x, weight, bias, mean, var, residual = make(3, 13, 4, 5, dtype, memory_format, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    with resnet_fused.backend(backend):
        out = ops.batch_norm_act(
            leaves[0], leaves[1], leaves[2], mean.clone(), var.clone(), True, 0.1, 1e-5,
            leaves[3] if with_residual else None, relu,
        )
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    out.backward(g)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    ref, _ = reference64(
        leaves64[0], leaves64[1], leaves64[2], None, None, True, 0.1, 1e-5,
        leaves64[3] if with_residual else None, relu,
        relu_mask=(out.detach() > 0).double() if relu else None,
    )
    ref.backward(g.double())
    for name, got, want in zip(("x", "weight", "bias", "residual"), leaves, leaves64):
        if name == "residual" and not with_residual:
            assert got.grad is None
            continue
        assert got.grad.dtype == got.dtype, name
        assert_equivalent(got.grad, want.grad, OP_TOL[dtype], f"grad of {name}")


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_gradcheck_float64(device, backend):
    x, weight, bias, _, _, residual = make(2, 3, 3, 3, torch.float64, torch.contiguous_format, device=device)
    inputs = [t.double().requires_grad_() for t in (x, weight, bias, residual)]
    with resnet_fused.backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, w, b, r: ops.batch_norm_act(x, w, b, None, None, True, 0.1, 1e-5, r, True), inputs
        )


def test_cpu_kernels_independent_of_thread_count():
    x, weight, bias, mean, var, residual = make(8, 96, 17, 17, torch.float32, torch.channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
            with resnet_fused.backend("cpu"):
                out = ops.batch_norm_act(leaves[0], leaves[1], leaves[2], mean.clone(), var.clone(), True, 0.1, 1e-5, leaves[3])
            out.backward(torch.ones_like(out))
            results.append([out.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
