"""resnet_fused: torchvision ResNets with fused conv+BatchNorm+ReLU kernels.

    import resnet_fused
    model = resnet_fused.resnet50()               # torchvision's signature and state_dict
    model = resnet_fused.fuse(torchvision_model)  # or convert an existing model
"""
__version__ = "0.1.0"

from resnet_fused import ops  # noqa: E402  (registers the eager backend)
from resnet_fused.ops import extension as _extension  # noqa: E402,F401  (loads _C, warns if missing)
from resnet_fused.ops import native as _native  # noqa: E402,F401  (registers the cpu and cuda backends)
from resnet_fused.ops import triton as _triton  # noqa: E402,F401  (registers the triton backend)
from resnet_fused.backends import (  # noqa: E402
    available_backends,
    backend,
    get_backend,
    set_backend,
)
from resnet_fused.cifar import (  # noqa: E402
    CifarBasicBlock,
    CifarResNet,
    cifar_resnet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
    cifar_resnet1202,
)
from resnet_fused.convert import FuseReport, fuse, unfuse  # noqa: E402
from resnet_fused.autotune import tune  # noqa: E402
from resnet_fused.ops.onednn import cpu_winograd, set_cpu_winograd  # noqa: E402
from resnet_fused.models import (  # noqa: E402
    FusedBasicBlock,
    FusedBottleneck,
    FusedResNet,
    bn_scale_shift,
    memory_efficient,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)

__all__ = [
    "__version__",
    "ops",
    "available_backends",
    "backend",
    "get_backend",
    "set_backend",
    "set_cpu_winograd",
    "cpu_winograd",
    "fuse",
    "unfuse",
    "FuseReport",
    "tune",
    "CifarResNet",
    "CifarBasicBlock",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet1202",
    "FusedResNet",
    "FusedBasicBlock",
    "FusedBottleneck",
    "bn_scale_shift",
    "memory_efficient",
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
]
