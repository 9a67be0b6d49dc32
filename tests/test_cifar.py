"""The paper's CIFAR ResNets against a hand-written eager model written the way
the common write-ups do (LambdaLayer + F.pad for option A)."""
import copy

import pytest
import torch
import torch.nn as nn

import resnet_fused
from resnet_fused.ops import common
from conftest import NET_TOL, assert_equivalent, device_backend_params, pair_marks, randomize_norms
from test_models import train_steps
from writeups import RefResNet

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def cifar_pair(depth=20, shortcut="A", plain=False):
    fused = resnet_fused.cifar_resnet(depth, shortcut=shortcut, plain=plain)
    ref = RefResNet((depth - 2) // 6, option=shortcut, plain=plain)
    randomize_norms(fused, last_norms=[b.bn2 for b in fused.modules() if isinstance(b, resnet_fused.CifarBasicBlock)])
    ref.load_state_dict(fused.state_dict(), strict=True)  # same names, both ways
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


# the paper's Table 6 parameter counts (option A), rounded as printed there
@pytest.mark.parametrize("depth,millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7), (1202, 19.4)])
def test_constructors_build_the_papers_networks(depth, millions):
    model = getattr(resnet_fused, f"cifar_resnet{depth}")()
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 2 if millions < 1 else 1) == millions
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n + 1 convolutions + the fc layer, option A adds none
    assert model.fc.out_features == 10
    blocks = [m for m in model.modules() if isinstance(m, resnet_fused.CifarBasicBlock)]
    assert len(blocks) == 3 * (depth - 2) // 6


def test_option_b_and_plain_structure():
    b = resnet_fused.cifar_resnet20(shortcut="B", num_classes=100)
    projections = [m for m in b.modules() if isinstance(m, resnet_fused.CifarBasicBlock) and hasattr(m, "shortcut")]
    assert len(projections) == 2 and b.fc.out_features == 100
    assert projections[0].shortcut[0].weight.shape == (32, 16, 1, 1)
    plain = resnet_fused.cifar_resnet20(plain=True)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in resnet_fused.cifar_resnet20().parameters())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["A", "B", "plain"])
@pytest.mark.parametrize("device, backend", device_backend_params())
def test_eval_matches_hand_written_model(device, backend, variant, fmt):
    ref, fused = cifar_pair(20, "A" if variant == "plain" else variant, plain=variant == "plain")
    # 16x16 keeps the interpreted triton runs short; layer3 still sees 4x4
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(device).to(memory_format=FORMATS[fmt])
    ref.eval().to(device, memory_format=FORMATS[fmt]), fused.eval().to(device, memory_format=FORMATS[fmt])
    with torch.no_grad(), resnet_fused.backend(backend):
        out = fused(x)
    with torch.no_grad():
        want = ref(x)
    assert_equivalent(out, want, NET_TOL[torch.float32])


@pytest.mark.parametrize("variant", ["A", "B", "plain"])
@pytest.mark.parametrize("device, backend", device_backend_params())
def test_train_matches_hand_written_model(device, backend, variant):
    """Three float64 SGD steps: loss, every gradient, parameters, running stats."""
    ref, fused = cifar_pair(20, "A" if variant == "plain" else variant, plain=variant == "plain")
    with resnet_fused.backend(backend):
        train_steps(ref, fused, (4, 3, 16, 16), memory_format=torch.channels_last, device=device)


@pytest.mark.parametrize("depth", [32, 56, 110])
def test_deeper_networks_match(depth):
    ref, fused = cifar_pair(depth)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_equivalent(fused.eval()(x), ref.eval()(x), NET_TOL[torch.float32])


# the kernel backends of each device, which read the padded shortcut in place
KERNEL_BACKENDS = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}


@pytest.mark.parametrize("device", [pytest.param(d, marks=pair_marks(d, "triton"), id=d) for d in KERNEL_BACKENDS])
def test_option_a_shortcut_is_never_materialised(monkeypatch, device):
    """The zero-padded shortcut tensor is never built in Python on the kernel
    backends of the device (cpu and triton on CPU tensors; cuda, whose CUDA
    epilogue pads inside its op, and triton on CUDA tensors), in eval (with
    and without grad: ops/conv_grad.py's forward is the kernel's) or train:
    the cpu and triton kernels read the stride-2 view in place."""
    calls = []
    real = common.pad_residual

    def spy(residual, channels, offset):
        if residual is not None and residual.shape[1] != channels:
            calls.append(tuple(residual.shape))
        return real(residual, channels, offset)

    monkeypatch.setattr(common, "pad_residual", spy)
    _, fused = cifar_pair(20)
    fused.to(device)
    x = torch.randn(2, 3, 16, 16).to(device)
    for backend in KERNEL_BACKENDS[device]:
        with resnet_fused.backend(backend):
            with torch.no_grad():
                fused.eval()(x)
            fused.eval()(x).sum().backward()
            fused.train()(x).sum().backward()
    assert calls == []
    with resnet_fused.backend("eager"):  # the reference composition does build it: the spy sees it
        with torch.no_grad():
            fused.eval()(x)
    assert calls == [(2, 16, 8, 8), (2, 32, 4, 4)]


def test_memory_efficient_cifar():
    ref, fused = cifar_pair(20, "B")
    assert resnet_fused.memory_efficient(fused) is fused
    assert all(m._resnet_fused_recompute for m in fused.modules() if isinstance(m, resnet_fused.CifarBasicBlock))
    train_steps(ref, fused, (4, 3, 16, 16), steps=2)


def test_fuse_and_unfuse_on_cifar_models():
    model = resnet_fused.cifar_resnet20()
    assert resnet_fused.fuse(model, inplace=True) is model  # already fused: nothing to do
    with pytest.raises(ValueError, match="CIFAR ResNets have no unfused twin"):
        resnet_fused.unfuse(model)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="shortcut must be 'A' .* or 'B'"):
        resnet_fused.cifar_resnet20(shortcut="C")
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        resnet_fused.cifar_resnet(21)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        resnet_fused.cifar_resnet56(num_classes=0)
    with pytest.raises(TypeError):
        resnet_fused.cifar_resnet20(10)  # keyword-only, as the torchvision builders' options
    with pytest.raises(ValueError, match="blocks_per_stage must be a positive int"):
        resnet_fused.CifarResNet(0)
    with pytest.raises(ValueError, match="memory_efficient: model \\(Linear\\) contains no resnet_fused modules"):
        resnet_fused.memory_efficient(nn.Linear(2, 2))


def test_state_dict_round_trip_keeps_outputs():
    ref, fused = cifar_pair(20)
    again = resnet_fused.cifar_resnet20()
    again.load_state_dict(copy.deepcopy(fused.state_dict()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), fused.eval()(x))
