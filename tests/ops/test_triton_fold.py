"""The eval-mode BatchNorm folded inside the Triton kernels' epilogue
(ops/triton/fold.py) and `ops.conv_bn_act_eval`, the op a model's conv+BN
pair calls: the fold computes what ops/fold.py `scale_shift` computes, in
every kernel that has the epilogue (implicit GEMM, Hopper TMA, the epilogue
behind cuDNN); non-finite BN tensors propagate as in F.batch_norm; and an
inference forward on the triton backend issues one op per conv+BN pair and
nothing else per pair (counted with a dispatch mode: the launches the
issue's ~320 extra per resnet50 forward came from)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from resnet_fused.ops import fold as torch_fold
from conftest import OP_TOL, OpCounter, assert_equivalent

triton_conv = pytest.importorskip("resnet_fused.ops.triton.conv")
from resnet_fused.ops.triton import batch_norm, conv_tma, device, library  # noqa: E402
from resnet_fused.ops.triton.fold import Affine  # noqa: E402

DEVICE = device()

pytestmark = pytest.mark.skipif(
    resnet_fused.backends.reason_unavailable("triton") is not None,
    reason=f"triton backend unavailable: {resnet_fused.backends.reason_unavailable('triton')}",
)


def bn_tensors(k, seed=0, gamma=True, beta=True, conv_bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = {
        "gamma": torch.rand(k, generator=g) + 0.5 if gamma else None,
        "beta": torch.randn(k, generator=g) if beta else None,
        "mean": torch.randn(k, generator=g) * 0.5,
        "var": torch.rand(k, generator=g) + 0.1,
        "bias": torch.randn(k, generator=g) if conv_bias else None,
    }
    return {n: None if v is None else v.to(dtype).to(DEVICE) for n, v in t.items()}


def conv_case(n=2, c=16, h=6, w=5, k=24, r=3, stride=1, padding=1, dtype=torch.float32, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = (torch.randn(k, c, r, r, generator=g) / (c * r * r) ** 0.5).to(dtype)
    if channels_last:
        x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    p = (h + 2 * padding - r) // stride + 1
    q = (w + 2 * padding - r) // stride + 1
    residual = torch.randn(n, k, p, q, generator=g).to(dtype)
    conv = dict(stride=(stride,) * 2, padding=(padding,) * 2, dilation=(1, 1), groups=1)
    return x.to(DEVICE), weight.to(DEVICE), residual.to(DEVICE), conv


def eval_reference(x, w, bn, eps, residual, relu, conv, dtype=torch.float64):
    """What conv_bn_act_eval means, in torch's own ops (float64, or `dtype`)."""
    y = F.conv2d(x.to(dtype), w.to(dtype), None if bn["bias"] is None else bn["bias"].to(dtype), **conv)
    d = {n: None if v is None else v.to(dtype) for n, v in bn.items()}
    y = F.batch_norm(y, d["mean"], d["var"], d["gamma"], d["beta"], False, 0.0, eps)
    if residual is not None:
        y = y + residual.to(dtype)
    return torch.relu(y) if relu else y


BN_VARIANTS = {
    "gamma_beta": dict(),
    "affine_false": dict(gamma=False, beta=False),
    "gamma_only": dict(beta=False),
    "conv_bias": dict(conv_bias=True),
}


# ---- the fold in each kernel computes ops/fold.py's scale and shift ---------


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.0])
@pytest.mark.parametrize("variant", list(BN_VARIANTS), ids=list(BN_VARIANTS))
def test_implicit_gemm_fold_is_the_given_scale_shift_bitwise(variant, eps):
    """The kernel folding the BN and the kernel given ops/fold.py's (scale,
    shift) produce the same bits: one formula, one rounding order, correctly
    rounded sqrt and division on both sides (CPU torch; the interpreter)."""
    x, w, res, conv = conv_case()
    bn = bn_tensors(w.shape[0], **BN_VARIANTS[variant])
    scale, shift = torch_fold.scale_shift(bn["gamma"], bn["beta"], bn["mean"], bn["var"], eps, bn["bias"])
    shape = ops.conv_out_shape(x, w, conv["stride"], conv["padding"], conv["dilation"])
    outs = []
    for affine in (Affine.batch_norm(bn["gamma"], bn["beta"], bn["mean"], bn["var"], eps, bn["bias"]),
                   Affine.given(scale, shift)):
        out = triton_conv.output_like(x, shape)
        triton_conv.launch(x, w, affine, res, True, conv["stride"], conv["padding"], conv["dilation"], 1, out,
                           triton_conv.INTERPRETER_CONFIG)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert_equivalent(outs[0], eval_reference(x, w, bn, eps, res, True, conv), OP_TOL[torch.float32])


def test_epilogue_behind_cudnn_folds_the_same():
    """The epilogue kernel behind cuDNN (batch_norm.affine_act_) with the BN
    folded equals it given the scale and shift, bit for bit, in both layouts."""
    for channels_last in (False, True):
        x, w, res, conv = conv_case(channels_last=channels_last)
        bn = bn_tensors(w.shape[0], conv_bias=True)
        y = F.conv2d(x, w, None, **conv)
        scale, shift = torch_fold.scale_shift(bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, bn["bias"])
        folded = batch_norm.affine_act_(
            y.clone(), Affine.batch_norm(bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, bn["bias"]), res,
            True, batch_norm.KERNELS,
        )
        given = batch_norm.affine_act_(y.clone(), Affine.given(scale, shift), res, True, batch_norm.KERNELS)
        assert torch.equal(folded, given)
        assert_equivalent(folded, eval_reference(x, w, bn, 1e-5, res, True, conv), OP_TOL[torch.float32])


def test_hopper_kernel_folds_the_same():
    """The TMA kernel (interpreted) with the BN folded equals it given the
    scale and shift."""
    x, w, res, conv = conv_case(n=2, c=72, h=9, w=13, k=136, dtype=torch.float16)
    bn = bn_tensors(w.shape[0])
    scale, shift = torch_fold.scale_shift(bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5)
    res = res.contiguous(memory_format=torch.channels_last)
    shape = ops.conv_out_shape(x, w, conv["stride"], conv["padding"], conv["dilation"])
    outs = []
    for affine in (Affine.batch_norm(bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5), Affine.given(scale, shift)):
        out = conv_tma.output_like(x, shape)
        conv_tma.launch(x, w, affine, res, True, conv["stride"], conv["padding"], conv["dilation"], 1, out,
                        conv_tma.INTERPRETER_CONFIG)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert_equivalent(outs[0], eval_reference(x, w, bn, 1e-5, res, True, conv), OP_TOL[torch.float16])


@pytest.mark.parametrize("path", ["triton", "cudnn"])
def test_non_finite_bn_tensors_propagate_as_in_f_batch_norm(monkeypatch, path):
    """NaN in running_var, inf in γ, var = −eps (an infinite scale), NaN in
    β and in the running mean: the output's NaN/±inf masks are fp32
    F.batch_norm's (var + eps is exactly 0 in fp32, not in float64), the
    finite rest within tolerance of float64; for the implicit GEMM and for
    cuDNN + the epilogue kernel."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_CONV", path)
    x, w, res, conv = conv_case()
    eps = 1e-5
    bn = bn_tensors(w.shape[0])
    bn["var"][0] = float("nan")
    bn["gamma"][1] = float("inf")
    bn["gamma"][2] = float("-inf")
    bn["var"][3] = -eps
    bn["beta"][4] = float("nan")
    bn["mean"][5] = float("inf")
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act_eval(x, w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], eps, None, res, True,
                                   **conv)
    torch_fp32 = eval_reference(x, w, bn, eps, res, True, conv, torch.float32)
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(out), mask(torch_fp32)), mask.__name__
    assert torch.isnan(torch_fp32[:, 3]).any() and torch.isposinf(torch_fp32).any()
    ref = eval_reference(x, w, bn, eps, res, True, conv)
    finite = torch.isfinite(torch_fp32)
    assert_equivalent(out[finite], ref[finite].to(out.dtype), OP_TOL[torch.float32])


def test_low_precision_running_statistics():
    """A model converted with .to(torch.bfloat16) keeps bf16 BN tensors: the
    kernel widens them to fp32 as ops/fold.py's `.float()` does."""
    x, w, res, conv = conv_case(dtype=torch.bfloat16)
    bn = bn_tensors(w.shape[0], dtype=torch.bfloat16)
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act_eval(x, w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, None, res, True,
                                   **conv)
        scale, shift = torch_fold.scale_shift(bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5)
        given = ops.conv_bn_act(x, w, scale, shift, res, True, **conv)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, given)


# ---- ops.conv_bn_act_eval ----------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_op_matches_f_batch_norm(backend, channels_last):
    if resnet_fused.backends.reason_unavailable(backend) is not None or DEVICE not in resnet_fused.backends.device_types(
        backend
    ):
        pytest.skip(f"backend {backend!r} does not run on {DEVICE} tensors here")
    x, w, res, conv = conv_case(stride=2, channels_last=channels_last)
    for variant in BN_VARIANTS.values():
        bn = bn_tensors(w.shape[0], **variant)
        for residual, relu in ((res, True), (None, False)):
            with resnet_fused.backend(backend):
                out = ops.conv_bn_act_eval(x, w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-4, bn["bias"],
                                           residual, relu, **conv)
            assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert_equivalent(out, eval_reference(x, w, bn, 1e-4, residual, relu, conv), OP_TOL[torch.float32])


def test_narrow_residual_read_in_place():
    """The option-A shortcut (fewer residual channels at an offset, a strided
    view) through the fold, as conv_bn_act takes it."""
    x, w, _, conv = conv_case(stride=2, k=24)
    bn = bn_tensors(24)
    shortcut = torch.randn(2, 16, 6, 5, device=DEVICE)[:, :, ::2, ::2]
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act_eval(x, w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, None, shortcut, True,
                                   residual_channel_offset=4, **conv)
    full = torch.zeros(2, 24, *shortcut.shape[2:], device=DEVICE)
    full[:, 4:20] = shortcut
    assert_equivalent(out, eval_reference(x, w, bn, 1e-5, full, True, conv), OP_TOL[torch.float32])


def test_errors_name_the_argument():
    x, w, res, conv = conv_case()
    bn = bn_tensors(w.shape[0])
    args = dict(bn_weight=bn["gamma"], bn_bias=bn["beta"], running_mean=bn["mean"], running_var=bn["var"])
    with pytest.raises(ValueError, match="running_mean and running_var"):
        ops.conv_bn_act_eval(x, w, bn["gamma"], bn["beta"], None, None)
    with pytest.raises(ValueError, match=r"conv_bias must have shape \(24,\)"):
        ops.conv_bn_act_eval(x, w, **args, conv_bias=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"bn_weight must have shape \(24,\)"):
        ops.conv_bn_act_eval(x, w, torch.ones(5, device=DEVICE), bn["beta"], bn["mean"], bn["var"])
    with pytest.raises(ValueError, match="eps must be a non-negative float"):
        ops.conv_bn_act_eval(x, w, **args, eps=-1.0)
    with pytest.raises(TypeError, match="relu must be a bool"):
        ops.conv_bn_act_eval(x, w, **args, relu="no")


def test_meta_and_empty_batch_as_torch():
    x, w, res, conv = conv_case()
    bn = bn_tensors(w.shape[0])
    meta = {n: None if v is None else v.to("meta") for n, v in bn.items()}
    out = ops.conv_bn_act_eval(x.to("meta"), w.to("meta"), meta["gamma"], meta["beta"], meta["mean"], meta["var"],
                               **conv)
    assert out.device.type == "meta" and out.shape == res.shape
    with resnet_fused.backend("triton"):
        empty = ops.conv_bn_act_eval(x[:0], w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, None, res[:0],
                                     True, **conv)
    assert empty.shape == (0, *res.shape[1:])


def test_grad_and_float64_take_the_scale_shift_path(monkeypatch):
    """Where autograd records through the call, or in float64, the BN is
    folded in torch (differentiable in γ and β) and conv_bn_act runs; the
    in-kernel fold serves inference only."""
    x, w, res, conv = conv_case()
    bn = bn_tensors(w.shape[0])

    def refuse(*args, **kwargs):
        raise AssertionError("the in-kernel fold ran")

    monkeypatch.setattr(library.conv_bn_act, "batch_norm_eval", refuse)
    gamma = bn["gamma"].clone().requires_grad_()
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act_eval(x, w, gamma, bn["beta"], bn["mean"], bn["var"], 1e-5, None, res, True, **conv)
        out.sum().backward()
        ref = ops.conv_bn_act_eval(x.double(), w.double(), *(bn[n].double() for n in ("gamma", "beta", "mean", "var")),
                                   1e-5, None, res.double(), True, **conv)
    assert gamma.grad is not None and torch.isfinite(gamma.grad).all()
    assert_equivalent(out, ref, OP_TOL[torch.float32])


def test_opcheck_folded_op():
    x, w, res, conv = conv_case()
    lists = [list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]), 1]
    for variant in BN_VARIANTS.values():
        bn = bn_tensors(w.shape[0], **variant)
        torch.library.opcheck(
            torch.ops.resnet_fused.triton_conv_bn_act_eval,
            (x, w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, bn["bias"], res, True, *lists),
        )


# ---- what an inference forward issues ---------------------------------------


# the NCHW input's one conversion to channels_last at the stem (plan.Plan.channels_last),
# and what torchvision's stem pooling and head issue after the last block
HEAD_OPS = {"aten.clone.default": 1, "aten.max_pool2d_with_indices.default": 1, "aten.mean.dim": 1,
            "aten.view.default": 1, "aten.t.default": 1, "aten.addmm.default": 1}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_one_op_per_conv_bn_pair(arch, monkeypatch):
    """An eval forward of a fused model on the triton backend issues exactly
    one op per conv+BN(+add)+ReLU pair (the kernel, BN folded inside) plus
    the input's conversion to channels_last, the stem's pooling and the
    head; before the fold each pair also issued six torch ops for its scale
    and shift (resnet50: 376 ops, now 59). No
    kernel is re-wrapped per call (wrap_triton refuses after the first
    forward)."""
    model = resnet_fused.get_model(arch).eval().to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    pairs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    with torch.no_grad(), resnet_fused.backend("triton"):
        model(x)  # tunes nothing under the interpreter; warms any cache

        def refuse(*args, **kwargs):
            raise AssertionError("a kernel was wrapped again during a forward")

        monkeypatch.setattr(library, "wrap_triton", refuse)
        with OpCounter() as counter:
            model(x)
    assert dict(counter.ops) == {"resnet_fused.triton_conv_bn_act_eval.default": pairs, **HEAD_OPS}


def test_nchw_input_runs_the_kernels_channels_last(monkeypatch):
    """An NCHW input to a fused model's inference on the triton backend is
    converted once at the stem (plan.Plan.channels_last): every pair's
    kernel gets channels_last activations (its tiles' layout), the logits
    equal torchvision's. With a forward hook inside, nothing is converted:
    the hook sees torchvision's layout."""
    import torchvision

    seen = []
    real = library.conv_bn_act.batch_norm_eval

    def spy(x, *args, **kwargs):
        if x.shape[2] * x.shape[3] > 1:  # (a 1×1 map is both layouts at once)
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(library.conv_bn_act, "batch_norm_eval", spy)
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    fused = resnet_fused.fuse(tv).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), resnet_fused.backend("triton"):
        assert_equivalent(fused(x), tv(x), 1e-4, "logits")
        assert seen and all(seen)
        seen.clear()
        layouts = []
        fused.layer2.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous()))
        assert_equivalent(fused(x), tv(x), 1e-4, "logits")
    assert layouts == [True] and seen and not any(seen)
