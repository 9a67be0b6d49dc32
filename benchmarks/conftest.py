import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-batch", type=int, default=None, help="batch size (default: 8 on CPU, 64 on CUDA)")
    parser.addoption("--bench-size", type=int, default=None, help="input side (default: 112 on CPU, 224 on CUDA)")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def input_shape(request, device):
    batch = request.config.getoption("--bench-batch") or (64 if device.type == "cuda" else 8)
    size = request.config.getoption("--bench-size") or (224 if device.type == "cuda" else 112)
    return (batch, 3, size, size)

