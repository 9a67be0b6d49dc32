"""Build resnet_fused and its C++/CUDA extension, resnet_fused._C.

CUDA kernels are built when torch is a CUDA build and nvcc is found; whether a
GPU is visible never matters, so a machine without one builds sm_80/sm_90 code.

Environment:
  RESNET_FUSED_NO_CUDA=1   build only the C++ (CPU) part of the extension
  TORCH_CUDA_ARCH_LIST     GPU architectures (default here: "8.0;9.0+PTX")
  MAX_JOBS                 parallel compile jobs (read by torch's ninja build)
  RESNET_FUSED_PTXAS_VERBOSE=1   print registers/spills per CUDA kernel
"""
import glob
import os
import re
import subprocess

from setuptools import find_packages, setup



def _find_cuda_home():
    """The CUDA toolkit root: the first candidate holding both nvcc and the
    runtime headers. torch guesses the parent of `which nvcc`, which is wrong
    when nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc)."""
    import shutil

    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
        "/usr/local/cuda",
    ]
    for root in candidates:
        if root and all(
            os.path.exists(os.path.join(root, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
        ):
            return root
    return None


if _find_cuda_home() is not None:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = _find_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"could not read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def _build_cuda():
    """Whether to compile csrc/cuda, and why (printed in the build log)."""
    if os.environ.get("RESNET_FUSED_NO_CUDA", "0") not in ("", "0"):
        return False, "RESNET_FUSED_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        return False, "no CUDA toolkit with nvcc and headers was found (set CUDA_HOME)"
    toolkit_major, toolkit_minor = _nvcc_version(nvcc)
    torch_major = int(torch.version.cuda.split(".")[0])
    if toolkit_major != torch_major:
        raise RuntimeError(
            f"The CUDA toolkit at {CUDA_HOME} is {toolkit_major}.{toolkit_minor} but torch "
            f"{torch.__version__} was built with CUDA {torch.version.cuda}; the major versions "
            "must match. Point CUDA_HOME at a matching toolkit, install the torch build for "
            f"CUDA {toolkit_major}, or set RESNET_FUSED_NO_CUDA=1 to build the CPU part only."
        )
    return True, f"nvcc {toolkit_major}.{toolkit_minor} at {nvcc}, torch CUDA {torch.version.cuda}"


def _extension():
    use_cuda, why = _build_cuda()
    print(f"resnet_fused: building CUDA kernels: {use_cuda} ({why})")
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: no fused multiply-adds behind our back, so every
    # target clone of csrc/cpu/kernels.cpp rounds like the eager reference
    # -fopenmp: at::parallel_for is an OpenMP loop compiled into the caller;
    # without the flag it silently runs on one thread. libgomp.so.1 is then
    # the one torch already loaded (same soname), so there is one pool.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if os.environ.get("RESNET_FUSED_VEC_REPORT", "0") not in ("", "0"):
        cxx_flags.append("-fopt-info-vec-optimized")
    if not use_cuda:
        return CppExtension(
            "resnet_fused._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # An empty list makes torch derive it from a visible GPU, and there may
        # be none; build for Ampere and Hopper, with PTX for newer parts.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    print(f"resnet_fused: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
    if os.environ.get("RESNET_FUSED_PTXAS_VERBOSE", "0") not in ("", "0"):
        nvcc_flags.append("-Xptxas=-v")
    return CUDAExtension(
        "resnet_fused._C",
        cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


def _read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _version():
    # written once, in resnet_fused/__init__.py
    match = re.search(r'^__version__ = "([^"]+)"$', _read("resnet_fused/__init__.py"), re.M)
    if match is None:
        raise RuntimeError("resnet_fused/__init__.py has no __version__ line")
    return match.group(1)


setup(
    name="resnet_fused",
    version=_version(),
    description="Fused conv+BatchNorm+ReLU and residual epilogues for torchvision ResNets",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["resnet_fused", "resnet_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "torchvision>=0.21"],
    # plot: only for `python -m resnet_fused.bench --plot`
    extras_require={
        # the test extra brings the CPU peer engines too, so their bench rows are tested, and
        # timm, so its models are tested through fuse()
        "test": ["pytest", "pytest-benchmark", "onnx", "onnxruntime", "openvino", "timm"],
        "peers": ["onnx", "onnxruntime", "openvino"],  # python -m resnet_fused.bench --peers
        "plot": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "resnet-fused-check = resnet_fused.check:main",
            "resnet-fused-bench = resnet_fused.bench:main",
            "resnet-fused-validate = resnet_fused.validate:main",
        ]
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
