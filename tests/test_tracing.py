"""torch.fx on fused models, as torchvision's own model test
(`test/test_models.py::_check_fx_compatible`) and its feature extraction
(`torchvision.models.feature_extraction`) use it: the traced graph runs the
fused ops and gives the model's output; extracted features and what hooks
see have torchvision's values and layout; the model's mode is left alone."""
import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import resnet_fused
from resnet_fused import layers
from conftest import NET_TOL, assert_equivalent, randomize_norms


def _pair(arch, seed=0):
    torch.manual_seed(seed)
    fused = getattr(resnet_fused, arch)()
    tv = getattr(torchvision.models, arch)()
    randomize_norms(fused, seed)
    tv.load_state_dict(fused.state_dict())
    return tv.eval(), fused.eval()


def _fused_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is layers.conv_norm_act]


@pytest.mark.parametrize("arch", resnet_fused.MODEL_NAMES)
def test_symbolic_trace_runs_the_fused_ops_and_matches_the_model(arch):
    tv, fused = _pair(arch)
    x = torch.randn(1, 3, 64, 64)
    gm = torch.fx.symbolic_trace(fused)
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(_fused_calls(gm)) == len(convs)  # every conv+BN pair is one fused call
    with torch.no_grad():
        eager = fused(x)
        traced = gm(x)
    # torchvision's check: assert_close at default tolerances
    torch.testing.assert_close(traced, eager)
    assert_equivalent(traced, tv(x), NET_TOL[torch.float32])


def test_traced_graph_follows_train_and_eval_like_the_module():
    tv, fused = _pair("resnet18")
    gm = torch.fx.symbolic_trace(fused)
    x = torch.randn(4, 3, 32, 32)
    gm.train()
    tv.train()
    assert_equivalent(gm(x), tv(x), NET_TOL[torch.float32])
    for a, b in zip(fused.modules(), tv.modules()):  # running statistics moved alike
        if isinstance(a, torch.nn.BatchNorm2d):
            assert_equivalent(a.running_mean, b.running_mean, NET_TOL[torch.float32])


def test_feature_extraction_gives_torchvisions_features_and_keeps_the_mode():
    tv, fused = _pair("resnet50")
    nodes = {"layer2": "c3", "layer4": "c5"}
    # the node names users pick features by: the stages and the head (a
    # block's inner nodes differ: one fused call where torchvision has conv,
    # bn and relu)
    def modules_of(names):  # "layer2.3.relu_2" -> {"layer2", "layer2.3"}; the stem's relu is fused
        return {".".join(n.split(".")[:k]) for n in names for k in (1, 2) if "." in n or k == 1} - {"relu"}

    for fused_names, tv_names in zip(get_graph_node_names(fused), get_graph_node_names(tv)):
        assert modules_of(tv_names) <= modules_of(fused_names)
    for mode in (False, True):
        fused.train(mode)
        tv.train(mode)
        fx_fused = create_feature_extractor(fused, nodes)
        fx_tv = create_feature_extractor(tv, nodes)
        assert fused.training is mode and fx_fused.training is mode
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
            with torch.no_grad():
                got, want = fx_fused(x), fx_tv(x)
            assert got.keys() == want.keys()
            for k in want:
                assert_equivalent(got[k], want[k], NET_TOL[torch.float32])
                assert got[k].is_contiguous(memory_format=fmt) == want[k].is_contiguous(memory_format=fmt), (k, fmt)
                if fmt == torch.contiguous_format:
                    got[k].view(2, -1)  # NCHW in, NCHW out: flattening works as on torchvision's


def test_hooks_see_torchvisions_layout():
    tv, fused = _pair("resnet18")
    seen = {}
    for name, model in (("fused", fused), ("tv", tv)):
        model.layer2.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused(x)
        tv(x)
    assert seen["fused"].is_contiguous() and seen["tv"].is_contiguous()
    assert_equivalent(seen["fused"], seen["tv"], NET_TOL[torch.float32])
    seen["fused"].view(1, -1)


def test_input_backprop_through_the_traced_graph():
    # torchvision's test ends with a backward from the output to the input
    tv, fused = _pair("resnet18")
    gm = torch.fx.symbolic_trace(fused)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    x_tv = x.detach().clone().requires_grad_()
    gm.double()(x).sum().backward()
    tv.double()(x_tv).sum().backward()
    assert_equivalent(x.grad, x_tv.grad, NET_TOL[torch.float32])
