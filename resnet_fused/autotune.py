"""`resnet_fused.tune(model, example_input)`: tune every convolution of a
fused model ahead of serving, so the first requests — and graphs that
torch.compile traces, which time nothing — find their choices made and on
disk (docs/backends.md, "Tuning").
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from resnet_fused import backends
from resnet_fused.ops import common


def tune(model: nn.Module, example_input: torch.Tensor, batch_sizes: Optional[Iterable[int]] = None) -> dict:
    """Run `model`'s inference forward on `example_input` (and, with
    `batch_sizes`, on the same input repeated or cut to each of those batch
    sizes) under the triton backend, so every conv_bn_act shape is measured
    once and its choice cached in this process and on disk (`tuning_cache`).

    Pass the input as it will be served: dtype, memory format (channels_last
    is the fast one) and device decide the shapes tuned. The forward runs
    with BatchNorm in eval mode and no gradients; each module's train/eval
    mode is restored afterwards. A torch.compile'd model is tuned through
    its original module (a traced forward times nothing).

    Returns {problem: choice} for every convolution the forward ran, where
    `problem` names the shape, dtype, layouts and epilogue and `choice` is a
    tiling name (e.g. "m128n64k32w8s3") or "cudnn" (cuDNN + the Triton
    epilogue). Where there is nothing to tune — CPU tensors (CPU inference
    is not tuned per shape), or no usable triton backend — it warns why and
    returns {}. Under TRITON_INTERPRET=1 (tests) the forward runs but
    nothing is timed: the summary shows the fixed interpreter tiling.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tune: `model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"tune: `example_input` must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() == 0 or example_input.shape[0] == 0:
        raise ValueError(f"tune: `example_input` needs a non-empty batch dimension, got shape "
                         f"{tuple(example_input.shape)}")
    sizes = _batch_sizes(batch_sizes, example_input.shape[0])
    why_not = _nothing_to_tune(example_input)
    if why_not is not None:
        warnings.warn(f"resnet_fused.tune: nothing to tune: {why_not}", stacklevel=2)
        return {}
    if example_input.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("tune: cannot tune during CUDA-graph capture (timing launches and synchronises); "
                           "call it before capturing")
    from resnet_fused.ops.triton import tuning

    module = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule: its eager original
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with tuning.recording() as seen, torch.no_grad(), backends.backend("triton"):
            for b in sizes:
                module(_resized(example_input, b))
    finally:
        for m, training in modes.items():
            m.training = training
    if not seen:
        warnings.warn("resnet_fused.tune: the forward ran no fused convolution (conv_bn_act); fuse the model "
                      "first (resnet_fused.fuse) or build it with resnet_fused's constructors", stacklevel=2)
    return {tuning.problem(k): _name(c) for k, c in seen.items()}


def _batch_sizes(batch_sizes, default: int) -> list[int]:
    if batch_sizes is None:
        return [default]
    if isinstance(batch_sizes, (int, torch.Tensor, str)):
        raise TypeError(f"tune: `batch_sizes` must be an iterable of ints (e.g. [1, 8, 32]), got "
                        f"{type(batch_sizes).__name__}")
    sizes = list(batch_sizes)
    bad = [b for b in sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad or not sizes:
        raise ValueError(f"tune: `batch_sizes` must be positive ints, got {sizes!r}")
    return list(dict.fromkeys(sizes))


def _nothing_to_tune(x: torch.Tensor) -> Optional[str]:
    from resnet_fused.ops.triton import interpreting

    reason = backends.reason_unavailable("triton")
    if reason is not None:
        return f"the triton backend is unavailable ({reason})"
    if x.device.type == "cuda" or (x.device.type == "cpu" and interpreting()):
        return None
    return (f"`example_input` is on {x.device}; only CUDA convolutions (the triton backend) are tuned per "
            "shape, CPU inference needs no tuning")


def _resized(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`x` with `batch` samples (its own repeated or cut), in x's layout."""
    if batch == x.shape[0]:
        return x
    index = torch.arange(batch, device=x.device) % x.shape[0]
    return x.index_select(0, index).contiguous(memory_format=common.memory_format(x))


def _name(choice) -> str:
    return getattr(choice, "name", str(choice))
