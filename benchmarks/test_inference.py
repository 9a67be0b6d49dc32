"""Inference throughput: torchvision eager vs resnet_fused, side by side in one run.

    pytest benchmarks/ --benchmark-only [--bench-batch 8 --bench-size 112]

One benchmark group per model; compare the rows of a group (images/s is in
extra_info). fp32 on CPU; on a GPU the same rows run on CUDA under bf16
autocast (--bench-dtype to change). --bench-compile adds torch.compile rows
(inductor with freezing = True).
"""
import pytest
import torch
import torchvision

import resnet_fused
from run_info import autocast, device_backends, record_run_info

MODELS = ["resnet18", "resnet50", "resnext50_32x4d"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _impls():
    yield "torchvision", None, torch.contiguous_format
    yield "torchvision-channels_last", None, torch.channels_last
    for name in device_backends():
        yield f"resnet_fused-{name}", name, torch.contiguous_format
        yield f"resnet_fused-{name}-channels_last", name, torch.channels_last


@pytest.mark.parametrize("impl, backend, memory_format", list(_impls()), ids=[i[0] for i in _impls()])
@pytest.mark.parametrize("arch", MODELS)
def test_inference(benchmark, arch, impl, backend, memory_format, device, input_shape, amp_dtype, compiled):
    torch.manual_seed(0)
    if backend is None:
        model = getattr(torchvision.models, arch)()
    else:
        model = getattr(resnet_fused, arch)()
    model = model.eval().to(device).to(memory_format=memory_format)
    x = torch.randn(*input_shape, device=device).to(memory_format=memory_format)
    if compiled:
        # inductor with weight freezing (conv+BN folding, oneDNN prepacking on
        # CPU): the best PyTorch itself offers for inference
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        model = torch.compile(model)
    benchmark.group = f"inference-{arch}"
    record_run_info(benchmark, device, input_shape, amp_dtype)
    benchmark.extra_info["compiled"] = compiled

    def run():
        with torch.no_grad(), autocast(device, amp_dtype):
            if backend is None:
                model(x)
            else:
                with resnet_fused.backend(backend):
                    model(x)
        _sync(device)

    run()  # warm-up
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = input_shape[0] / benchmark.stats.stats.median
