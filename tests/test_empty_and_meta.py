"""Empty batches and meta tensors behave as torch does: N=0 gives an empty
output, leaves running statistics and parameters alone, and trains (zero
gradients); meta tensors give shapes without running anything."""
import copy

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused import ops
from conftest import device_backend_params, randomize_norms


def pair(arch="resnet18"):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(torchvision.models, arch)())
    return tv, resnet_fused.fuse(copy.deepcopy(tv))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("device, backend", device_backend_params())
def test_train_batch_norm_act_on_an_empty_batch(device, backend, residual, relu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(0, 4, 3, 3, generator=g).to(device).requires_grad_()
    weight = (torch.rand(4, generator=g) + 0.5).to(device).requires_grad_()
    bias = torch.randn(4, generator=g).to(device).requires_grad_()
    mean, var = torch.randn(4, generator=g).to(device), (torch.rand(4, generator=g) + 0.5).to(device)
    saved = mean.clone(), var.clone()
    res = torch.randn(0, 4, 3, 3, generator=g).to(device) if residual else None
    with resnet_fused.backend(backend):
        out = ops.batch_norm_act(x, weight, bias, mean, var, True, 0.1, 1e-5, res, relu)
    ref = torch.nn.functional.batch_norm(x, saved[0].clone(), saved[1].clone(), weight, bias, True, 0.1, 1e-5)
    assert out.shape == ref.shape == x.shape
    assert torch.equal(mean, saved[0]) and torch.equal(var, saved[1])  # F.batch_norm: unchanged
    out.sum().backward()
    assert x.grad.shape == x.shape
    zeros = torch.zeros(4, device=device)
    assert torch.equal(weight.grad, zeros) and torch.equal(bias.grad, zeros)


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("device, backend", device_backend_params())
def test_models_on_an_empty_batch(device, backend, memory_efficient):
    """Eval and train, with and without memory_efficient: torchvision's
    empty logits, unchanged state (num_batches_tracked counts the call, as in
    torch), and an optimizer step that changes nothing."""
    tv, fused = pair()
    tv, fused = tv.to(device), fused.to(device)
    if memory_efficient:
        resnet_fused.memory_efficient(fused)
    x = torch.randn(0, 3, 32, 32, device=device)
    with resnet_fused.backend(backend):
        with torch.no_grad():
            assert fused.eval()(x).shape == tv.eval()(x).shape == (0, 1000)
        out, ref = fused.train()(x), tv.train()(x)
        assert out.shape == ref.shape == (0, 1000)
        for (name, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
            assert torch.equal(a, b), name
        out.sum().backward()
    for p in fused.parameters():
        assert p.grad is None or not p.grad.any()


def test_meta_tensors_run_like_torchvision():
    tv, fused = pair("resnet50")
    tv, fused = tv.to("meta"), fused.to("meta")
    x = torch.empty(2, 3, 64, 64, device="meta")
    for mode in ("eval", "train"):
        getattr(tv, mode)(), getattr(fused, mode)()
        out, ref = fused(x), tv(x)
        assert out.device.type == "meta" and out.shape == ref.shape
    y = ops.conv_bn_act(x, torch.empty(8, 3, 3, 3, device="meta"), torch.empty(8, device="meta"),
                        torch.empty(8, device="meta"), padding=1)
    assert y.shape == (2, 8, 64, 64) and y.device.type == "meta"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on another device: no effect on meta
        assert fused.eval()(x).shape == (2, 1000)
