"""One Basic and one Bottleneck block per stage: torchvision vs resnet_fused.

    pytest benchmarks/test_blocks.py --benchmark-only [--bench-batch 8 --bench-size 112]

Blocks are the identity-shortcut blocks of resnet18 (Basic) and resnet50
(Bottleneck) at each stage's feature-map size for the chosen input size
(size/4, /8, /16, /32). One group per block, inference and a training step
(forward + backward); rows: torchvision NCHW and channels_last, resnet_fused
per available backend in both layouts.
"""
import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

import resnet_fused
from run_info import autocast, device_backends, record_run_info

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# (kind, stage, input channels, width)
BLOCKS = [("basic", s + 1, 64 << s, 64 << s) for s in range(4)] + [
    ("bottleneck", s + 1, 256 << s, 64 << s) for s in range(4)
]


def _impls():
    for fmt in FORMATS:
        yield f"torchvision-{fmt}", None, fmt
    for name in device_backends():
        for fmt in FORMATS:
            yield f"resnet_fused-{name}-{fmt}", name, fmt


def _block(kind, channels, width):
    torch.manual_seed(0)
    return BasicBlock(channels, width) if kind == "basic" else Bottleneck(channels, width)


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("impl, backend, fmt", list(_impls()), ids=[i[0] for i in _impls()])
@pytest.mark.parametrize("kind, stage, channels, width", BLOCKS, ids=[f"{b[0]}-stage{b[1]}" for b in BLOCKS])
def test_block(benchmark, kind, stage, channels, width, impl, backend, fmt, mode, device, input_shape, amp_dtype):
    block = _block(kind, channels, width)
    if backend is not None:
        block = resnet_fused.fuse(block)
    block = block.to(device).to(memory_format=FORMATS[fmt]).train(mode == "train")
    side = max(1, input_shape[2] >> (stage + 1))
    shape = (input_shape[0], channels, side, side)
    x = torch.randn(*shape, device=device).to(memory_format=FORMATS[fmt])
    benchmark.group = f"block-{kind}-stage{stage}-{'x'.join(map(str, shape))}-{mode}"
    record_run_info(benchmark, device, shape, amp_dtype)

    def run():
        with resnet_fused.backend(backend or "auto"), autocast(device, amp_dtype):
            if mode == "inference":
                with torch.no_grad():
                    block(x)
            else:
                block(x.requires_grad_()).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = input_shape[0] / benchmark.stats.stats.median
