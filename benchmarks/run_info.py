"""Metadata every benchmark records next to its timings."""
import torch


def record_run_info(benchmark, device, input_shape):
    """extra_info every model benchmark carries: where and on what it ran."""
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        batch=input_shape[0],
        dtype="float32",
    )
