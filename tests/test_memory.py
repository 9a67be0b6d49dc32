"""memory_efficient(): training keeps no convolution outputs for backward
(ops.conv_bn_act_train recomputes them) and still gives torchvision's numbers."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from resnet_fused import ops
from conftest import OP_TOL, PAIRS, assert_equivalent, device_backend_params, pair_marks
from test_models import build_pair, train_steps


def saved_activation_bytes(model, x):
    """Bytes of the distinct storages autograd keeps for backward during one
    forward, not counting the model's own parameters and buffers."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(n for ptr, n in seen.items() if ptr not in own)


def conv_output_bytes(model, x):
    sizes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.untyped_storage().nbytes()))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(sizes)


# Every (device, backend) pair on resnet18 (Basic blocks); resnet50
# (Bottleneck blocks, downsample projections) on the eager backend only, to
# keep CI time down — the backends differ only in the BN half, which
# resnet18 covers.
ARCH_BACKENDS = [
    pytest.param(arch, d, b, marks=pair_marks(d, b), id=f"{arch}-{d}-{b}")
    for d, b in PAIRS for arch in ("resnet18", "resnet50") if arch == "resnet18" or b == "eager"
]


@pytest.mark.parametrize("arch, device, backend", ARCH_BACKENDS)
def test_saves_exactly_the_convolution_outputs_less(arch, device, backend):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)().train().to(device)
    x = torch.randn(2, 3, 32, 32).to(device)
    eager = saved_activation_bytes(copy.deepcopy(tv), x)
    fused = resnet_fused.fuse(copy.deepcopy(tv))
    lean = resnet_fused.memory_efficient(resnet_fused.fuse(copy.deepcopy(tv)))
    with resnet_fused.backend(backend):
        fused_bytes = saved_activation_bytes(fused, x)
        lean_bytes = saved_activation_bytes(lean, x)
    assert fused_bytes == eager  # the plain fused path keeps what torchvision keeps
    assert eager - lean_bytes == conv_output_bytes(tv, x)  # minus every conv output
    assert lean_bytes < 0.6 * eager


@pytest.mark.parametrize("arch, device, backend", ARCH_BACKENDS)
def test_memory_efficient_training_matches_torchvision(arch, device, backend):
    tv, fused = build_pair(arch)
    assert resnet_fused.memory_efficient(fused) is fused
    flagged = [m._resnet_fused_recompute for m in fused.modules()
               if isinstance(m, (resnet_fused.FusedResNet, resnet_fused.FusedBasicBlock, resnet_fused.FusedBottleneck))]
    assert len(flagged) > 1 and all(flagged)
    with resnet_fused.backend(backend):
        train_steps(tv, fused, (2, 3, 48, 48), steps=2, memory_format=torch.channels_last, device=device)


def test_memory_efficient_can_be_switched_off_and_leaves_eval_alone():
    x = torch.randn(2, 3, 32, 32)
    tv, fused = build_pair("resnet18")
    resnet_fused.memory_efficient(fused)
    assert saved_activation_bytes(fused.train(), x) < saved_activation_bytes(copy.deepcopy(tv).train(), x)
    resnet_fused.memory_efficient(fused, False)
    assert saved_activation_bytes(fused, x) == saved_activation_bytes(copy.deepcopy(tv).train(), x)
    # eval runs ops.conv_bn_act whatever the flag: compare on a fresh pair,
    # since the train forwards above moved only the fused model's running stats
    tv, fused = build_pair("resnet18")
    resnet_fused.memory_efficient(fused)
    tv.eval(), fused.eval()
    with torch.no_grad():
        assert_equivalent(fused(x), tv(x), 1e-4)


def _inputs(dtype, memory_format, with_residual, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, 9, 7, generator=g, dtype=torch.float64).to(device, dtype).to(memory_format=memory_format)
    w = (torch.randn(10, 6, 3, 3, generator=g, dtype=torch.float64) * 0.2).to(device, dtype)
    gamma = (torch.rand(10, generator=g, dtype=torch.float64) + 0.5).to(device)
    beta = torch.randn(10, generator=g, dtype=torch.float64).to(device)
    res = torch.randn(3, 10, 5, 4, generator=g, dtype=torch.float64).to(device, dtype) if with_residual else None
    return x, w, gamma, beta, res


CONV = dict(stride=2, padding=1, dilation=1, groups=2)


@pytest.mark.parametrize("device, backend", device_backend_params())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("epilogue", ["relu", "residual_relu", "residual", "none"])
def test_conv_bn_act_train_matches_composition(epilogue, memory_format, device, backend):
    """Outputs, all five gradients and the running statistics equal conv2d
    followed by batch_norm_act, in float64 and fp32."""
    relu, with_res = epilogue.endswith("relu"), epilogue.startswith("residual")
    for dtype in (torch.float64, torch.float32):
        x, w, gamma, beta, res = _inputs(dtype, memory_format, with_res, device=device)
        results = []
        for fused in (False, True):
            leaves = [t.clone().to(dtype if t is not gamma and t is not beta else dtype).requires_grad_()
                      if t is not None else None for t in (x, w, gamma, beta, res)]
            rm, rv = torch.zeros(10, dtype=dtype, device=device), torch.ones(10, dtype=dtype, device=device)
            with resnet_fused.backend(backend):
                if fused:
                    out = ops.conv_bn_act_train(*leaves[:4], rm, rv, 0.1, 1e-5, leaves[4], relu, **CONV)
                else:
                    y = F.conv2d(leaves[0], leaves[1], None, 2, 1, 1, 2)
                    out = ops.batch_norm_act(y, leaves[2], leaves[3], rm, rv, True, 0.1, 1e-5, leaves[4], relu)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=dtype).to(device)
            grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad)
            results.append((out, rm, rv, *grads))
        tol = 1e-12 if dtype == torch.float64 else OP_TOL[torch.float32]
        for name, a, b in zip(["out", "running_mean", "running_var", "dx", "dw", "dgamma", "dbeta", "dres"],
                              results[1], results[0]):
            assert_equivalent(a, b, tol, f"{dtype} {name}")


def test_conv_bn_act_train_gradcheck():
    x, w, gamma, beta, res = _inputs(torch.float64, torch.contiguous_format, True, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta, res)]
    fn = lambda x, w, g, b, r: ops.conv_bn_act_train(x, w, g, b, None, None, 0.1, 1e-5, r, True, **CONV)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_conv_bn_act_train_bad_input_names_the_argument():
    x, w, gamma, beta, res = _inputs(torch.float32, torch.contiguous_format, True)
    with pytest.raises(ValueError, match="bn_weight must have shape \\(10,\\)"):
        ops.conv_bn_act_train(x, w, gamma[:5].float(), beta.float(), None, None, **CONV)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.conv_bn_act_train(x, w, gamma.float(), beta.float(), None, None, residual=res[:, :, :2], **CONV)
    with pytest.raises(ValueError, match="x has 12 channels but weight expects 6"):
        ops.conv_bn_act_train(x, w, gamma.float(), beta.float(), None, None, stride=2, padding=1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.conv_bn_act_train(x[:1, :, :1, :1], w[:, :, :1, :1].contiguous(), gamma.float(), beta.float(), None, None,
                              groups=2)
