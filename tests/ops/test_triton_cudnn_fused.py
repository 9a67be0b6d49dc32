"""cuDNN's fused convolution as a tuning candidate (ops/triton/cudnn_fused.py).

Without a GPU, cuDNN cannot run: `torch.cudnn_convolution_relu` and
`torch.cudnn_convolution_add_relu` are replaced by torch compositions with
their documented semantics (relu(conv + bias [+ alpha·z])), and the device
check is patched to take CPU tensors. What is tested is this project's
side: the BN folded into the weight and bias, the cache of the folded
weight, the NaN probe that gates the candidate, when it is offered, that
the tuner checks, times and caches it like the others and that a cached
choice a call cannot take falls back. Whether cuDNN itself computes these
numbers (and passes NaN through) only a GPU run can say: the validate
command's per-layer table times it, the probe runs at first use there."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from resnet_fused.ops import fold as torch_fold
from conftest import OP_TOL, assert_equivalent, time_fastest_when_called

pytest.importorskip("resnet_fused.ops.triton.conv")
from resnet_fused.ops.triton import cudnn_fused, tuning, tuning_cache  # noqa: E402
from resnet_fused.ops.triton.fold import Affine  # noqa: E402

pytestmark = pytest.mark.skipif(
    resnet_fused.backends.reason_unavailable("triton") is not None
    or "cpu" not in resnet_fused.backends.device_types("triton"),
    reason="runs the triton backend on CPU tensors: needs TRITON_INTERPRET=1 (set without a GPU)",
)


def _conv_relu(x, w, b, stride, padding, dilation, groups):
    return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))


def _conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
    return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)


def _drops_nan(x, w, b, stride, padding, dilation, groups):
    v = F.conv2d(x, w, b, stride, padding, dilation, groups)
    return torch.where(v > 0, v, torch.zeros_like(v))  # max(v, 0): NaN becomes 0


@pytest.fixture
def emulated(monkeypatch):
    """cuDNN's two fused ops as torch compositions, counted; CPU accepted."""
    calls = []
    monkeypatch.setattr(cudnn_fused, "_device_ok", lambda device: True)
    monkeypatch.setattr(cudnn_fused, "_nan_safe", {})
    monkeypatch.setattr(cudnn_fused, "_folded", {})
    monkeypatch.setattr(torch, "cudnn_convolution_relu", lambda *a: calls.append("relu") or _conv_relu(*a))
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", lambda *a: calls.append("add_relu") or _conv_add_relu(*a))
    return calls


def case(channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 6, 5, generator=g)
    w = torch.randn(24, 16, 3, 3, generator=g) / 12
    if channels_last:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    bn = dict(gamma=torch.rand(24, generator=g) + 0.5, beta=torch.randn(24, generator=g),
              mean=torch.randn(24, generator=g), var=torch.rand(24, generator=g) + 0.1)
    residual = torch.randn(2, 24, 6, 5, generator=g)
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    return x, w, bn, residual, conv


def reference(x, w, bn, residual, conv):
    y = F.batch_norm(F.conv2d(x.double(), w.double(), None, **conv), bn["mean"].double(), bn["var"].double(),
                     bn["gamma"].double(), bn["beta"].double(), False, 0.0, 1e-5)
    return torch.relu(y if residual is None else y + residual.double())


def affine_of(bn):
    return Affine.batch_norm(bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fold_and_run_match_the_reference(emulated, channels_last):
    x, w, bn, residual, conv = case(channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for res in (None, residual.contiguous(memory_format=fmt)):
        out = cudnn_fused.run(x, w, affine_of(bn), res, *conv.values(),
                              lambda s: torch.empty(s).contiguous(memory_format=fmt))
        assert out.is_contiguous(memory_format=fmt)
        assert_equivalent(out, reference(x, w, bn, res, conv), OP_TOL[torch.float32])
    assert emulated == ["relu", "add_relu"]


def test_folded_weight_cached_until_a_tensor_changes(emulated):
    x, w, bn, residual, conv = case()
    affine = affine_of(bn)
    first = cudnn_fused.folded(w, affine)
    assert cudnn_fused.folded(w, affine)[0] is first[0]  # cached
    scale, shift = torch_fold.scale_shift(bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5)
    assert torch.equal(first[0], w * scale.view(-1, 1, 1, 1)) and torch.equal(first[1], shift)
    bn["var"].mul_(2.0)  # an edited BN (its _version moves): refolded
    second = cudnn_fused.folded(w, affine)
    assert second[0] is not first[0] and not torch.equal(second[0], first[0])
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step on the weight: refolded
    assert not torch.equal(cudnn_fused.folded(w, affine)[0], second[0])


def test_probe_gates_the_candidate(emulated, monkeypatch):
    """A fused ReLU that maps NaN to 0 is never offered: the probe, run once
    per device, sees it; one that keeps NaN is."""
    x, w, bn, residual, conv = case()
    assert cudnn_fused.applies(x, w, residual, True, 0)
    assert cudnn_fused.applies(x, w, None, True, 0)
    assert len(emulated) == 2  # the probe: once per device, both ops
    monkeypatch.setattr(cudnn_fused, "_nan_safe", {})
    monkeypatch.setattr(torch, "cudnn_convolution_relu", _drops_nan)
    assert not cudnn_fused.applies(x, w, residual, True, 0)


def test_offered_only_where_it_computes_the_op(emulated):
    x, w, bn, residual, conv = case()
    assert not cudnn_fused.applies(x, w, residual, False, 0)  # no ReLU: cuDNN's ops always apply one
    assert not cudnn_fused.applies(x, w, residual[:, :16], True, 4)  # a narrow residual would be copied
    assert not cudnn_fused.applies(x.double(), w.double(), None, True, 0)
    assert not cudnn_fused.applies(x, w.half(), None, True, 0)


def test_tuner_times_checks_and_takes_it(emulated, monkeypatch):
    """Offered by the triton backend's op, checked against the reference,
    timed fastest here and cached; the op's result then comes from it."""
    x, w, bn, residual, conv = case()

    time_fastest_when_called(monkeypatch, emulated)  # cuDNN's emulated ops time fastest
    monkeypatch.setattr(tuning, "_choices", {})
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act_eval(x, w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, None, residual,
                                   True, **conv)
    assert list(tuning.choices().values()) == [cudnn_fused.NAME]
    assert emulated[-1] == "add_relu"  # the result came from it
    assert_equivalent(out, reference(x, w, bn, residual, conv), OP_TOL[torch.float32])


def test_a_wrong_result_is_never_chosen(emulated, monkeypatch):
    x, w, bn, residual, conv = case()
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu",
                        lambda *a: emulated.append("add_relu") or _conv_add_relu(*a) + 1.0)
    time_fastest_when_called(monkeypatch, emulated)  # cuDNN's emulated ops time fastest
    monkeypatch.setattr(tuning, "_choices", {})
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act_eval(x, w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, None, residual,
                                   True, **conv)
    assert cudnn_fused.NAME not in tuning.choices().values()
    assert_equivalent(out, reference(x, w, bn, residual, conv), OP_TOL[torch.float32])


def test_a_cached_choice_the_call_cannot_take_falls_back(emulated, monkeypatch):
    """A choice stored for the key (by an earlier call, or on disk) that this
    call cannot take (here: the probe now fails) runs the heuristic tiling."""
    x, w, bn, residual, conv = case()
    monkeypatch.setattr(tuning, "_choices", {})
    key = tuning.key(x, w, residual, True, conv["stride"], conv["padding"], conv["dilation"], 1, 0, tuning.forced())
    tuning.set_choice(key, cudnn_fused.NAME)
    monkeypatch.setattr(cudnn_fused, "_nan_safe", {"cpu": False})
    emulated.clear()
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act_eval(x, w, bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5, None, residual,
                                   True, **conv)
    assert emulated == []
    assert_equivalent(out, reference(x, w, bn, residual, conv), OP_TOL[torch.float32])


def test_the_choice_survives_the_disk_cache_format():
    assert tuning_cache.decode(tuning_cache.encode(cudnn_fused.NAME)) == cudnn_fused.NAME
