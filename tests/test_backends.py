"""Backend selection: names, scopes, availability errors and auto fallback."""
import threading

import pytest
import torch

import resnet_fused
from resnet_fused import backends, ops
from conftest import device_backend_params, device_params


def test_eager_is_always_available():
    assert "eager" in resnet_fused.available_backends()
    assert backends.status()["eager"] is None and backends.status()["auto"] is None


def test_set_and_scope():
    assert resnet_fused.get_backend() == "auto"
    resnet_fused.set_backend("eager")
    assert resnet_fused.get_backend() == "eager"
    resnet_fused.set_backend("auto")
    with resnet_fused.backend("eager"):
        assert resnet_fused.get_backend() == "eager"
    assert resnet_fused.get_backend() == "auto"


def test_scope_is_per_thread():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        entered.wait()
        seen["other"] = resnet_fused.get_backend()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with resnet_fused.backend("eager"):
        entered.set()
        release.wait(timeout=10)
    t.join(timeout=10)
    assert seen["other"] == "auto"


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu"])
def test_explicit_unavailable_backend_says_why(name):
    reason = backends.reason_unavailable(name)
    if reason is None:
        pytest.skip(f"backend {name!r} is available in this build")
    with pytest.raises(RuntimeError, match=f"resnet_fused backend '{name}' is unavailable: "):
        resnet_fused.set_backend(name)
    with pytest.raises(RuntimeError, match="is unavailable"):
        with resnet_fused.backend(name):
            pass
    assert resnet_fused.get_backend() == "auto"


def test_auto_falls_back_with_one_warning(monkeypatch):
    """A backend that is implemented but cannot run here is skipped by auto
    with a single warning; explicit selection raises with the reason."""
    calls = []
    broken = backends.Backend(
        name="cpu",
        device_types=("cpu",),
        ops={"conv_bn_act": lambda *a: calls.append(a), "batch_norm_act": lambda *a: calls.append(a)},
        unavailable_reason=lambda: "it was built without its kernels (test)",
    )
    monkeypatch.setitem(backends._REGISTRY, "cpu", broken)
    monkeypatch.setattr(backends, "_warned", set())
    x = torch.randn(1, 2, 4, 4)
    w = torch.randn(3, 2, 1, 1)
    with pytest.warns(RuntimeWarning, match=r"backend 'cpu' is unavailable for cpu tensors \(it was built"):
        ops.conv_bn_act(x, w, torch.ones(3), torch.zeros(3))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.conv_bn_act(x, w, torch.ones(3), torch.zeros(3))  # second call: silent
    assert calls == [] and out.shape == (1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="built without its kernels"):
        resnet_fused.set_backend("cpu")


def test_auto_uses_available_backend_and_explicit_device_mismatch(monkeypatch):
    calls = []

    def fake_conv(*args):
        calls.append("conv")
        return torch.zeros(1, 3, 4, 4)

    fake = backends.Backend(name="cuda", device_types=("cuda",), ops={"conv_bn_act": fake_conv})
    monkeypatch.setitem(backends._REGISTRY, "cuda", fake)
    x = torch.randn(1, 2, 4, 4)
    w = torch.randn(3, 2, 1, 1)
    with resnet_fused.backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' runs on cuda tensors, but the input is on cpu"):
            ops.conv_bn_act(x, w, torch.ones(3), torch.zeros(3))
    assert calls == []
    fake_cpu = backends.Backend(name="cpu", device_types=("cpu",), ops={"conv_bn_act": fake_conv})
    monkeypatch.setitem(backends._REGISTRY, "cpu", fake_cpu)
    ops.conv_bn_act(x, w, torch.ones(3), torch.zeros(3))
    assert calls == ["conv"]


def test_auto_choice_per_op_on_cpu():
    """auto takes the cpu kernels on CPU for inference and for train-mode BN
    (level with or ahead of torch's composition in a step; docs/performance.md)."""
    from resnet_fused.ops import native, reference

    if backends.reason_unavailable("cpu") is not None:
        pytest.skip(f"cpu backend unavailable: {backends.reason_unavailable('cpu')}")
    cpu = torch.device("cpu")
    assert backends.resolve("conv_bn_act", cpu) is native.conv_bn_act
    assert backends.resolve("batch_norm_act", cpu) is native.batch_norm_act
    assert backends.resolve_name("batch_norm_act_parts", cpu) == "cpu"
    with resnet_fused.backend("eager"):
        assert backends.resolve("batch_norm_act", cpu) is reference.batch_norm_act


@pytest.mark.parametrize("device, name", device_backend_params())
def test_model_runs_under_every_backend_of_its_device(device, name):
    torch.manual_seed(0)
    model = resnet_fused.resnet18().eval().to(device)
    x = torch.randn(1, 3, 32, 32).to(device)
    with torch.no_grad():
        ref = model(x)
        with resnet_fused.backend(name):
            out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("device", device_params())
def test_each_backend_serves_the_devices_it_declares(device):
    """What conftest.PAIRS (and check/validate) rely on: on each device,
    auto picks a backend that declares that device, and every available
    backend either declares it or refuses its tensors naming the device."""
    x, w = torch.randn(1, 2, 4, 4, device=device), torch.randn(3, 2, 1, 1, device=device)
    scale, shift = torch.ones(3, device=device), torch.zeros(3, device=device)
    assert device in backends._REGISTRY[backends.resolve_name("conv_bn_act", x.device)].device_types
    for name in resnet_fused.available_backends():
        with resnet_fused.backend(name):
            if device in backends._REGISTRY[name].device_types:
                assert ops.conv_bn_act(x, w, scale, shift).device == x.device
            else:
                with pytest.raises(RuntimeError, match=f"backend '{name}' runs on .* but the input is on {device}"):
                    ops.conv_bn_act(x, w, scale, shift)
