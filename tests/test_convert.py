"""fuse/unfuse, state_dict compatibility, live BN state, weights loading."""
import copy
import os

import pytest
import torch
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import resnet_fused
from conftest import NET_TOL, assert_equivalent, randomize_norms


def tv_model(arch="resnet18", **kwargs):
    torch.manual_seed(0)
    return randomize_norms(getattr(torchvision.models, arch)(**kwargs)).eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_fuse_converts_every_block_and_keeps_tensors():
    tv = tv_model("resnet50")
    fused = resnet_fused.fuse(tv)
    assert type(fused) is resnet_fused.FusedResNet
    assert all(type(b) is resnet_fused.FusedBottleneck for layer in (fused.layer1, fused.layer4) for b in layer)
    # a copy by default: the original is untouched and shares no storage
    assert type(tv) is ResNet and type(tv.layer1[0]) is Bottleneck
    assert fused.conv1.weight.data_ptr() != tv.conv1.weight.data_ptr()
    x = torch.randn(2, 3, 64, 64)
    assert_equivalent(outputs(fused, x), outputs(tv, x), NET_TOL[torch.float32])


def test_fuse_inplace_and_idempotent():
    tv = tv_model()
    same = resnet_fused.fuse(tv, inplace=True)
    assert same is tv and type(tv) is resnet_fused.FusedResNet
    again = resnet_fused.fuse(same, inplace=True)
    assert again is tv and type(again.layer1[0]) is resnet_fused.FusedBasicBlock


def test_unfuse_returns_plain_torchvision_modules():
    fused = resnet_fused.resnet50()
    plain = resnet_fused.unfuse(fused)
    kinds = {type(m) for m in plain.modules()}
    assert ResNet in kinds and Bottleneck in kinds
    assert not kinds & {resnet_fused.FusedResNet, resnet_fused.FusedBottleneck, resnet_fused.FusedBasicBlock}
    assert type(fused) is resnet_fused.FusedResNet  # copy by default
    assert type(resnet_fused.unfuse(plain)) is ResNet  # idempotent


def test_fuse_blocks_inside_other_modules():
    tv = tv_model()
    container = torch.nn.Sequential(tv.layer1, tv.layer2).eval()
    fused = resnet_fused.fuse(container)
    assert type(fused[0][0]) is resnet_fused.FusedBasicBlock and type(fused[1][0]) is resnet_fused.FusedBasicBlock
    x = torch.randn(2, 64, 16, 16)
    assert_equivalent(outputs(fused, x), outputs(container, x), NET_TOL[torch.float32])


def test_fuse_leaves_user_subclasses_alone():
    class MyBlock(BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    block = MyBlock(64, 64)
    model = torch.nn.Sequential(block, BasicBlock(64, 64))
    fused = resnet_fused.fuse(model)
    assert type(fused[0]) is MyBlock and type(fused[1]) is resnet_fused.FusedBasicBlock


def test_fuse_without_resnet_blocks_rewrites_the_graph_or_says_why_not():
    # no torchvision blocks: the torch.fx rewrite (tests/test_fx.py) takes over
    fused = resnet_fused.fuse(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
    assert isinstance(fused, torch.fx.GraphModule)
    with pytest.raises(ValueError, match="contains no torchvision ResNet blocks and no conv → BatchNorm chain"):
        resnet_fused.fuse(torch.nn.Sequential(torch.nn.Linear(3, 8)))
    with pytest.raises(ValueError, match="unfuse: model \\(Sequential\\) contains no torchvision ResNet, BasicBlock"):
        resnet_fused.unfuse(torch.nn.Sequential(torch.nn.Linear(3, 8)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        resnet_fused.fuse("resnet50")


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_state_dict_round_trip_strict(arch):
    tv = tv_model(arch)
    fused = getattr(resnet_fused, arch)()
    fused.load_state_dict(tv.state_dict(), strict=True)
    back = getattr(torchvision.models, arch)()
    back.load_state_dict(fused.state_dict(), strict=True)
    assert list(tv.state_dict()) == list(fused.state_dict()) == list(back.state_dict())
    for name, t in tv.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_no_stale_results_after_in_place_edits():
    """Scale/shift come from live tensors: every edit shows in the next forward."""
    tv = tv_model("resnet50")
    fused = resnet_fused.fuse(tv)
    x = torch.randn(2, 3, 64, 64)
    assert_equivalent(outputs(fused, x), outputs(tv, x), NET_TOL[torch.float32])

    edits = [
        lambda m: m.layer1[0].bn1.weight.data.mul_(1.5),
        lambda m: m.layer2[0].bn3.running_var.mul_(3.0),
        lambda m: m.layer3[1].bn2.running_mean.add_(0.5),
        lambda m: m.bn1.bias.data.add_(0.3),
        lambda m: m.layer4[0].downsample[1].weight.data.mul_(-1.0),
        lambda m: setattr(m.layer1[0].bn2, "eps", 0.5),
        # through the tracked tensor, not `.data`: the cpu backend's oneDNN
        # path sees conv weight edits by version count (tests/ops/cpu/test_onednn.py)
        lambda m: m.layer1[0].conv1.weight.detach().mul_(2.0),
    ]
    for i, edit in enumerate(edits):
        before = outputs(fused, x)
        edit(tv)
        edit(fused)
        after = outputs(fused, x)
        assert not torch.allclose(before, after), f"edit {i} had no effect on the fused model"
        assert_equivalent(after, outputs(tv, x), NET_TOL[torch.float32], f"after edit {i}")

    other = tv_model("resnet50")
    randomize_norms(other, seed=9)
    before = outputs(fused, x)
    tv.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    after = outputs(fused, x)
    assert not torch.allclose(before, after)
    # eps is not in a state_dict: tv and fused both keep the edited one
    assert_equivalent(after, outputs(tv, x), NET_TOL[torch.float32], "after load_state_dict")


def test_optimizer_step_in_eval_mode_reflected():
    """BN-in-eval fine-tuning: gradients reach γ/β and the next forward sees the step."""
    tv = tv_model()
    fused = resnet_fused.fuse(tv)
    x = torch.randn(2, 3, 32, 32)
    for model in (tv, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).square().mean().backward()
        opt.step()
    assert_equivalent(fused.layer1[0].bn1.weight, tv.layer1[0].bn1.weight, 1e-5, "bn weight after step")
    assert_equivalent(outputs(fused, x), outputs(tv, x), NET_TOL[torch.float32])


def _save_fake_checkpoint(weights_enum, arch, tmp_path):
    """Put a checkpoint where torchvision's weights API looks before
    downloading, so loading runs through torchvision's own code offline."""
    torch.manual_seed(123)
    source = randomize_norms(getattr(torchvision.models, arch)(), seed=4)
    filename = os.path.basename(weights_enum.url)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(source.state_dict(), checkpoints / filename)
    return source.eval()


def test_weights_load_through_torchvision_api(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    source = _save_fake_checkpoint(enum, "resnet18", tmp_path)
    x = torch.randn(1, 3, 32, 32)
    for weights in (enum, "IMAGENET1K_V1", "DEFAULT"):
        fused = resnet_fused.resnet18(weights=weights, progress=False).eval()
        assert type(fused) is resnet_fused.FusedResNet
        for name, t in source.state_dict().items():
            assert torch.equal(fused.state_dict()[name], t), name
        assert_equivalent(outputs(fused, x), outputs(source, x), NET_TOL[torch.float32])
    with pytest.warns(UserWarning, match="pretrained"):
        legacy = resnet_fused.resnet18(pretrained=True, progress=False)
    assert torch.equal(legacy.fc.weight, source.fc.weight)


def test_unknown_weights_surface_torchvision_errors():
    with pytest.raises(ValueError, match="weights must be None, a ResNet50_Weights member or one of 'DEFAULT', 'IMAGENET1K_V1', 'IMAGENET1K_V2'; got 'NOT_A_WEIGHT'"):
        resnet_fused.resnet50(weights="NOT_A_WEIGHT")
    with pytest.raises(TypeError, match="Invalid Weight class"):
        resnet_fused.resnet50(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)


def test_constructor_signature_matches_torchvision():
    import inspect

    for arch in ["resnet18", "resnet50", "resnext101_64x4d", "wide_resnet101_2"]:
        ours = inspect.signature(getattr(resnet_fused, arch))
        theirs = inspect.signature(getattr(torchvision.models, arch))
        assert str(ours) == str(theirs), arch


def test_fused_resnet_class_builds_like_torchvision():
    torch.manual_seed(0)
    tv = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5)
    torch.manual_seed(0)
    fused = resnet_fused.FusedResNet(Bottleneck, [1, 1, 1, 1], num_classes=5)
    assert type(fused.layer1[0]) is resnet_fused.FusedBottleneck
    for (name, a), (_, b) in zip(tv.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), name


def test_registry_lists_torchvisions_resnets_once():
    """The one list of model names (resnet_fused.registry) is torchvision's
    ResNet family, and every name builds a fused model through each entry
    point: the module attribute, get_model, and __all__."""
    family = {
        n for n in torchvision.models.list_models(module=torchvision.models)
        if n.startswith(("resnet", "resnext", "wide_resnet"))
    }
    assert set(resnet_fused.MODEL_NAMES) == family
    assert len(resnet_fused.MODEL_NAMES) == len(family)
    assert resnet_fused.list_models() == list(resnet_fused.MODEL_NAMES)
    for name in resnet_fused.MODEL_NAMES:
        assert name in resnet_fused.__all__
        assert getattr(resnet_fused, name).__name__ == name
    model = resnet_fused.get_model("resnet18", num_classes=7)
    assert isinstance(model, resnet_fused.FusedResNet) and model.fc.out_features == 7
    with pytest.raises(ValueError, match="name must be one of resnet18, .*; got 'vgg16'"):
        resnet_fused.get_model("vgg16")
