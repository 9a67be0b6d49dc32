"""Detection and segmentation backbones: torchvision's model vs the same
model after resnet_fused.fuse(), side by side in one run.

    pytest benchmarks/test_backbones.py --benchmark-only [--bench-batch 2 --bench-size 224]

Rows: `fasterrcnn_resnet50_fpn`'s backbone (ResNet-50 body + FPN, what the
detector runs per image batch), the whole detector (images resized to 800
px by its transform), and the whole `deeplabv3_resnet50` and `fcn_resnet50`
(backbone and heads), NCHW input
(what their transforms hand over); eval, no_grad. One group per model;
images/s in extra_info. `test_backbone_interleaved` times the two models in
alternation inside each round (a VM that drifts between rows cannot bias
the ratio) and prints the medians and their ratio.
"""
import copy
import statistics
import time

import pytest
import torch
from torchvision.models import detection, segmentation

import resnet_fused
from run_info import autocast, record_run_info

MODELS = {
    "fasterrcnn_resnet50_fpn.backbone": lambda: detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None).backbone,
    # the whole detector (its transform resizes every image to 800 px; RPN and ROI heads included)
    "fasterrcnn_resnet50_fpn": lambda: detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None),
    "deeplabv3_resnet50": lambda: segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None),
    "fcn_resnet50": lambda: segmentation.fcn_resnet50(weights=None, weights_backbone=None),
}


@pytest.mark.parametrize("impl", ["torchvision", "resnet_fused"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_backbone(benchmark, arch, impl, device, input_shape, amp_dtype):
    torch.manual_seed(0)
    model = MODELS[arch]().eval().to(device)
    if impl == "resnet_fused":
        model = resnet_fused.fuse(copy.deepcopy(model))
    x = torch.randn(*input_shape, device=device)
    benchmark.group = f"backbone-{arch}"
    record_run_info(benchmark, device, input_shape, amp_dtype)

    def run():
        with torch.no_grad(), autocast(device, amp_dtype):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up (packs the fused weights)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = input_shape[0] / benchmark.stats.stats.median


@pytest.mark.parametrize("arch", list(MODELS))
def test_backbone_interleaved(benchmark, arch, device, input_shape, amp_dtype):
    torch.manual_seed(0)
    plain = MODELS[arch]().eval().to(device)
    fused = resnet_fused.fuse(copy.deepcopy(plain))
    x = torch.randn(*input_shape, device=device)
    times = {"torchvision": [], "resnet_fused": []}
    benchmark.group = f"backbone-interleaved-{arch}"
    record_run_info(benchmark, device, input_shape, amp_dtype)

    def timed(name, model):
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, amp_dtype):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name].append(time.perf_counter() - start)

    def run():
        timed("torchvision", plain)
        timed("resnet_fused", fused)

    run()  # warm-up (packs the fused weights)
    for t in times.values():
        t.clear()
    benchmark.pedantic(run, rounds=7, iterations=1)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["torchvision"] / medians["resnet_fused"]
    benchmark.extra_info.update({f"{k}_ms": v * 1e3 for k, v in medians.items()}, speedup=ratio)
    print(f"\n{arch} batch {input_shape[0]}: torchvision {medians['torchvision'] * 1e3:.1f} ms, "
          f"resnet_fused {medians['resnet_fused'] * 1e3:.1f} ms, {ratio:.2f}x")
