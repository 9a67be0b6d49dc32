"""The CPU inference engines a user would pick instead of resnet_fused, as
callables for `python -m resnet_fused.bench --peers ...`: onnxruntime and
OpenVINO, each running the torchvision model exported to ONNX (fp32, dynamic
batch). Optional: `pip install onnx onnxruntime openvino` (or
`pip install 'resnet_fused[peers]'`); absent engines are reported, not faked.
"""
from __future__ import annotations

import io
from typing import Optional

import torch
import torch.nn as nn

NAMES = ("onnxruntime", "openvino")


def unavailable(name: str) -> Optional[str]:
    """None if engine `name` can run here, else why not."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {', '.join(NAMES)}; got {name!r}")
    missing = [m for m in ("onnx", name) if not _importable(m)]
    return f"not installed: pip install {' '.join(missing)}" if missing else None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def export_onnx(model: nn.Module, size: int) -> bytes:
    """`model` (eval) as ONNX bytes with a dynamic batch dimension."""
    x = torch.randn(1, 3, size, size)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            model.eval(), (x,), buf, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    return buf.getvalue()


class Engine(nn.Module):
    """An ONNX model run by onnxruntime or OpenVINO, called like the torch
    model it was exported from (fp32 NCHW CPU tensor in, logits out)."""

    def __init__(self, name: str, onnx_model: bytes, threads: int) -> None:
        super().__init__()
        reason = unavailable(name)
        if reason is not None:
            raise RuntimeError(f"{name}: {reason}")
        self.name = name
        if name == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])
            self._run = lambda a: self._session.run(None, {"x": a})[0]
        else:
            import openvino as ov

            core = ov.Core()
            core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
            model = core.read_model(onnx_model, b"")
            compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
            self._request = compiled.create_infer_request()
            self._run = lambda a: self._request.infer({0: a})[compiled.output(0)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"{self.name}: x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
        return torch.from_numpy(self._run(x.contiguous().numpy()).copy())

    def __deepcopy__(self, memo):  # sessions are not copyable; one engine serves every copy
        return self
