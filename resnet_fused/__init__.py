"""resnet_fused: torchvision ResNets with fused conv+BatchNorm+ReLU kernels.

    import resnet_fused
    model = resnet_fused.resnet50()               # torchvision's signature and state_dict
    model = resnet_fused.fuse(torchvision_model)  # or convert an existing model
"""
# the one place the version is written (setup.py reads it from here)
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
from resnet_fused.convert import FuseReport, fuse, memory_efficient, unfuse  # noqa: E402
from resnet_fused.autotune import tune  # noqa: E402
from resnet_fused.models import FusedBasicBlock, FusedBottleneck, FusedResNet  # noqa: E402
from resnet_fused.ops.cpu.onednn import cpu_winograd, set_cpu_winograd  # noqa: E402
from resnet_fused.ops.fold import bn_scale_shift  # noqa: E402
from resnet_fused.registry import BUILDERS as _BUILDERS  # noqa: E402
from resnet_fused.registry import MODEL_NAMES, get_model, list_models  # noqa: E402
from resnet_fused.sync_batch_norm import FusedSyncBatchNorm, convert_sync_batchnorm  # noqa: E402

# resnet18 ... wide_resnet101_2, from the registry's one list
globals().update(_BUILDERS)

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
    "memory_efficient",
    "FusedSyncBatchNorm",
    "convert_sync_batchnorm",
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
    "MODEL_NAMES",
    "list_models",
    "get_model",
    *MODEL_NAMES,
]
