"""Metadata every benchmark records next to its timings, and which backends
a benchmark row may use."""
import contextlib

import torch

from resnet_fused.check import backends_for


def default_device() -> torch.device:
    """The device the benchmarks run on (conftest's `device` fixture)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_backends() -> list:
    """The available backends that compute on default_device()'s tensors:
    no `cpu` rows on a GPU (it takes CPU tensors only), no `cuda` rows on
    the CPU, `triton` on the CPU only under TRITON_INTERPRET=1."""
    return backends_for(default_device())


def record_run_info(benchmark, device, input_shape, dtype=torch.float32):
    """extra_info every model benchmark carries: where and on what it ran."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        batch=input_shape[0],
        dtype=str(dtype).replace("torch.", "") + (" (autocast)" if dtype != torch.float32 else ""),
    )


def autocast(device, dtype):
    """torch.autocast for low-precision runs; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
