"""CIFAR ResNets and fuse() by graph rewrite: a hand-written eager model (the
way write-ups write it) vs resnet_fused, side by side in one run.

    pytest benchmarks/test_cifar.py --benchmark-only [--bench-batch 8]

Group `cifar-resnet56`: the write-up model eager (option A via F.pad), the same
model through `resnet_fused.fuse` (torch.fx rewrite), and
`resnet_fused.cifar_resnet56()`; channels_last rows for the fused ones.
32×32 inputs, inference. images/s in extra_info.
"""
import os
import sys

import pytest
import torch

import resnet_fused
from run_info import autocast, record_run_info

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
from writeups import RefResNet  # noqa: E402  (the tests' hand-written reference)

IMPLS = [
    ("writeup-eager", torch.contiguous_format),
    ("writeup-eager-channels_last", torch.channels_last),
    ("writeup-fx-fused", torch.contiguous_format),
    ("writeup-fx-fused-channels_last", torch.channels_last),
    ("resnet_fused-cifar", torch.contiguous_format),
    ("resnet_fused-cifar-channels_last", torch.channels_last),
]


@pytest.mark.parametrize("impl, memory_format", IMPLS, ids=[i[0] for i in IMPLS])
def test_cifar_resnet56_inference(benchmark, impl, memory_format, device, input_shape, amp_dtype):
    torch.manual_seed(0)
    fused = resnet_fused.cifar_resnet56()
    ref = RefResNet(9)
    ref.load_state_dict(fused.state_dict())
    model = {"writeup-eager": ref, "writeup-fx": resnet_fused.fuse(ref), "resnet_fused-cifar": fused}[
        impl.replace("-channels_last", "").replace("-fused", "")
    ]
    model = model.eval().to(device).to(memory_format=memory_format)
    shape = (input_shape[0], 3, 32, 32)
    x = torch.randn(*shape, device=device).to(memory_format=memory_format)
    benchmark.group = "cifar-resnet56"
    record_run_info(benchmark, device, shape, amp_dtype)

    def run():
        with torch.no_grad(), autocast(device, amp_dtype):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info["images_per_s"] = shape[0] / benchmark.stats.stats.median
