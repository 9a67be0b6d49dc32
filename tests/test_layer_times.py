"""python -m resnet_fused.layer_times: every convolution of the fused
forward counted once under its layer type, FLOPs as a direct convolution
counts them, and onnxruntime's profile mapped to the same types."""
import collections
import json

import pytest
import torch
import torchvision

from resnet_fused import layer_times


def _direct_conv_flops(arch: str, size: int, shapes: list = None) -> tuple:
    model = getattr(torchvision.models, arch)().eval()
    flops, calls = [], []

    def hook(m, inputs, out):
        flops.append(2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        if shapes is not None:
            shapes.append((m.in_channels, m.out_channels, list(out.shape[2:])))

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
            calls.append(m)
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return sum(flops) / 1e9, len(calls)


def test_layer_type_names_each_resnet_convolution():
    assert layer_times.layer_type(7, 2, 3, 64) == "stem 7x7 s2"
    assert layer_times.layer_type(1, 1, 64, 256) == "1x1 s1 expand"
    assert layer_times.layer_type(1, 1, 256, 64) == "1x1 s1 reduce"
    assert layer_times.layer_type(1, 2, 256, 512) == "1x1 s2"
    assert layer_times.layer_type(3, 2, 128, 128) == "3x3 s2"
    assert layer_times.layer_type(5, 1, 8, 8) == "other conv"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_every_convolution_is_counted_once_with_its_flops(tmp_path, arch):
    out = tmp_path / "l.json"
    assert layer_times.main(["--model", arch, "--batch", "1", "--size", "64", "--rounds", "2",
                             "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    layers = result["layers"]
    gflop, convs = _direct_conv_flops(arch, 64)
    assert sum(calls for _, _, calls in layers.values()) == convs
    assert sum(g for _, g, _ in layers.values()) == pytest.approx(gflop, rel=1e-9)
    assert 0 < sum(ms for ms, _, _ in layers.values()) <= result["total_ms"]
    assert set(layers) <= set(layer_times.TYPES) and "other conv" not in layers


def test_per_layer_rows_follow_the_forward_one_per_convolution(tmp_path):
    out = tmp_path / "p.json"
    assert layer_times.main(["--model", "resnet18", "--batch", "2", "--size", "64", "--rounds", "2",
                             "--per-layer", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    rows = result["per_layer"]
    shapes = []
    _direct_conv_flops("resnet18", 64, shapes)  # torchvision's own forward, in its order
    # torchvision's forward runs a block's projection after its main path, as the fused forward does
    assert [(r["cin"], r["cout"], r["out_hw"]) for r in rows] == shapes
    assert {r["kernel"] for r in rows} <= {"winograd", "gemm", "grouped", "onednn"}
    assert all(r["ms"] > 0 and r["alone_ms"] > 0 for r in rows)
    assert collections.Counter(r["type"] for r in rows) == {t: calls for t, (_, _, calls) in result["layers"].items()}
    assert sum(r["gflop"] for r in rows) == pytest.approx(sum(g for _, g, _ in result["layers"].values()), rel=1e-9)
    assert "onnxruntime_ms" not in rows[0]


def test_onnxruntime_profile_maps_every_convolution_to_a_layer_type(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)  # onnxruntime's profile file must not be left behind, here or anywhere
    out = tmp_path / "o.json"
    assert layer_times.main(["--model", "resnet50", "--batch", "1", "--size", "64", "--rounds", "1",
                             "--onnxruntime", "--per-layer", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    peer = result["onnxruntime_layers"]
    # per layer: onnxruntime's node for each convolution, whose times add up to its per-type ones
    rows = result["per_layer"]
    assert len(rows) == 53 and all(r["onnxruntime_ms"] > 0 for r in rows)
    assert sum(r["onnxruntime_ms"] for r in rows) == pytest.approx(
        sum(ms for t, ms in peer.items() if t in layer_times.TYPES), rel=1e-6)
    assert set(result["layers"]) <= set(peer)  # the same layer types, each with onnxruntime's time
    unmapped = [k for k in peer if k.startswith("other (") and "Conv" in k]
    assert not unmapped, unmapped
    assert result["onnxruntime_total_ms"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"]
