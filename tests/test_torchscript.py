"""TorchScript, as torchvision's own model test (`test/test_models.py`,
`_check_jit_scriptable`) uses it: `torch.jit.script` compiles every fused
model — it compiles torchvision's forward, unfused, on the same parameters
(the fused forward is Python TorchScript cannot compile) — and the scripted
model saves, loads and gives torchvision's numbers; `torch.jit.trace` records
the fused ops."""
import copy
import io
import warnings

import pytest
import torch
import torchvision

import resnet_fused
from conftest import NET_TOL, assert_equivalent, randomize_norms


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.(script|trace|save|load).*deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def pair(arch):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(torchvision.models, arch)()).eval()
    return tv, resnet_fused.fuse(copy.deepcopy(tv)).eval()


@pytest.mark.parametrize("arch", resnet_fused.MODEL_NAMES)
def test_script_save_load_like_torchvisions_model_test(arch):
    tv, fused = pair(arch)
    scripted = torch.jit.script(fused)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tv(x)
        assert torch.equal(scripted(x), ref)  # torchvision's forward, torchvision's bits
        assert torch.equal(loaded(x), ref)
        assert_equivalent(fused(x), ref, NET_TOL[torch.float32])  # the eager model is still fused
    assert type(fused.layer1[0]) in (resnet_fused.FusedBasicBlock, resnet_fused.FusedBottleneck)


def test_scripting_shares_parameters_and_leaves_the_model_fused():
    tv, fused = pair("resnet18")
    scripted = torch.jit.script(fused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = scripted(x)
        fused.fc.bias.add_(1.0)  # an edit the scripted model must see: the same tensors
        torch.testing.assert_close(scripted(x), before + 1.0, rtol=0, atol=1e-5)
    # input backprop through the scripted model, as torchvision's test checks
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    scripted(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_trace_records_the_fused_ops(arch):
    """torch.jit.trace takes the composed path (the oneDNN weight cache
    cannot be traced): one fused epilogue per conv+BN pair in the graph
    (`bn_eval_add_relu_`, the BN folded in C++: no fold ops), and
    torchvision's numbers on another batch size."""
    tv, fused = pair(arch)
    with torch.no_grad():
        traced = torch.jit.trace(fused, torch.randn(2, 3, 32, 32))
        x = torch.randn(3, 3, 32, 32)
        assert_equivalent(traced(x), tv(x), NET_TOL[torch.float32])
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    graph = traced.inlined_graph.str()
    if resnet_fused.backends.resolve_name("conv_bn_act", torch.device("cpu")) == "cpu":
        assert graph.count("resnet_fused::bn_eval_add_relu_") == convs
        assert "aten::rsqrt" not in graph
    assert "batch_norm" not in graph
