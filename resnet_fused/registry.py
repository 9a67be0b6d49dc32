"""The fused ImageNet ResNets by name: one list (`MODEL_NAMES`) that the
builders, `resnet_fused.__all__`, `list_models`/`get_model` and the tests all
read.

Each builder wraps torchvision's: the same signature, weights API (the
legacy `pretrained=` included) and errors; the model it returns is
converted to fused modules in place (`convert.fuse`).
"""
from __future__ import annotations

import functools

import torch.nn as nn
import torchvision.models as tvm

from resnet_fused.convert import fuse
from resnet_fused.models import FusedResNet

MODEL_NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


def _fused_constructor(name: str):
    torchvision_fn = getattr(tvm, name)
    weights_enum = tvm.get_model_weights(name)

    @functools.wraps(torchvision_fn)
    def build(*args, **kwargs) -> FusedResNet:
        _check_weights_name(weights_enum, kwargs.get("weights"))
        return fuse(torchvision_fn(*args, **kwargs), inplace=True)

    build.__module__ = "resnet_fused"
    build.__doc__ = (
        f"Fused {name}: torchvision.models.{name} "
        "(same arguments, weights and state_dict) with fused conv+BN+ReLU and residual epilogues.\n\n"
        + (torchvision_fn.__doc__ or "")
    )
    return build


def _check_weights_name(weights_enum, weights) -> None:
    """torchvision answers an unknown weights name with a bare KeyError; say
    what is accepted instead. Everything else is left to torchvision."""
    if not isinstance(weights, str) or weights == "legacy":
        return
    try:
        weights_enum.verify(weights)
    except KeyError:
        names = ", ".join(repr(n) for n in dict.fromkeys(["DEFAULT", *weights_enum.__members__]))
        raise ValueError(
            f"weights must be None, a {weights_enum.__name__} member or one of {names}; got {weights!r}"
        ) from None


BUILDERS = {name: _fused_constructor(name) for name in MODEL_NAMES}


def list_models() -> list[str]:
    """The names of the fused ImageNet ResNets (torchvision's names)."""
    return list(MODEL_NAMES)


def get_model(name: str, **config) -> nn.Module:
    """The fused model `name` built with torchvision's keyword arguments
    (`weights=`, `num_classes=`, ...), as `torchvision.models.get_model`."""
    if name not in BUILDERS:
        raise ValueError(f"name must be one of {', '.join(MODEL_NAMES)}; got {name!r}")
    return BUILDERS[name](**config)
