"""resnet_fused::max_pool2d, the stem's inference max-pool on CPU: bitwise
ATen's F.max_pool2d (±0 and -inf included; NaN where ATen has NaN), both layouts, every float
dtype, the pooling arguments F.max_pool2d takes; clear errors; opcheck; and
the fused models using it only where it applies."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import resnet_fused
from resnet_fused.ops import extension

pytestmark = pytest.mark.skipif(
    not extension.has_kernel("max_pool2d", "CPU"), reason=f"no CPU kernels: {extension.unavailable_reason('CPU')}"
)

BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# (kernel_size, stride, padding, dilation, ceil_mode): ResNet's stem first
CONFIGS = [
    (3, 2, 1, 1, False),
    (2, 2, 0, 1, False),
    (3, 1, 1, 1, False),
    (3, 2, 1, 2, False),
    (2, 2, 0, 1, True),
    (3, 3, 1, 1, True),
    ((3, 2), (2, 1), (1, 0), 1, False),
    ((2, 3), (1, 2), (0, 1), (2, 1), True),
]


def _input(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=g)
    # the values whose handling differs between max implementations
    flat[idx[: n // 50]] = float("nan")
    flat[idx[n // 50: n // 25]] = float("-inf")
    flat[idx[n // 25: n // 10]] = 0.0
    flat[idx[n // 10: n // 6]] = -0.0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _assert_bitwise(out, ref):
    """Same bits everywhere (±0 included) except NaNs, which must be NaN at
    the same places: their payload is not part of the contract (ATen's
    vectorised bf16 path rewrites NaN as 0xFFFF, its scalar paths keep it)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan), "NaN in different places"
    bits = BITS[out.dtype]
    assert torch.equal(out.contiguous().view(bits)[~nan], ref.contiguous().view(bits)[~nan])


@pytest.mark.parametrize("dtype", list(BITS), ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_bitwise_aten(config, channels_last, dtype):
    k, s, p, d, ceil = config
    for shape in ((2, 5, 9, 11), (1, 64, 8, 7), (3, 3, 13, 6)):
        x = _input(shape, dtype, channels_last, seed=sum(shape))
        ref = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
        out = extension.max_pool2d(x, k, s, p, d, ceil)
        _assert_bitwise(out, ref)
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last)
        else:
            assert out.stride() == ref.stride()


def test_window_missing_the_input_is_minus_inf_like_aten():
    # dilation 3 over 2 rows: the second output row's window (rows -1 and 2)
    # holds no input pixel
    x = _input((1, 4, 2, 5), torch.float32, True)
    ref = F.max_pool2d(x, (2, 1), 1, (1, 0), (3, 1))
    out = extension.max_pool2d(x, (2, 1), 1, (1, 0), (3, 1))
    assert torch.isneginf(out).any()
    _assert_bitwise(out, ref)


def test_stride_defaults_to_kernel_and_empty_batch():
    x = _input((2, 6, 8, 8), torch.float32, True)
    _assert_bitwise(extension.max_pool2d(x, 2), F.max_pool2d(x, 2))
    _assert_bitwise(extension.max_pool2d(x, 2, []), F.max_pool2d(x, 2, []))
    empty = torch.empty(0, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    assert extension.max_pool2d(empty, 3, 2, 1).shape == (0, 6, 4, 4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_independent(threads):
    x = _input((4, 64, 32, 30), torch.float32, True)
    ref = F.max_pool2d(x, 3, 2, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = extension.max_pool2d(x, 3, 2, 1)
    finally:
        torch.set_num_threads(before)
    _assert_bitwise(out, ref)


@pytest.mark.parametrize(
    "x, args, message",
    [
        (torch.randn(4, 8, 8), (3, 2, 1), "x must be a 4-D"),
        (torch.randint(0, 9, (1, 4, 8, 8)), (3, 2, 1), "x must be float32, float64, bfloat16 or float16"),
        (torch.randn(1, 4, 8, 8), (0, 2, 0), "kernel_size must be positive"),
        (torch.randn(1, 4, 8, 8), (3, 0, 1), "stride must be positive"),
        (torch.randn(1, 4, 8, 8), (3, 2, 2), "padding must be between 0 and half"),
        (torch.randn(1, 4, 8, 8), (3, 2, -1), "padding must be between 0 and half"),
        (torch.randn(1, 4, 8, 8), (3, 2, 1, 0), "dilation must be positive"),
        (torch.randn(1, 4, 2, 2), (5, 1, 0), "the output would be empty"),
        (torch.randn(1, 4, 8, 8), ((3, 3, 3), 2, 1), "kernel_size must have two values"),
    ],
    ids=["rank", "int-dtype", "kernel-0", "stride-0", "padding-big", "padding-negative", "dilation-0", "empty-output",
         "kernel-three-values"],
)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_bad_input_clear_error(x, args, message, channels_last):
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=message):
        extension.max_pool2d(x, *args)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_opcheck(channels_last):
    # finite values: opcheck compares its runs without equal_nan
    x = torch.randn(2, 6, 9, 8)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    torch.library.opcheck(torch.ops.resnet_fused.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False))
    torch.library.opcheck(torch.ops.resnet_fused.max_pool2d.default, (x, [2, 3], [1, 2], [0, 1], [2, 1], True))


def _ops_called(model, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(x)
    return out, {e.name for e in prof.events()}


def test_fused_resnet_pools_with_it_in_inference_only():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    fused = resnet_fused.fuse(copy.deepcopy(tv)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv(x)
        out, names = _ops_called(fused, x)
    assert "resnet_fused::max_pool2d" in names
    assert "aten::max_pool2d_with_indices" not in names
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # a gradient being recorded, the eager backend, or a hook on the module:
    # torch's max-pool, as the module would run it
    _, names = _ops_called(fused, x.clone().requires_grad_())
    assert "resnet_fused::max_pool2d" not in names
    with torch.no_grad(), resnet_fused.backend("eager"):
        _, names = _ops_called(fused, x)
    assert "resnet_fused::max_pool2d" not in names
    seen = []
    handle = fused.maxpool.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            out, names = _ops_called(fused, x)
    finally:
        handle.remove()
    assert seen == [(2, 64, 16, 16)] and "resnet_fused::max_pool2d" not in names
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_fused_resnet_keeps_a_replaced_pool():
    # a model whose maxpool was swapped for another module runs that module
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    tv.maxpool = nn.AvgPool2d(3, 2, 1)
    fused = resnet_fused.fuse(copy.deepcopy(tv)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, names = _ops_called(fused, x)
        torch.testing.assert_close(out, tv(x), rtol=1e-4, atol=1e-4)
    assert "resnet_fused::max_pool2d" not in names and "aten::avg_pool2d" in names
