import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-batch", type=int, default=None, help="batch size (default: 8 on CPU, 64 on CUDA)")
    parser.addoption("--bench-size", type=int, default=None, help="input side (default: 112 on CPU, 224 on CUDA)")
    parser.addoption(
        "--bench-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="autocast dtype (default: bfloat16 on CUDA, float32 = no autocast on CPU)",
    )
    parser.addoption(
        "--bench-compile", action="store_true", help="add torch.compile rows (compilation takes minutes)"
    )


@pytest.fixture(scope="session")
def device():
    from run_info import default_device

    return default_device()


@pytest.fixture(scope="session")
def input_shape(request, device):
    batch = request.config.getoption("--bench-batch") or (64 if device.type == "cuda" else 8)
    size = request.config.getoption("--bench-size") or (224 if device.type == "cuda" else 112)
    return (batch, 3, size, size)



@pytest.fixture(scope="session")
def amp_dtype(request, device):
    name = request.config.getoption("--bench-dtype") or ("bfloat16" if device.type == "cuda" else "float32")
    return getattr(torch, name)


def pytest_generate_tests(metafunc):
    if "compiled" in metafunc.fixturenames:
        values = [False, True] if metafunc.config.getoption("--bench-compile") else [False]
        metafunc.parametrize("compiled", values, ids=["compile" if v else "no-compile" for v in values])
