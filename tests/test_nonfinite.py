"""NaN and infinity reach the same outputs as in torchvision, on every CPU
inference path: oneDNN with its ReLU post-op (which maps NaN to 0), the
Winograd kernel (which spreads a NaN over whole tiles), the C++ epilogue,
the max-pool kernel and the owned whole-model path; for non-finite values in
the input, the BN statistics and parameters, and the conv weights."""
import copy

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused import ops
from resnet_fused.ops.cpu import onednn
from conftest import OP_TOL, assert_equivalent, device_backend_params, randomize_norms

pytestmark = pytest.mark.skipif(
    onednn.UNAVAILABLE is not None or resnet_fused.backends.reason_unavailable("cpu") is not None,
    reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE or resnet_fused.backends.reason_unavailable('cpu')}",
)
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
NAN, INF = float("nan"), float("inf")


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """NaN, +inf and -inf exactly where the reference has them, the finite
    rest within `tol`."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    for what, mask in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        m_out, m_ref = mask(out), mask(ref)
        assert torch.equal(m_out, m_ref), (
            f"{what}: {int(m_out.sum())} in the output, {int(m_ref.sum())} in torchvision's, "
            f"{int((m_out != m_ref).sum())} places differ"
        )
    finite = torch.isfinite(ref)
    assert finite.any(), "the case must leave finite outputs to compare"
    assert_equivalent(out[finite], ref[finite], tol)


def pair(arch: str = "resnet18"):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(torchvision.models, arch)()).eval()
    return tv, resnet_fused.fuse(copy.deepcopy(tv)).eval()


def poke(x: torch.Tensor, *values) -> torch.Tensor:
    """x with `values` written at fixed scattered positions of sample 0 (and
    sample 1 left finite, so both kinds of row are compared)."""
    x = x.clone()
    flat = x[0].view(-1) if x[0].is_contiguous() else x[0].permute(1, 2, 0).reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, len(values) + 2).long()[1:-1]
    for p, v in zip(positions.tolist(), values):
        flat[p] = v
    if not x[0].is_contiguous():
        x[0] = flat.view(x.shape[2], x.shape[3], x.shape[1]).permute(2, 0, 1)
    return x


# (block, input channels, size): layer1[0] is Winograd's (3x3 stride 1), layer2[0]
# oneDNN's (1x1 projection, 3x3 stride 2), layer4[1] oneDNN's at 2x2 (too few tiles)
BLOCKS = {"winograd": ("layer1", 0, 64, 12), "onednn_stride2": ("layer2", 0, 64, 10), "onednn": ("layer4", 1, 512, 2)}


@pytest.mark.parametrize("values", [(NAN,), (INF,), (-INF,), (NAN, INF, -INF)], ids=["nan", "inf", "-inf", "mixed"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
def test_nonfinite_inputs_reach_what_torchvision_reaches(block, fmt, values):
    tv, fused = pair()
    layer, index, c, size = BLOCKS[block]
    x = poke(torch.randn(2, c, size, size).to(memory_format=FORMATS[fmt]), *values)
    with torch.no_grad():
        ref = getattr(tv, layer)[index](x)
        for _ in range(2):  # cold and warm cache
            assert_same_nonfinite(getattr(fused, layer)[index](x), ref, OP_TOL[torch.float32])


def _nan_running_var(m):
    m.layer1[0].bn2.running_var[3] = NAN


def _neg_inf_running_mean(m):
    m.layer2[0].bn1.running_mean[5] = -INF  # +inf after the BN: it survives the ReLU


def _inf_gamma(m):
    m.layer2[1].bn2.weight[7] = INF


def _nan_beta(m):
    m.layer3[0].downsample[1].bias[1] = NAN


def _inf_conv_weight(m):
    m.layer1[1].conv1.weight[4, 2, 1, 1] = INF


def _nan_conv_weight(m):
    m.layer3[1].conv2.weight[0, 0, 0, 0] = NAN


def _nan_stem_weight(m):
    m.conv1.weight[2, 1, 3, 3] = NAN


EDITS = [_nan_running_var, _neg_inf_running_mean, _inf_gamma, _nan_beta, _inf_conv_weight, _nan_conv_weight,
         _nan_stem_weight]


def assert_same_masks(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """assert_same_nonfinite, where the reference may be non-finite throughout."""
    if torch.isfinite(ref).any():
        assert_same_nonfinite(out, ref, tol)
    else:
        for mask in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(mask(out), mask(ref))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__[1:] for e in EDITS])
def test_nonfinite_parameters_reach_what_torchvision_reaches(edit, fmt):
    """Whole models, with the edit made after a warm forward (the planned
    path must notice it), twice; and each stage on torchvision's own input
    to it, where the NaN pattern is still local."""
    tv, fused = pair()
    x = torch.randn(2, 3, 48, 40).to(memory_format=FORMATS[fmt])
    with torch.no_grad():
        fused(x)  # warm: every convolution packed with finite weights
        for m in (tv, fused):
            edit(m)
        ref = tv(x)
        assert not torch.isfinite(ref).all(), "the edit must reach the output"
        for _ in range(2):
            assert_same_masks(fused(x), ref, 1e-4)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            ref_h = getattr(tv, name)(h)
            assert_same_masks(getattr(fused, name)(h), ref_h, OP_TOL[torch.float32] * 10)
            h = ref_h


def test_one_bad_sample_leaves_the_others_alone():
    """A NaN pixel in sample 1 of 3 makes sample 1's logits NaN and no other
    (torchvision's answer; oneDNN's ReLU post-op would make them finite)."""
    tv, fused = pair("resnet50")
    x = torch.randn(3, 3, 40, 40)
    x[1, 2, 7, 9] = NAN
    with torch.no_grad():
        ref, out = tv(x), fused(x)
        assert ref[1].isnan().all() and ref[[0, 2]].isfinite().all()
        assert_same_nonfinite(out, ref, 1e-4)
        assert_same_nonfinite(fused(x), ref, 1e-4)  # warm
        clean = x[[0, 2]]
        assert_equivalent(fused(clean), tv(clean), 1e-4)  # and the finite batch after it


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_epilogue_kernel_and_the_reference_keep_nan(fmt):
    """`ops.conv_bn_act` on the cpu backend (torch conv + the C++ epilogue)
    and on eager: NaN and inf from x, scale, shift and the residual."""
    g = torch.Generator().manual_seed(3)
    x = poke(torch.randn(2, 8, 9, 9, generator=g).to(memory_format=FORMATS[fmt]), NAN, INF, -INF)
    w = torch.randn(16, 8, 3, 3, generator=g)
    scale, shift = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    scale[3], shift[5] = INF, NAN
    res = poke(torch.randn(2, 16, 9, 9, generator=g).to(memory_format=FORMATS[fmt]), -INF, NAN)
    y = torch.nn.functional.conv2d(x, w, None, 1, 1)
    ref = torch.relu(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + res)
    for backend in ("cpu", "eager"):
        with resnet_fused.backend(backend):
            out = ops.conv_bn_act(x, w, scale, shift, res, True, 1, 1)
        assert_same_nonfinite(out, ref, OP_TOL[torch.float32])


def test_finite_inputs_still_take_the_packed_path(monkeypatch):
    """The finite case keeps its speed: every convolution runs from the cache
    (no composed conv_bn_act_eval call); a NaN input sends every one of them
    to the composed path instead."""
    _, fused = pair("resnet18")
    x = torch.randn(2, 3, 40, 40)
    calls = []
    real = ops.conv_bn_act_eval
    monkeypatch.setattr(ops, "conv_bn_act_eval", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fused(x)
        fused(x)
        assert calls == []
        fused(poke(x, NAN))
    assert len(calls) == sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())


def test_all_finite():
    assert onednn.all_finite(torch.randn(3, 4))
    assert onednn.all_finite(torch.empty(0, 3))
    for v in (NAN, INF, -INF):
        t = torch.randn(2, 5, 7, 7).to(memory_format=torch.channels_last)
        t[1, 4, 6, 6] = v
        assert not onednn.all_finite(t)
        assert not onednn.all_finite(t.bfloat16())
    # finite values whose sum overflows: reported as not finite (the safe side)
    assert not onednn.all_finite(torch.full((4,), 3e38))


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_relu_backward_passes_the_gradient_of_a_nan_output(device, backend):
    """torch's ReLU backward is threshold_backward: 0 where out <= 0, the
    gradient elsewhere, NaN outputs included. A NaN in the residual of a
    train-mode batch_norm_act: every gradient matches autograd through
    F.batch_norm + add + relu, NaN by NaN."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    res = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    res[1, 2, 3, 0] = NAN
    grad = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    weight, bias = torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.randn(3, generator=g, dtype=torch.float64)

    def run(fn):
        leaves = [t.to(device, copy=True).requires_grad_() for t in (x, res, weight, bias)]
        fn(*leaves).backward(grad.to(device))
        return [t.grad.cpu() for t in leaves]

    ref = run(lambda x, r, w, b: torch.relu(torch.nn.functional.batch_norm(x, None, None, w, b, True) + r))
    with resnet_fused.backend(backend):
        out = run(lambda x, r, w, b: ops.batch_norm_act(x, w, b, None, None, True, 0.1, 1e-5, r, True))
    assert not torch.isnan(ref[1][0]).any() and ref[1][1, 2, 3, 0] == grad[1, 2, 3, 0]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-9, atol=1e-9)
