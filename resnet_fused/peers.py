"""The CPU inference engines a user would pick instead of resnet_fused, as
callables for `python -m resnet_fused.bench --peers ...`: onnxruntime and
OpenVINO, each running the torchvision model exported to ONNX (dynamic batch;
fp32 in and out). They compute in fp32, and OpenVINO also in bf16 or fp16
where the CPU has the instructions (its inference precision hint: on an AMX
CPU bf16 is OpenVINO's default). Optional: `pip install onnx onnxruntime
openvino` (or `pip install 'resnet_fused[peers]'`); absent engines, and
precisions an engine or CPU lacks, are reported, not faked.
"""
from __future__ import annotations

import io
from typing import Optional

import torch
import torch.nn as nn

NAMES = ("onnxruntime", "openvino")


# OpenVINO's inference precision hint per compute dtype, and the CPU
# capability it needs (`OPTIMIZATION_CAPABILITIES`)
_OPENVINO_PRECISION = {torch.float32: ("f32", "FP32"), torch.bfloat16: ("bf16", "BF16"),
                       torch.float16: ("f16", "FP16")}


def unavailable(name: str, dtype: torch.dtype = torch.float32) -> Optional[str]:
    """None if engine `name` can compute in `dtype` here, else why not."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {', '.join(NAMES)}; got {name!r}")
    missing = [m for m in ("onnx", name) if not _importable(m)]
    if missing:
        return f"not installed: pip install {' '.join(missing)}"
    if dtype == torch.float32:
        return None
    if name == "onnxruntime":
        return f"onnxruntime's CPU provider computes convolutions in fp32 only, not {_short(dtype)}"
    if dtype not in _OPENVINO_PRECISION:
        return f"OpenVINO has no {_short(dtype)} inference precision"
    import openvino as ov

    capability = _OPENVINO_PRECISION[dtype][1]
    if capability not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return f"OpenVINO: this CPU has no {capability} inference (OPTIMIZATION_CAPABILITIES)"
    return None


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def onnxruntime_session(onnx_model: bytes, threads: int, profile: bool = False):
    """onnxruntime's CPU session for `onnx_model` as the bench runs it
    (`threads` intra-op threads, one inter-op), with its profiler on if
    `profile` (`resnet_fused.layer_times`; the file `end_profiling()` names
    goes to the temporary directory, not the working one: the caller
    removes it)."""
    import os
    import tempfile

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.enable_profiling = threads, 1, profile
    if profile:
        opts.profile_file_prefix = os.path.join(tempfile.gettempdir(), "resnet_fused_onnxruntime_profile")
    return ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])


class PrecisionUnavailable(RuntimeError):
    """The engine compiled the model for another precision than asked (an
    OpenVINO fallback, e.g. under ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU)."""


class Engine(nn.Module):
    """An ONNX model run by onnxruntime or OpenVINO, called like the torch
    model it was exported from (fp32 NCHW CPU tensor in, fp32 logits out),
    computing in `dtype`."""

    def __init__(self, name: str, onnx_model: bytes, threads: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        reason = unavailable(name, dtype)
        if reason is not None:
            raise RuntimeError(f"{name}: {reason}")
        self.name, self.dtype = name, dtype
        if name == "onnxruntime":
            self._session = onnxruntime_session(onnx_model, threads)
            self._run = lambda a: self._session.run(None, {"x": a})[0]
        else:
            import openvino as ov

            core = ov.Core()
            hint = _OPENVINO_PRECISION[dtype][0]
            core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint})
            model = core.read_model(onnx_model, b"")
            compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
            used = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
            if _short(dtype) not in used:  # prints as <Type: 'bfloat16'>; never time a fallback
                raise PrecisionUnavailable(f"OpenVINO: asked for {hint} inference, compiled for {used}")
            self._request = compiled.create_infer_request()
            self._run = lambda a: self._request.infer({0: a})[compiled.output(0)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"{self.name}: x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
        return torch.from_numpy(self._run(x.contiguous().numpy()).copy())

    def __deepcopy__(self, memo):  # sessions are not copyable; one engine serves every copy
        return self
