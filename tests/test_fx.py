"""fuse() on models not built from torchvision blocks: the torch.fx rewrite,
on ResNets written the way popular write-ups write them, a VGG-style stack,
and timm's ResNets when timm is installed."""
import copy

import pytest
import torch
import torch.nn as nn

import resnet_fused
from resnet_fused.fx import fused_conv_bn, fused_graph_norms
from conftest import NET_TOL, assert_equivalent, device_backend_params, randomize_norms
from test_models import TRAIN_TOL
from writeups import VGGStack, WriteupBasicBlock, WriteupBottleNeck, WriteupResNet



def _writeup_models():
    return {
        "basic": WriteupResNet(WriteupBasicBlock, [2, 2]),
        "bottleneck": WriteupResNet(WriteupBottleNeck, [2, 1]),
        "vgg": VGGStack(),
    }


def _norms_last_in_block(model):
    last = []
    for m in model.modules():
        if isinstance(m, WriteupBasicBlock):
            last.append(m.bn2)
        elif isinstance(m, WriteupBottleNeck):
            last.append(m.residual_function[7])
    return last


def _prepared(name):
    torch.manual_seed(0)
    model = _writeup_models()[name]
    return randomize_norms(model, last_norms=_norms_last_in_block(model))


def _fused_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_conv_bn]


@pytest.mark.parametrize("name,expect_fused", [("basic", 10), ("bottleneck", 12), ("vgg", 5)])
def test_fx_fuse_finds_every_chain(name, expect_fused):
    model = _prepared(name)
    fused, report = resnet_fused.fuse(model, report=True)
    assert isinstance(fused, torch.fx.GraphModule)
    assert len(report.fused) == expect_fused == len(_fused_calls(fused)), str(report)
    assert report.unfused == []
    # nothing left of the chains: no BN module calls, no ReLU/add after them
    assert not [n for n in fused.graph.nodes if n.op == "call_module" and isinstance(
        fused.get_submodule(n.target), (nn.BatchNorm2d, nn.ReLU))]
    assert list(fused.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key
    assert "fused" in str(report)


def test_residual_chains_are_fused_with_the_add_and_relu():
    fused, report = resnet_fused.fuse(_prepared("bottleneck"), report=True)
    with_add = [line for line in report.fused if "add" in line]
    assert len(with_add) == 3  # one per block
    assert all(line.endswith("add → relu") for line in with_add)
    assert "conv2_x.0.residual_function.6 → conv2_x.0.residual_function.7 → add → relu" in report.fused
    assert "conv2_x.0.shortcut.0 → conv2_x.0.shortcut.1" in report.fused
    # the residual operand of the fused call is the shortcut's fused call
    calls = _fused_calls(fused)
    residuals = [c.args[3] for c in calls if c.args[3] is not None]
    assert len(residuals) == 3


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("device, backend", device_backend_params())
@pytest.mark.parametrize("name", ["basic", "bottleneck", "vgg"])
def test_fx_fused_eval_equals_the_model(name, device, backend, fmt):
    model = _prepared(name).eval().to(device)
    fused = resnet_fused.fuse(model).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(device).to(memory_format=fmt)
    with torch.no_grad():
        want = model(x)
        with resnet_fused.backend(backend):
            got = fused(x)
    assert_equivalent(got, want, NET_TOL[torch.float32])


@pytest.mark.parametrize("device, backend", device_backend_params())
@pytest.mark.parametrize("name", ["basic", "bottleneck", "vgg"])
def test_fx_fused_train_equals_the_model(name, device, backend):
    """Two float64 SGD steps: loss, every gradient, parameters and running
    statistics (num_batches_tracked exactly)."""
    model = _prepared(name).double().train().to(device)
    fused = resnet_fused.fuse(model).train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, fused)]
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = torch.randn(4, 3, 12, 12, generator=g, dtype=torch.float64).to(device)
        for m, opt in zip((model, fused), opts):
            opt.zero_grad()
            with resnet_fused.backend(backend):
                m(x).square().mean().backward()
        for (key, p), (_, q) in zip(model.named_parameters(), fused.named_parameters()):
            if key == "c2.bias":  # a conv bias before train-mode BN: its gradient is 0 up to rounding
                scale = model.c2.weight.grad.abs().max()  # of the sums it comes from
                assert p.grad.abs().max() <= 1e-8 * scale and q.grad.abs().max() <= 1e-8 * scale
            else:
                assert_equivalent(q.grad, p.grad, TRAIN_TOL, key)
        for opt in opts:
            opt.step()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(fused.state_dict()[key], value) and value.item() == 2, key
        else:
            assert_equivalent(fused.state_dict()[key], value, TRAIN_TOL, key)


def test_follows_live_module_state_and_state_dict_loads():
    model = _prepared("vgg").eval()
    fused = resnet_fused.fuse(model).eval()
    other = _writeup_models()["vgg"].eval()
    other.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(randomize_norms(copy.deepcopy(model), seed=7).state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = fused(x)
        fused.b1.eps = 0.5  # read at call time, as in the torchvision models
        assert not torch.allclose(fused(x), before)


class Unfusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.c_multi, self.bn_multi = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c_stats, self.bn_stats = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8, track_running_stats=False)
        self.c_reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn_reflect = nn.BatchNorm2d(8)
        self.c_gn, self.gn = nn.Conv2d(8, 8, 1, bias=False), nn.GroupNorm(2, 8)
        self.c_ok, self.bn_ok = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        a = self.bn_a(self.shared(x))
        b = self.bn_b(self.shared(a))  # shared conv, called twice
        y = self.c_multi(b)
        z = self.bn_multi(y) + y  # the conv output has another user
        w = self.bn_stats(self.c_stats(z))
        v = self.bn_reflect(self.c_reflect(w))
        u = self.gn(self.c_gn(v))
        return torch.relu(self.bn_ok(self.c_ok(u)))


def test_unfusable_patterns_are_left_alone_and_reported():
    model = randomize_norms(Unfusable()).eval()
    fused, report = resnet_fused.fuse(model, report=True)
    assert report.fused == ["c_ok → bn_ok → relu"]
    reasons = dict(report.unfused)
    assert reasons["shared"] == "the module is called more than once (shared)"
    assert reasons["c_multi"] == "the convolution's output has other users"
    assert "no running statistics" in reasons["c_stats"]
    assert "padding_mode='reflect'" in reasons["c_reflect"]
    assert "GroupNorm is not nn.BatchNorm2d" in reasons["c_gn"]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert_equivalent(fused(x), model(x), NET_TOL[torch.float32])


def test_in_place_add_into_the_residual_is_not_fused():
    """`identity.add_(bn(conv(x)))` writes into the identity tensor, which may
    be used again: only the conv+BN is fused, the add stays. (torch.fx records
    `a += b` as `a + b`, so `+=` is an ordinary add to it.)"""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            identity = x * 2
            identity.add_(self.bn(self.conv(x)))
            return identity.relu()

    model = randomize_norms(M()).eval()
    fused, report = resnet_fused.fuse(model, report=True)
    assert report.fused == ["conv → bn"]
    assert any(n.op == "call_method" and n.target == "add_" for n in fused.graph.nodes)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert_equivalent(fused(x), model(x), NET_TOL[torch.float32])


class ReadsInputMidChain(nn.Module):
    """The conv's input is read (or, with `mutate`, modified in place) between
    the conv and the end of its chain."""

    def __init__(self, mutate):
        super().__init__()
        self.mutate = mutate
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        x = x * 1.0  # a tensor of the model's own, so mutating it is allowed
        y = self.conv(x)
        if self.mutate:
            x.mul_(0.5)  # before the chain ends: fusing would read the modified x
        finite = torch.isfinite(x).all()  # a plain read; its name starts with "i"
        out = torch.relu(self.bn(y))
        return self.bn2(self.conv2(out * finite + x.mean()))


@pytest.mark.parametrize("mutate", [False, True])
def test_reads_of_the_input_mid_chain_fuse_and_in_place_edits_do_not(mutate):
    model = randomize_norms(ReadsInputMidChain(mutate)).eval()
    fused, report = resnet_fused.fuse(model, report=True)
    if mutate:
        assert report.fused == ["conv2 → bn2"], report
        assert dict(report.unfused)["conv"] == "its input is modified in place before the chain ends"
    else:
        assert report.fused == ["conv → bn → relu", "conv2 → bn2"], report
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert_equivalent(fused(x), model(x), NET_TOL[torch.float32])


def test_untraceable_model_and_nothing_to_fuse_are_clear_errors():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value
                return self.bn(self.conv(x))
            return x

    with pytest.raises(TypeError, match="DataDependent is not built from torchvision ResNet blocks, and torch.fx "
                                        "cannot trace it"):
        resnet_fused.fuse(DataDependent())
    with pytest.raises(ValueError, match="no nn.Conv2d followed by a BatchNorm2d was found"):
        resnet_fused.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="without inplace=True"):
        resnet_fused.fuse(VGGStack(), inplace=True)
    model = VGGStack()
    assert resnet_fused.fuse(model) is not model  # a copy; the original is untouched
    assert all(type(m) is not torch.fx.GraphModule for m in model.modules())


def test_fx_fused_model_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = _prepared("basic").eval()
    fused = resnet_fused.fuse(model).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x), NET_TOL[torch.float32])


def test_torchvision_path_reports_the_converted_modules():
    import torchvision

    _, report = resnet_fused.fuse(torchvision.models.resnet18(), report=True)
    assert report.method == "torchvision/resnet_fused modules"
    assert "layer1.0" in report.fused and len(report.fused) == 1 + 8


@pytest.mark.parametrize("arch", ["resnet50", "resnet26d"])
def test_timm_resnets(arch):
    timm = pytest.importorskip("timm", reason="timm is an optional test dependency: pip install timm")
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(arch, pretrained=False, num_classes=10))
    last = [m.bn3 for m in model.modules() if hasattr(m, "bn3")]
    randomize_norms(model, last_norms=last)
    fused, report = resnet_fused.fuse(model, report=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(report.fused) == len(convs) and report.unfused == [], str(report)
    blocks = {"resnet50": 16, "resnet26d": 8}[arch]
    assert sum(1 for line in report.fused if line.endswith("add → relu")) == blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_equivalent(fused.eval()(x), model.eval()(x), NET_TOL[torch.float32])
    model.train(), fused.train()
    model.double(), fused.double()
    xd = x.double()
    model(xd).sum().backward()
    fused(xd).sum().backward()
    for (key, p), (_, q) in zip(model.named_parameters(), fused.named_parameters()):
        assert_equivalent(q.grad, p.grad, TRAIN_TOL, key)


def test_memory_efficient_on_an_fx_fused_model(monkeypatch):
    """memory_efficient works on what fuse() returns for any model: its fused
    calls then recompute their convolutions in backward (ops.conv_bn_act_train),
    with the same float64 gradients."""
    model = _prepared("basic").double().train()
    fused = resnet_fused.fuse(model).train()
    assert resnet_fused.memory_efficient(fused) is fused
    calls = []
    real = resnet_fused.ops.conv_bn_act_train
    monkeypatch.setattr(resnet_fused.ops, "conv_bn_act_train", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    fused(x).square().mean().backward()
    model(x).square().mean().backward()
    assert len(calls) == len(_fused_calls(fused)) > 0
    assert_same_gradients(fused, model)
    resnet_fused.memory_efficient(fused, False)
    calls.clear()
    fused(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize("arch", ["efficientnet_b0", "regnety_002", "mobilenetv3_small_100", "resnetv2_50"])
def test_timm_norm_act_models(arch):
    """timm's BatchNormAct2d (a BatchNorm2d carrying its activation): conv+BN
    fuse, with the activation where it is ReLU, else as its own op after the
    fused call; outputs and float64 gradients equal the model's."""
    timm = pytest.importorskip("timm", reason="timm is an optional test dependency: pip install timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(arch, pretrained=False, num_classes=10))
    norm_acts = [m for m in model.modules() if type(m) is BatchNormAct2d]
    fused, report = resnet_fused.fuse(model, report=True)
    assert report.fused, str(report)
    fused_norms = fused_graph_norms(fused)
    assert any(type(n) is BatchNormAct2d for n in fused_norms) == bool(norm_acts)
    for n in fused_norms:  # the norm modules the fused calls read keep their act and drop
        if type(n) is BatchNormAct2d:
            assert isinstance(n.act, nn.Module) and isinstance(n.drop, nn.Module)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_equivalent(fused.eval()(x), model.eval()(x), NET_TOL[torch.float32])
    model.train().double(), fused.train().double()
    xd = x.double()
    model(xd).sum().backward()
    fused(xd).sum().backward()
    assert_same_gradients(fused, model)


def assert_same_gradients(fused, model, rtol=TRAIN_TOL, atol=1e-9):
    """Every float64 gradient of an fx-fused model equals the model's, judged
    against the largest one (`atol` is a fraction of it): a bias feeding a conv
    and then a train-mode BN (a conv bias before BN; a BN's bias before a 1x1
    conv and BN) has a gradient of 0 up to rounding, as the next BN removes any
    per-channel shift. Also for a lower-precision model against a float64
    copy (tests/ops/test_conv_bn_act_grad.py: then rtol/atol are its own)."""
    scale = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    fused_params = dict(fused.named_parameters())  # a GraphModule orders its modules by first use
    assert fused_params.keys() == dict(model.named_parameters()).keys()
    for key, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(
                fused_params[key].grad.to(p.grad.dtype), p.grad, rtol=rtol, atol=atol * scale,
                msg=lambda m, key=key: f"{key}: {m}",
            )
