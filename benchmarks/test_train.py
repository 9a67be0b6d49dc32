"""One training step (forward, backward, SGD step): torchvision vs resnet_fused.

    pytest benchmarks/test_train.py --benchmark-only [--bench-batch 8 --bench-size 112]

One group per model and memory format; rows: torchvision, and the fused model
under `auto` and every available backend.
"""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from run_info import autocast, device_backends, record_run_info

MODELS = ["resnet18", "resnet50", "resnext50_32x4d"]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _impls():
    yield "torchvision", None
    yield "resnet_fused-auto", "auto"
    for name in device_backends():
        yield f"resnet_fused-{name}", name


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("impl, backend", list(_impls()), ids=[i[0] for i in _impls()])
@pytest.mark.parametrize("arch", MODELS)
def test_train_step(benchmark, arch, impl, backend, fmt, device, input_shape, amp_dtype, compiled):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)() if backend is None else getattr(resnet_fused, arch)()
    model = model.train().to(device).to(memory_format=FORMATS[fmt])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*input_shape, generator=g).to(device).to(memory_format=FORMATS[fmt])
    y = torch.randint(0, 1000, (input_shape[0],), generator=g).to(device)
    forward = torch.compile(model) if compiled else model
    benchmark.group = f"train-step-{arch}-{fmt}"
    record_run_info(benchmark, device, input_shape, amp_dtype)
    benchmark.extra_info["compiled"] = compiled

    def step():
        with resnet_fused.backend(backend or "auto"), autocast(device, amp_dtype):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = input_shape[0] / benchmark.stats.stats.median
