"""ops.conv_bn_act with autograd recording (BN-in-eval fine-tuning, frozen BN):
the backward of ops/conv_grad.py checked by float64 gradcheck, each backend's
fp32 gradients against float64 autograd of the reference with the fused
forward actually taken, NaN masks, and fused ResNets with frozen BN against
torchvision."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused import ops
from resnet_fused.ops import common, conv_grad, reference
from conftest import NET_TOL, OP_TOL, assert_equivalent, device_backend_params, randomize_norms
from test_conv_bn_act import make_inputs
from test_fx import assert_same_gradients
from test_models import build_pair
from test_nonfinite import assert_same_masks

# (N, C, H, W, K, R, stride, padding, dilation, groups), tiny: the triton
# backend runs in the interpreter on CPU
CONVS = {
    "3x3": (2, 4, 5, 5, 6, 3, 1, 1, 1, 1),
    "stride2": (2, 4, 5, 5, 8, 3, 2, 1, 1, 1),
    "groups2": (2, 4, 5, 5, 6, 3, 1, 1, 1, 2),
    "dilation2": (2, 4, 6, 5, 6, 3, 1, 2, 2, 1),
}
# (conv, residual, relu); residual "narrow": C_r = C channels at offset 1, for
# stride 2 the option-A shortcut x[:, :, ::2, ::2] (a strided view)
CASES = {
    "relu": ("3x3", None, True),
    "residual_relu": ("3x3", "full", True),
    "residual": ("3x3", "full", False),
    "narrow_relu": ("stride2", "narrow", True),
    "stride2_residual": ("stride2", "full", False),
    "groups2_residual_relu": ("groups2", "full", True),
    "dilation2_narrow": ("dilation2", "narrow", False),
}
NAMES = ("x", "weight", "scale", "shift", "residual")


def _case(name, dtype=torch.float32, memory_format=torch.contiguous_format, device="cpu"):
    """(leaves, residual, relu, conv kwargs, offset): `leaves` the five
    tensors gradients are taken of (the narrow residual's leaf is x itself
    for the option-A view, whose gradient then adds to x's)."""
    conv_name, kind, relu = CASES[name]
    shape = CONVS[conv_name]
    x, w, scale, shift, res, conv = make_inputs(shape, dtype, memory_format, kind == "full", device=device)
    # fp32 vectors (what the models pass), double for gradcheck
    scale, shift = (t.to(torch.promote_types(dtype, torch.float32)) for t in (scale, shift))
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, scale, shift, res)]
    offset = None
    if kind == "narrow":
        offset = 1
        if conv["stride"] == 2:
            leaves[4] = None  # the shortcut is a view of x: its gradient reaches x's
        else:
            g = torch.Generator().manual_seed(5)
            n, c, h, w_ = x.shape
            leaves[4] = torch.randn(n, c, h, w_, generator=g).to(device, dtype).requires_grad_()
    return leaves, relu, conv, offset


def _residual(leaves, conv, offset):
    x, res = leaves[0], leaves[4]
    if offset is not None and res is None:
        return x[:, :, ::2, ::2]
    return res


def _reference_run(relu, conv, channels, offset):
    """The Function's forward as the eager reference: float64 stays float64."""

    def run(x, weight, scale, shift, residual):
        residual = common.pad_residual(residual, channels, offset or 0)
        return reference.conv_bn_act(x, weight, scale, shift, residual, relu, *_conv_args(conv))

    return run


def _conv_args(conv):
    pair = lambda v: (v, v)  # noqa: E731
    return pair(conv["stride"]), pair(conv["padding"]), pair(conv["dilation"]), conv["groups"]


@pytest.mark.parametrize("frozen", [False, True], ids=["all", "frozen_scale_shift"])
@pytest.mark.parametrize("name", CASES)
def test_gradcheck_of_the_backward_formula(name, frozen):
    """The Function's backward on every input, in float64, with the reference as its forward."""
    leaves, relu, conv, offset = _case(name, torch.float64)
    if frozen:  # the frozen-BN path: no convolution recomputed for scale
        leaves[2].requires_grad_(False), leaves[3].requires_grad_(False)
    channels = leaves[1].shape[0]
    run = _reference_run(relu, conv, channels, offset)
    fn = lambda x, w, s, b, r: conv_grad.conv_bn_act(  # noqa: E731
        run, x, w, s, b, _residual([x, w, s, b, r], conv, offset), relu, *_conv_args(conv), offset
    )
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)
    if name == "narrow_relu":  # the backward is itself differentiable (double backward, torch.func)
        assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.fixture
def reference_fallbacks(monkeypatch):
    """The kernel backends' decisions to run the reference composition
    instead of their kernels, one bool per call."""
    taken = []
    decide = common.conv_bn_act_needs_reference
    monkeypatch.setattr(common, "conv_bn_act_needs_reference", lambda *a: taken.append(decide(*a)) or taken[-1])
    return taken


def _assert_fused(out, backend, taken):
    """The kernel backends ran their kernels under the Function; eager is its
    own differentiable reference (no Function around it)."""
    if backend == "eager":
        assert taken == [] and type(out.grad_fn).__name__ != "_ConvBnActBackward"
    else:
        assert taken and not any(taken), f"{backend}: the reference fallback ran"
        assert type(out.grad_fn).__name__ == "_ConvBnActBackward"


def _grads(leaves, relu, conv, offset, grad, backend=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    kwargs = dict(conv, residual_channel_offset=offset)
    if backend is None:  # float64 autograd of the reference composition
        leaves = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
        res = common.pad_residual(_residual(leaves, conv, offset), leaves[1].shape[0], offset or 0)
        y = F.conv2d(leaves[0], leaves[1], None, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
        out = y * leaves[2].view(1, -1, 1, 1) + leaves[3].view(1, -1, 1, 1) + (0 if res is None else res)
        out = torch.relu(out) if relu else out
    else:
        with resnet_fused.backend(backend):
            out = ops.conv_bn_act(*leaves[:4], _residual(leaves, conv, offset), relu, **kwargs)
    out.backward(grad.to(out.dtype))
    return out, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("device, backend", device_backend_params())
def test_fp32_gradients_match_float64_on_the_fused_path(device, backend, name, memory_format, reference_fallbacks):
    leaves, relu, conv, offset = _case(name, torch.float32, memory_format, device)
    shape = ops.conv_out_shape(leaves[0], leaves[1], *_conv_args(conv)[:3])
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    ref, want = _grads(leaves, relu, conv, offset, grad)
    out, got = _grads(leaves, relu, conv, offset, grad, backend)
    _assert_fused(out, backend, reference_fallbacks)
    assert_equivalent(out, ref, OP_TOL[torch.float32])
    for what, a, b in zip(NAMES, got, want):
        if b is not None:
            assert a.dtype == leaves[NAMES.index(what)].dtype, what
            assert_equivalent(a, b, OP_TOL[torch.float32], f"grad of {what}")


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_autocast_gradients_flow_back_through_its_casts(device, backend, reference_fallbacks):
    """Under bf16 autocast the Function sees bf16 x and weight (ops.check_conv
    casts them) and fp32 scale, shift and residual: every gradient comes back
    in its fp32 leaf's dtype, within bf16 accuracy of float64."""
    leaves, relu, conv, offset = _case("residual_relu", torch.float32, device=device)
    grad = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    ref, want = _grads(leaves, relu, conv, offset, grad)
    with torch.autocast(device, torch.bfloat16):
        out, got = _grads(leaves, relu, conv, offset, grad, backend)
    assert out.dtype == torch.bfloat16
    _assert_fused(out, backend, reference_fallbacks)
    for what, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float32, what
        assert_equivalent(a, b, OP_TOL[torch.bfloat16], f"grad of {what}")


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_nan_reaches_the_gradients_autograd_gives(device, backend, reference_fallbacks):
    """NaN in x and in the residual: NaN outputs pass their gradient through
    the ReLU (threshold_backward), the weight and scale gradients touching
    them are NaN; every mask as float64 autograd has it."""
    leaves, relu, conv, offset = _case("residual_relu", torch.float32, device=device)
    with torch.no_grad():
        leaves[0][0, 1, 2, 2] = float("nan")
        leaves[4][1, 3, 0, 4] = float("nan")
    grad = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    ref, want = _grads(leaves, relu, conv, offset, grad)
    out, got = _grads(leaves, relu, conv, offset, grad, backend)
    _assert_fused(out, backend, reference_fallbacks)
    assert torch.isnan(want[1]).any() and torch.isnan(want[2]).any()
    assert_same_masks(out.double(), ref, OP_TOL[torch.float32])
    for what, a, b in zip(NAMES, got, want):
        assert_same_masks(a.double(), b, OP_TOL[torch.float32])


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_torch_func_grad_gives_the_same_gradients(device, backend):
    """torch.func.grad (a functorch transform: the reference composition
    serves, common.transformed) gives autograd's gradients."""
    leaves, relu, conv, offset = _case("residual_relu", torch.float32, device=device)
    x, w, scale, shift, res = (t.detach() for t in leaves)
    grad = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    _, want = _grads(leaves, relu, conv, offset, grad)
    with resnet_fused.backend(backend):
        got = torch.func.grad(
            lambda w, scale: (ops.conv_bn_act(x, w, scale, shift, res, relu, **conv) * grad.float()).sum(),
            argnums=(0, 1),
        )(w, scale)
    for what, a, b in zip(("weight", "scale"), got, want[1:3]):
        assert_equivalent(a, b, OP_TOL[torch.float32], f"grad of {what}")


@pytest.mark.parametrize("needs_scale", [False, True], ids=["frozen", "scale_grad"])
def test_the_convolution_is_recomputed_only_for_a_scale_gradient(needs_scale, monkeypatch):
    leaves, relu, conv, offset = _case("residual_relu")
    leaves[2].requires_grad_(needs_scale)
    leaves[3].requires_grad_(needs_scale)
    with resnet_fused.backend("cpu"):
        out = ops.conv_bn_act(*leaves[:4], leaves[4], relu, **conv)
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    out.sum().backward()
    assert len(calls) == int(needs_scale)
    assert (leaves[2].grad is not None) == needs_scale


def _loss_and_grads(model, x, target, backend="auto"):
    model.zero_grad(set_to_none=True)
    with resnet_fused.backend(backend):
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    return loss


def _assert_like_torchvision_in_float64(fused, tv, x, target, backend):
    """fp32 gradients of the fused model and of torchvision, each judged
    against torchvision's float64 ones (NET_TOL of the largest gradient)."""
    tv64 = copy.deepcopy(tv).double()
    loss64 = _loss_and_grads(tv64, x.double(), target)
    for model, b in ((tv, "auto"), (fused, backend)):
        loss = _loss_and_grads(model, x, target, b)
        assert_equivalent(loss, loss64, NET_TOL[torch.float32], "loss")
        assert_same_gradients(model, tv64, rtol=NET_TOL[torch.float32], atol=NET_TOL[torch.float32])


@pytest.mark.parametrize("device, backend", device_backend_params(("cpu", "triton"), devices=("cpu",)))
def test_eval_mode_fine_tuning_of_resnet18(device, backend, reference_fallbacks):
    """BN in eval with γ/β trainable: every gradient as torchvision's, and no
    layer fell back to the reference."""
    tv, fused = build_pair("resnet18")
    tv.eval(), fused.eval()
    g = torch.Generator().manual_seed(7)
    x, target = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 1000, (2,), generator=g)
    _assert_like_torchvision_in_float64(fused, tv, x, target, backend)
    assert reference_fallbacks and not any(reference_fallbacks)


def test_frozen_batch_norm_resnet18_trains_a_step_like_torchvision(reference_fallbacks):
    """torchvision's FrozenBatchNorm2d (detection backbones), converted with
    `fuse`, in train mode: gradients, then one SGD step, as torchvision's."""
    torch.manual_seed(0)
    tv = randomize_norms(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)).train()
    fused = resnet_fused.fuse(copy.deepcopy(tv)).train()
    assert isinstance(fused.layer1[0].bn1, FrozenBatchNorm2d)
    g = torch.Generator().manual_seed(8)
    x, target = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 1000, (2,), generator=g)
    _assert_like_torchvision_in_float64(fused, tv, x, target, "auto")
    assert reference_fallbacks and not any(reference_fallbacks)
    for model in (tv, fused):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert_equivalent(fused(x), tv(x), NET_TOL[torch.float32], "after a step")


def _block():
    tv, fused = build_pair("resnet18")
    g = torch.Generator().manual_seed(3)
    return tv.layer2[0].eval(), fused.layer2[0].eval(), torch.randn(2, 64, 8, 8, generator=g)


def _input_and_parameter_grads(block, x):
    x = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    block(x).square().sum().backward()
    return [x.grad] + [p.grad for p in block.parameters()]


def test_compiled_eval_block_with_grad_matches_eager():
    """Under torch.compile the reference composition is traced (conv_grad.applies)."""
    tv, fused, x = _block()
    want = _input_and_parameter_grads(tv, x)
    got = _input_and_parameter_grads(torch.compile(fused, backend="eager", fullgraph=True), x)
    for a, b in zip(got, want):
        assert_equivalent(a, b, NET_TOL[torch.float32])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit.(trace|save).*deprecated")
def test_traced_eval_block_with_grad_keeps_its_backward_and_saves():
    """torch.jit.trace with parameters requiring grad records the reference
    composition, so the traced graph differentiates (a Function's inner ops
    would be recorded without their backward) and saves."""
    tv, fused, x = _block()
    traced = torch.jit.trace(fused, x, check_trace=False)
    torch.jit.save(traced, io.BytesIO())
    want = _input_and_parameter_grads(tv, x)
    for a, b in zip(_input_and_parameter_grads(traced, x), want):
        assert_equivalent(a, b, NET_TOL[torch.float32])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forward_mode_ad_gives_torchvisions_tangents(backend):
    """Forward-mode AD through a fused model (a dual_level, and torch.func.jvp)
    gives torchvision's tangent: under a transform the differentiable
    composition runs (common.transformed), never a kernel that would drop
    the tangent (before: none, or zeros, silently)."""
    import torch.autograd.forward_ad as fwAD
    import torchvision

    if resnet_fused.backends.reason_unavailable(backend) is not None or "cpu" not in resnet_fused.backends.device_types(
        backend
    ):
        pytest.skip(f"backend {backend!r} does not run on CPU tensors here")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    fused = resnet_fused.fuse(copy.deepcopy(tv)).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        _, want = torch.func.jvp(tv.double(), (x.double(),), (t.double(),))
        tv.float()
        with resnet_fused.backend(backend):
            with fwAD.dual_level():
                dual = fused(fwAD.make_dual(x, t))
                got_dual = fwAD.unpack_dual(dual).tangent
            _, got_jvp = torch.func.jvp(fused, (x,), (t,))
    for got in (got_dual, got_jvp):
        assert got is not None
        assert_equivalent(got, want, 1e-4, "tangent")
