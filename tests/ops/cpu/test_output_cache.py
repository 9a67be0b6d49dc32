"""The CPU kernels' output cache (csrc/cpu/output_cache.h): a freed output of
1 MB or more is handed to the next output of the same size (no new pages),
the values are the kernel's whatever block it lands in, the tensors are
ordinary (resizable, freed normally when too large), and the cache stays
within its 256 MB bound."""
import math

import pytest
import torch
import torch.nn.functional as F

from resnet_fused.ops import extension

pytestmark = pytest.mark.skipif(not extension.is_loaded(), reason="resnet_fused._C is not built")

MB = 1 << 20
BOUND = 256 * MB
ops = torch.ops.resnet_fused


def conv1x1_case(n, c, k, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=g).to(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 1, 1, generator=g) / math.sqrt(c)
    bias = torch.randn(k, generator=g)
    return x, weight, bias


def test_freed_output_is_reused_and_values_are_the_kernels():
    # 64 x 64 x 64 output channels: 1 MB exactly, the smallest size cached
    x, weight, bias = conv1x1_case(1, 32, 64, 64)
    packed = extension.conv1x1_weight(weight)
    first = ops.conv1x1(x, packed, bias, None, True, 1)
    assert first.numel() * 4 == MB
    expected = first.clone()
    address = first.data_ptr()
    held = extension.cpu_output_cache_bytes()
    del first
    assert extension.cpu_output_cache_bytes() == held + MB
    # another input, same size: lands in the freed block, holds its own values
    x2, _, _ = conv1x1_case(1, 32, 64, 64, seed=1)
    second = ops.conv1x1(x2, packed, bias, None, True, 1)
    assert second.data_ptr() == address
    assert extension.cpu_output_cache_bytes() == held
    reference = F.relu(F.conv2d(x2, weight, bias))
    torch.testing.assert_close(second, reference, rtol=1e-5, atol=1e-5)
    # and the first input again gives the first output's bits
    third = ops.conv1x1(x, packed, bias, None, True, 1)
    assert torch.equal(third, expected)


def test_small_outputs_are_not_cached():
    x, weight, bias = conv1x1_case(1, 32, 64, 16)  # 64 KB
    packed = extension.conv1x1_weight(weight)
    held = extension.cpu_output_cache_bytes()
    out = ops.conv1x1(x, packed, bias, None, True, 1)
    del out
    assert extension.cpu_output_cache_bytes() == held


def test_outputs_are_ordinary_tensors():
    x, weight, bias = conv1x1_case(1, 32, 64, 64)
    out = ops.conv1x1(x, extension.conv1x1_weight(weight), bias, None, True, 1)
    kept = out.clone()
    out.resize_(2, 64, 64, 64)  # grows its storage through the same allocator
    assert out.shape == (2, 64, 64, 64)
    assert torch.equal(out.view(-1)[: kept.numel()], kept.permute(0, 2, 3, 1).reshape(-1))
    assert out.numpy().shape == (2, 64, 64, 64)
    del out, kept


def test_winograd_and_max_pool_outputs_use_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 128, 128, generator=g).to(memory_format=torch.channels_last)  # 1 MB
    weight = torch.randn(16, 16, 3, 3, generator=g) / 12
    bias = torch.randn(16, generator=g)
    packed = extension.winograd_weight(weight)
    for run in (
        lambda: extension.winograd_conv3x3(x, packed, bias, None, True),
        lambda: extension.max_pool2d(x, 3, 1, 1),
    ):
        out = run()
        assert out.numel() * 4 == MB
        address, expected = out.data_ptr(), out.clone()
        del out
        again = run()
        assert again.data_ptr() == address
        assert torch.equal(again, expected)


def test_stays_within_its_bound():
    # 40 distinct sizes of 7-8 MB, each freed before the next: 300 MB through
    # the cache, which keeps the newest up to 256 MB and frees the oldest
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 16, 1, 1, generator=g) / 4
    packed = extension.conv1x1_weight(weight)
    bias = torch.zeros(64)
    sizes = []
    for i in range(40):
        h = 170 + i  # 64 * h * h floats: 7.1 to 8.8 MB, all different
        x = torch.randn(1, 16, h, h, generator=g).to(memory_format=torch.channels_last)
        out = ops.conv1x1(x, packed, bias, None, False, 1)
        sizes.append(out.numel() * 4)
        del out
        assert extension.cpu_output_cache_bytes() <= BOUND
    assert sum(sizes) > BOUND
    # the newest sizes are the ones kept: the last output's block is reused
    x = torch.randn(1, 16, 209, 209, generator=g).to(memory_format=torch.channels_last)
    held = extension.cpu_output_cache_bytes()
    out = ops.conv1x1(x, packed, bias, None, False, 1)
    assert extension.cpu_output_cache_bytes() == held - sizes[-1]
    del out


def test_a_block_larger_than_the_bound_is_freed_not_kept():
    # 64 x 1040² output floats: 264 MB, more than the cache may hold at all
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 16, 1, 1, generator=g) / 4
    x = torch.randn(1, 16, 1040, 1040, generator=g).to(memory_format=torch.channels_last)
    out = ops.conv1x1(x, extension.conv1x1_weight(weight), torch.zeros(64), None, False, 1)
    assert out.numel() * 4 > BOUND
    held = extension.cpu_output_cache_bytes()
    del out
    assert extension.cpu_output_cache_bytes() == held
