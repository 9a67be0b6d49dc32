"""Metadata every benchmark records next to its timings."""
import torch


import contextlib


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
