"""The README's main job, `resnet-fused-check`, on a small model."""
import pytest
import torch

from resnet_fused import check
from conftest import HAS_CUDA, device_params


@pytest.mark.parametrize("device", device_params())
def test_check_passes_and_reports_every_backend_of_the_device(capsys, device):
    args = ["--model", "resnet18", "--batch", "2", "--size", "32", "--repeats", "1", "--device", device]
    code = check.main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "same parameters as torchvision for the same seed: True" in out
    assert f"fp32 on {device}" in out
    assert "all within" in out
    rows = [line.split()[0] for line in out.splitlines()[out.splitlines().index("") + 2:] if line.strip()]
    served = check.backends_for(torch.device(device))
    assert served and served[0] == "eager"
    for name in served:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    for name in set(check.resnet_fused.available_backends()) - set(served):  # e.g. cpu on a GPU machine
        assert f"backend {name:7s} available, but not for {device} tensors" in out
        assert name not in rows


def test_each_backend_is_checked_only_on_the_devices_it_serves():
    """The pairing that stops check (and validate, the benchmarks) from
    handing CUDA tensors to `cpu` or CPU tensors to `cuda`."""
    on_cpu, on_cuda = check.backends_for(torch.device("cpu")), check.backends_for(torch.device("cuda"))
    assert "cuda" not in on_cpu and "cpu" not in on_cuda
    assert "eager" in on_cpu and "eager" in on_cuda
    triton_devices = check.resnet_fused.backends._REGISTRY["triton"].device_types
    assert ("triton" in on_cpu) == ("cpu" in triton_devices)


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible")
def test_device_cuda_without_a_gpu_names_the_argument():
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device"):
        check.main(["--device", "cuda"])
