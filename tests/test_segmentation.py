"""fuse() on torchvision's DeepLabV3 and FCN: the heads (ASPP and its
branches, DeepLabHead, FCNHead) and the model itself take fused classes,
every head convolution runs on the CPU fast path, the outputs equal the
unfused model's in the layout torchvision gives, and what hooks, TorchScript,
torch.fx and training see is torchvision's."""
import copy

import pytest
import torch
from torchvision.models import segmentation
from torchvision.models.segmentation.deeplabv3 import ASPP, ASPPConv, ASPPPooling, DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

import resnet_fused
from resnet_fused import segmentation as fused_segmentation
from resnet_fused.ops.cpu import onednn
from conftest import NET_TOL, assert_equivalent, assert_scripts_and_traces, randomize_norms

requires_onednn = pytest.mark.skipif(
    onednn.UNAVAILABLE is not None or resnet_fused.backends.reason_unavailable("cpu") is not None,
    reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE or resnet_fused.backends.reason_unavailable('cpu')}",
)

BUILDERS = [segmentation.deeplabv3_resnet50, segmentation.fcn_resnet50]


def _pair(build, aux_loss=True):
    torch.manual_seed(0)
    plain = build(weights=None, weights_backbone=None, aux_loss=aux_loss, num_classes=5).eval()
    randomize_norms(plain, 0)
    return plain, resnet_fused.fuse(copy.deepcopy(plain))


def test_fuse_swaps_the_segmentation_classes_and_unfuse_restores_them():
    for build, model_type in [(segmentation.deeplabv3_resnet50, DeepLabV3), (segmentation.fcn_resnet50, FCN)]:
        plain, fused = _pair(build)
        assert list(fused.state_dict()) == list(plain.state_dict())
        plain_types = [type(m) for m in plain.modules()]
        for p_type, f in zip(plain_types, fused.modules()):
            want = fused_segmentation.COMPANIONS.get(p_type)
            if want is not None:
                assert type(f) is want and isinstance(f, p_type)
        assert type(fused) is fused_segmentation.COMPANIONS[model_type]
        back = resnet_fused.unfuse(fused)
        assert [type(m) for m in back.modules()] == plain_types
    _, report = resnet_fused.fuse(segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True),
                                  report=True)
    assert {"DeepLabV3", "backbone", "backbone.layer1.0", "classifier", "classifier.0", "classifier.0.convs.1",
            "classifier.0.convs.4", "aux_classifier"} <= set(report.fused)
    assert "classifier.0.convs.0" not in report.fused  # a plain nn.Sequential: run fused, not swapped
    kinds = {type(m) for m in _pair(segmentation.deeplabv3_resnet50)[1].modules()}
    assert {fused_segmentation.COMPANIONS[t] for t in (DeepLabHead, ASPP, ASPPConv, ASPPPooling, FCNHead)} <= kinds


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_outputs_equal_torchvisions_in_its_layout(build, fmt):
    plain, fused = _pair(build)
    x = torch.randn(2, 3, 96, 80).contiguous(memory_format=fmt)
    with torch.no_grad():
        want, got = plain(x), fused(x)
    assert list(got) == list(want) == ["out", "aux"]
    for k in want:
        assert_equivalent(got[k], want[k], NET_TOL[torch.float32], k)
        for layout in (torch.contiguous_format, torch.channels_last):
            assert got[k].is_contiguous(memory_format=layout) == want[k].is_contiguous(memory_format=layout), k


@requires_onednn
def test_every_head_convolution_runs_on_the_cpu_fast_path_in_channels_last(monkeypatch):
    """NCHW in: every head convolution (the ASPP's four branches and
    projection, the 3x3 after it, both classifiers) is one cpu-backend call
    on cached weights, given channels_last activations (no NCHW round trip
    between backbone and head)."""
    plain, fused = _pair(segmentation.deeplabv3_resnet50)
    layouts, real_call = [], onednn.conv_bn_act

    def call(x, packed, *args, **kwargs):
        if x.shape[-2:] != (1, 1):  # (the pooled branch's 1x1 map is both)
            layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return real_call(x, packed, *args, **kwargs)

    monkeypatch.setattr(onednn, "conv_bn_act", call)
    onednn.clear_cache()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        want, got = plain(x), fused(x)
    assert_equivalent(got["out"], want["out"], NET_TOL[torch.float32])
    heads = [fused.classifier, fused.aux_classifier]
    convs = [m for h in heads for m in h.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 10 and all(onednn.cached(c) for c in convs)
    assert layouts and all(layouts)


def test_a_hook_inside_the_head_sees_torchvisions_activation():
    plain, fused = _pair(segmentation.deeplabv3_resnet50)
    seen = {}
    for name, model in (("plain", plain), ("fused", fused)):
        model.classifier[0].convs[4].register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, (i[0], o)))
    x = torch.randn(1, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = plain(x), fused(x)
    assert_equivalent(got["out"], want["out"], NET_TOL[torch.float32])
    for a, b in zip(seen["fused"], seen["plain"]):
        assert_equivalent(a, b, NET_TOL[torch.float32])
        assert a.is_contiguous() == b.is_contiguous()
        assert a.is_contiguous(memory_format=torch.channels_last) == b.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("build", BUILDERS)
def test_a_nan_pixel_reaches_the_outputs_torchvisions_reaches(build):
    plain, fused = _pair(build)
    x = torch.randn(1, 3, 64, 64)
    x[0, 1, 10, 20] = float("nan")
    with torch.no_grad():
        want, got = plain(x), fused(x)
    for k in want:
        assert want[k].isnan().any()
        assert torch.equal(got[k].isnan(), want[k].isnan()), k


@pytest.mark.parametrize("build", BUILDERS)
def test_training_in_float64_equals_torchvision(build):
    """Train mode (batch statistics, the ASPP's pooled branch included,
    Dropout drawing its masks): loss, every gradient and the running statistics equal torchvision's."""
    plain, fused = _pair(build)
    plain, fused = plain.double().train(), fused.double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(1)  # the heads' Dropout draws the same masks in the same order
    loss_f = sum(v.square().mean() for v in fused(x).values())
    torch.manual_seed(1)
    loss_p = sum(v.square().mean() for v in plain(x).values())
    loss_f.backward()
    loss_p.backward()
    assert_equivalent(loss_f, loss_p, 1e-10)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert_equivalent(a.grad, b.grad, 1e-8, name)
    for (name, a), b in zip(fused.named_buffers(), plain.buffers()):
        if a.is_floating_point():
            assert_equivalent(a, b, 1e-10, name)


@pytest.mark.parametrize("build", BUILDERS)
def test_scripts_and_traces_to_its_values(build):
    """torch.jit.script compiles torchvision's forward; torch.fx traces the fused calls."""
    plain, fused = _pair(build)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = plain(x)
    assert_scripts_and_traces(fused, x, want)


@pytest.mark.parametrize("build", BUILDERS)
def test_empty_batches_and_meta_tensors_behave_as_in_torchvision(build):
    plain, fused = _pair(build)
    with torch.no_grad():
        empty = torch.randn(0, 3, 64, 64)
        want, got = plain(empty), fused(empty)
        for k in want:
            assert got[k].shape == want[k].shape == (0, 5, 64, 64)
        meta = torch.randn(2, 3, 64, 64, device="meta")
        want, got = plain.to("meta")(meta), fused.to("meta")(meta)
    for k in want:
        assert got[k].device.type == "meta" and got[k].shape == want[k].shape
        assert got[k].is_contiguous() == want[k].is_contiguous()
