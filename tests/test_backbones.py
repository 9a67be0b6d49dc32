"""fuse() on torchvision's detection and segmentation models: the backbone's
IntermediateLayerGetter gets the fused stem and the fast path, the outputs
equal the unfused model's, and features come back in the caller's layout."""
import copy

import pytest
import torch
import torchvision
from torchvision.models import detection, segmentation
from torchvision.models._utils import IntermediateLayerGetter

import resnet_fused
from resnet_fused.backbones import FusedIntermediateLayerGetter
from resnet_fused.ops.cpu import onednn
from conftest import NET_TOL, assert_equivalent, assert_scripts_and_traces, randomize_norms

requires_onednn = pytest.mark.skipif(
    onednn.UNAVAILABLE is not None or resnet_fused.backends.reason_unavailable("cpu") is not None,
    reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE or resnet_fused.backends.reason_unavailable('cpu')}",
)


def _pair(build, **kwargs):
    torch.manual_seed(0)
    plain = build(weights=None, weights_backbone=None, **kwargs).eval()
    randomize_norms(plain, 0)
    return plain, resnet_fused.fuse(copy.deepcopy(plain))


@pytest.mark.parametrize("build", [detection.fasterrcnn_resnet50_fpn, detection.retinanet_resnet50_fpn,
                                   segmentation.deeplabv3_resnet50, segmentation.fcn_resnet50])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_backbone_features_equal_and_keep_the_callers_layout(build, fmt):
    plain, fused = _pair(build)
    body = fused.backbone.body if hasattr(fused.backbone, "body") else fused.backbone
    assert type(body) is FusedIntermediateLayerGetter
    x = torch.randn(2, 3, 64, 80).contiguous(memory_format=fmt)
    plain_body = plain.backbone.body if hasattr(plain.backbone, "body") else plain.backbone
    with torch.no_grad():
        want, got = plain_body(x), body(x)
    assert list(got) == list(want)
    for k in want:
        assert_equivalent(got[k], want[k], NET_TOL[torch.float32])
        assert got[k].is_contiguous(memory_format=fmt) == want[k].is_contiguous(memory_format=fmt)


@requires_onednn
def test_backbone_runs_every_convolution_on_the_cpu_fast_path_stem_included():
    plain, fused = _pair(detection.fasterrcnn_resnet50_fpn)
    body = fused.backbone.body
    onednn.clear_cache()
    with torch.no_grad():
        body(torch.randn(1, 3, 64, 64))  # NCHW in: channels_last inside
    convs = [m for m in body.modules() if isinstance(m, torch.nn.Conv2d)]
    assert body.conv1 in convs
    assert all(onednn.cached(c) for c in convs)


@pytest.mark.parametrize("build", [segmentation.deeplabv3_resnet50, segmentation.fcn_resnet50])
def test_segmentation_model_output_equals_the_unfused_model(build):
    plain, fused = _pair(build, aux_loss=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = plain(x), fused(x)
    for k in want:
        assert_equivalent(got[k], want[k], NET_TOL[torch.float32])
        assert got[k].is_contiguous()


def test_detection_model_runs_fused_and_equals_the_unfused_model():
    plain, fused = _pair(detection.fasterrcnn_resnet50_fpn, min_size=64, max_size=96)
    images = [torch.rand(3, 64, 80)]
    with torch.no_grad():
        feats_plain = plain.backbone(plain.transform(images)[0].tensors)
        feats_fused = fused.backbone(fused.transform(images)[0].tensors)
        fused(images)  # the whole model runs
    for k in feats_plain:
        assert_equivalent(feats_fused[k], feats_plain[k], NET_TOL[torch.float32])


@pytest.mark.parametrize("norm", ["frozen", "batch_norm"])
def test_backbone_training_equals_the_unfused_one_and_unfuse_round_trips(norm):
    # detection fine-tuning: FrozenBatchNorm2d (pretrained backbones) or BatchNorm2d in train mode
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    layer = FrozenBatchNorm2d if norm == "frozen" else torch.nn.BatchNorm2d
    plain = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=layer, trainable_layers=5)
    randomize_norms(plain, 0)
    fused = resnet_fused.fuse(copy.deepcopy(plain))
    body, plain_body = fused.body.train().double(), plain.body.train().double()
    assert type(body) is FusedIntermediateLayerGetter
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    got, want = body(x), plain_body(x)
    sum(v.sum() for v in got.values()).backward()
    sum(v.sum() for v in want.values()).backward()
    grads = 0
    for a, b in zip(body.parameters(), plain_body.parameters()):
        if b.grad is not None:
            assert_equivalent(a.grad, b.grad, NET_TOL[torch.float32])
            grads += 1
    assert grads > 0
    back = resnet_fused.unfuse(fused)
    assert type(back.body) is IntermediateLayerGetter


def test_getter_over_another_backbone_is_left_alone():
    # a model with no ResNet blocks is not class-swapped; its getter stays torchvision's
    model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    plain_getters = [m for m in model.modules() if type(m) is IntermediateLayerGetter]
    assert plain_getters
    try:
        fused = resnet_fused.fuse(model)
    except (TypeError, ValueError):
        return  # the fx rewrite may refuse it (and says why); either way no swap happened
    assert not any(type(m) is FusedIntermediateLayerGetter for m in fused.modules())


# ---- the feature pyramid (BackboneWithFPN / FeaturePyramidNetwork) ----

def _fpn_pair(**kwargs):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    plain = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5, **kwargs).eval()
    randomize_norms(plain, 0)
    for m in plain.fpn.modules():  # non-zero biases, so a dropped bias shows
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    return plain, resnet_fused.fuse(copy.deepcopy(plain))


@pytest.mark.parametrize("build", [detection.fasterrcnn_resnet50_fpn, detection.retinanet_resnet50_fpn,
                                   detection.maskrcnn_resnet50_fpn])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_backbone_with_fpn_equals_the_unfused_one_in_the_callers_layout(build, fmt):
    """The whole backbone (body + pyramid, RetinaNet's P6/P7 extra block
    included) after fuse(): torchvision's classes swapped, outputs equal,
    every level in the caller's layout, as torchvision returns it."""
    from resnet_fused.backbones import FusedBackboneWithFPN, FusedFeaturePyramidNetwork

    plain, fused = _pair(build)
    assert type(fused.backbone) is FusedBackboneWithFPN and type(fused.backbone.fpn) is FusedFeaturePyramidNetwork
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=fmt)
    with torch.no_grad():
        want, got = plain.backbone(x), fused.backbone(x)
    assert list(got) == list(want)
    for k in want:
        assert_equivalent(got[k], want[k], NET_TOL[torch.float32])
        assert got[k].is_contiguous(memory_format=fmt), k
    back = resnet_fused.unfuse(fused)
    assert type(back.backbone).__name__ == "BackboneWithFPN" and type(back.backbone.fpn).__name__ == "FeaturePyramidNetwork"


@requires_onednn
def test_fpn_runs_its_convolutions_on_the_cpu_fast_path_with_the_add_fused(monkeypatch):
    """Every pyramid convolution runs as one cpu-backend call on cached
    weights; the lateral ones take the top-down add as their residual."""
    plain, fused = _fpn_pair()
    packed_for, calls = {}, []
    real_pack, real_call = onednn.pack, onednn.conv_bn_act

    def pack(conv, norm, *args):
        out = real_pack(conv, norm, *args)
        if norm is None:
            packed_for[id(out)] = conv
        return out

    def call(x, packed, residual, *args, **kwargs):
        if id(packed) in packed_for:
            calls.append((packed_for[id(packed)], residual is not None))
        return real_call(x, packed, residual, *args, **kwargs)

    monkeypatch.setattr(onednn, "pack", pack)
    monkeypatch.setattr(onednn, "conv_bn_act", call)
    onednn.clear_cache()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = fused(x)
        want = plain(x)
    for k in want:
        assert_equivalent(got[k], want[k], NET_TOL[torch.float32])
    fpn_convs = [m for m in fused.fpn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {c for c, _ in calls} == set(fpn_convs) and len(calls) == len(fpn_convs)
    assert sum(with_add for _, with_add in calls) == len(fused.fpn.inner_blocks) - 1
    assert all(onednn.cached(c) for c in fpn_convs)


def test_fpn_keeps_torchvisions_forward_where_it_cannot_fuse():
    """A pyramid with a norm layer (blocks of conv + BN) and one with a hook
    on a convolution run torchvision's forward, with its values; the hook
    sees torchvision's layout; a Sequential subclass with its own
    forward around the one conv keeps that forward."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    plain, fused = _fpn_pair(norm_layer=FrozenBatchNorm2d)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = plain(x), fused(x)
    for k in want:
        assert_equivalent(got[k], want[k], NET_TOL[torch.float32])
    plain, fused = _fpn_pair()
    seen = []
    fused.fpn.layer_blocks[0][0].register_forward_hook(lambda m, i, o: seen.append(i[0].is_contiguous()))
    with torch.no_grad():
        want, got = plain(x), fused(x)
    assert seen == [True]  # NCHW in, NCHW where the hook looks
    for k in want:
        assert_equivalent(got[k], want[k], NET_TOL[torch.float32])
    # a Sequential subclass with its own forward around the one conv: its
    # forward runs, not just the conv it holds
    class Doubled(torch.nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    plain, fused = _fpn_pair()
    for m in (plain, fused):
        m.fpn.inner_blocks[0] = Doubled(*m.fpn.inner_blocks[0])
    with torch.no_grad():
        want, got = plain(x), fused(x)
    for k in want:
        assert_equivalent(got[k], want[k], NET_TOL[torch.float32])


def test_fpn_nonfinite_and_training_follow_torchvision():
    """A NaN pixel reaches exactly the outputs torchvision's reach (the
    fused path hands non-finite values to torch's convolution); in training
    (grad recorded) the pyramid's gradients equal torchvision's."""
    plain, fused = _fpn_pair()
    x = torch.randn(1, 3, 64, 64)
    x[0, 1, 10, 20] = float("nan")
    with torch.no_grad():
        want, got = plain(x), fused(x)
    for k in want:
        assert torch.equal(got[k].isnan(), want[k].isnan()), k
    plain, fused = plain.double().train(), fused.double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    sum(v.sum() for v in fused(x).values()).backward()
    sum(v.sum() for v in plain(x).values()).backward()
    for (name, a), b in zip(fused.fpn.named_parameters(), plain.fpn.parameters()):
        assert_equivalent(a.grad, b.grad, NET_TOL[torch.float32])


def test_fused_detection_backbone_scripts_and_traces():
    """torch.jit.script (torchvision's forward, compiled as written) and
    torch.fx.symbolic_trace of the fused backbone run and give its values."""
    plain, fused = _fpn_pair()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = fused(x)
    assert_scripts_and_traces(fused, x, want)


# ---- the region proposal head (RPNHead) ----

def _rpn_pair():
    torch.manual_seed(0)
    from torchvision.models.detection.rpn import RPNHead

    plain = RPNHead(32, 3, conv_depth=2)
    for conv in plain.modules():
        if isinstance(conv, torch.nn.Conv2d):  # torchvision's init (std 0.01, zero bias) is too tame
            torch.nn.init.normal_(conv.weight, std=0.1)
            torch.nn.init.normal_(conv.bias, std=0.1)
    from resnet_fused.detection import FusedRPNHead

    fused = copy.deepcopy(plain)
    fused.__class__ = FusedRPNHead  # what fuse() does to it inside a detector
    return plain, fused


def _levels(fmt=torch.contiguous_format, dtype=torch.float32):
    return [torch.randn(2, 32, s, s + 3, dtype=dtype).contiguous(memory_format=fmt) for s in (16, 8, 4)]


def test_fuse_swaps_the_detectors_rpn_head():
    from resnet_fused.detection import FusedRPNHead

    plain, fused = _pair(detection.fasterrcnn_resnet50_fpn, min_size=64, max_size=96)
    assert type(fused.rpn.head) is FusedRPNHead
    assert list(fused.rpn.head.state_dict()) == list(plain.rpn.head.state_dict())
    assert type(resnet_fused.unfuse(fused).rpn.head).__name__ == "RPNHead"


@requires_onednn
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_rpn_head_equals_torchvisions_on_the_cpu_fast_path_in_the_levels_layout(fmt):
    plain, fused = _rpn_pair()
    onednn.clear_cache()
    levels = _levels(fmt)
    with torch.no_grad():
        want, got = plain(levels), fused(levels)
    for w, g in zip(want[0] + want[1], got[0] + got[1]):
        assert_equivalent(g, w, NET_TOL[torch.float32])
        assert g.is_contiguous(memory_format=fmt) == w.is_contiguous(memory_format=fmt)
    assert all(onednn.cached(c) for c in fused.modules() if isinstance(c, torch.nn.Conv2d))


def test_rpn_head_with_a_hook_inside_runs_torchvisions_forward():
    plain, fused = _rpn_pair()
    seen = []
    fused.conv[0][0].register_forward_hook(lambda m, i, o: seen.append((i[0].is_contiguous(), o.is_contiguous())))
    levels = _levels()
    with torch.no_grad():
        want, got = plain(levels), fused(levels)
    assert seen == [(True, True)] * 3
    for w, g in zip(want[0] + want[1], got[0] + got[1]):
        assert torch.equal(g, w)  # torchvision's own calls


def test_rpn_head_training_scripting_and_nonfinite_follow_torchvision():
    plain, fused = _rpn_pair()
    # a NaN pixel: NaN exactly where torchvision's outputs have it
    levels = _levels()
    levels[0][1, 3, 5, 7] = float("nan")
    with torch.no_grad():
        want, got = plain(levels), fused(levels)
    for w, g in zip(want[0] + want[1], got[0] + got[1]):
        assert torch.equal(g.isnan(), w.isnan())
    # training in float64: every gradient equal
    plain, fused = plain.double(), fused.double()
    levels = _levels(dtype=torch.float64)
    sum(t.sum() for t in sum(fused(levels), [])).backward()
    sum(t.sum() for t in sum(plain(levels), [])).backward()
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert_equivalent(a.grad, b.grad, 1e-10)
    # TorchScript compiles torchvision's forward
    plain, fused = plain.float(), fused.float()
    levels = _levels()
    with torch.no_grad():
        want, got = plain(levels), torch.jit.script(fused)(levels)
    for w, g in zip(want[0] + want[1], got[0] + got[1]):
        assert_equivalent(g, w, NET_TOL[torch.float32])
