"""Ahead-of-time compilation, for sm_80 and sm_90 without a GPU, of exactly
the kernel variants the launcher produces for ResNet's real layers, and what
the compiled code says about itself.

Long on purpose (one reason to change: what the report compiles and says): the
variant enumeration, the compile driver and the report read the same Job records.

    python -m resnet_fused.ops.triton.aot            # every variant (minutes on a few cores)
    python -m resnet_fused.ops.triton.aot --quick    # a representative subset (tests/ops/test_triton_aot.py)

A Triton kernel is compiled per launch-time specialisation: an int argument
equal to 1 becomes a constant, and ints and pointers divisible by 16 are
marked so (vectorised, `cp.async` loads follow from it). A variant compiled
with every int a plain i32 is one no launch ever runs. So the variants here
come from the launch code itself: `conv.launch` and `batch_norm.forward` /
`backward` run on meta tensors of each layer's real shapes and strides
(resnet18, resnet50, resnext50_32x4d; batch 1, 32 and 256; NCHW and
channels_last; fp16, bf16, fp32 with TF32 and without — the `ieee` variant
the tests use) with a recording launcher in place of the kernel, and the
recorded arguments go through Triton's own binder (the function
`JITFunction.run` builds to specialise) and `_pack_args`. Identical variants
are compiled once; each row says how many layers launch it.

Per variant: registers per thread, spills (STACK + LOCAL from cuobjdump),
shared memory (Triton's dynamic allocation plus static), whether loads use
`cp.async`, the tensor-core instruction (`mma.sync`; `wgmma`, Hopper's
warpgroup MMA, on sm_90 where the tile allows), and the widest global load
and store (`ld/st bits`: 128 is a 16-byte vector access; the BN kernels'
variant names carry their tiling, "planes vecV" in NCHW, V elements per
access at most). A variant passes with no
spills, shared memory within the SM limit and, for the convolution, tensor
cores.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional

import torch

ARCHS = (80, 90)
# Shared memory per SM a block may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 166912, 90: 232448}
MAX_REGISTERS = 255

MODELS = ("resnet18", "resnet50", "resnext50_32x4d")
BATCHES = (1, 32, 256)
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# name -> (dtype, TF32 allowed): fp32 runs `ieee` unless TF32 is on (conv.input_precision)
DTYPES = {
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
    "fp32-ieee": (torch.float32, False),
    "fp32-tf32": (torch.float32, True),
}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution of a model as the fused eval forward calls it."""

    model: str
    name: str
    x_shape: tuple
    w_shape: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    residual: bool  # the block's last conv: residual add + ReLU fused
    relu: bool


@dataclasses.dataclass
class Job:
    kernel: str  # name in _kernels()
    variant: str  # human-readable: tiling, dtype, layout, ...
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    needs_mma: bool
    uses: list = dataclasses.field(default_factory=list)  # "model batch layer" launching it
    needs_tma: bool = False  # the Hopper kernel (conv_tma): TMA loads and wgmma required

    @property
    def spec(self) -> str:
        """A short name of the launch-time specialisation (ints equal to 1,
        divisibility by 16), the part a plain-i32 signature leaves out."""
        runtime = [(i, v) for (i,), v in self.constexprs.items() if not _arg_name(self, i).isupper()]
        attrs = [(i, a) for (i,), a in self.attrs.items() if self.signature[_arg_name(self, i)] != "constexpr"]
        text = repr((self.kernel, sorted(runtime), sorted(attrs)))
        return hashlib.sha1(text.encode()).hexdigest()[:6]


@dataclasses.dataclass
class Result:
    job: Job
    registers: int = -1
    spill_bytes: int = -1  # ptxas: spill stores + spill loads
    stack_bytes: int = -1  # ptxas: stack frame (a call's, e.g. 64-bit division; not a spill)
    shared_bytes: int = -1
    cp_async: Optional[bool] = None
    mma: str = ""  # "wgmma", "mma", or "" for none
    error: Optional[str] = None
    tma: Optional[bool] = None  # TMA loads (cp.async.bulk.tensor) in the PTX
    # the widest global load and store in the PTX, bits (128: 16-byte vectors)
    load_bits: int = 0
    store_bits: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.spill_bytes == 0
            and self.shared_bytes <= SMEM_LIMIT[self.job.arch]
            and (bool(self.mma) or not self.job.needs_mma)
            and (not self.job.needs_tma or (bool(self.tma) and self.mma == "wgmma"))
        )


@functools.lru_cache(maxsize=None)
def _kernels():
    from resnet_fused.ops.triton import batch_norm, conv, conv_tma

    return {
        "conv_bn_act": conv.conv_bn_act_kernel,
        "conv_tma": conv_tma.conv_tma_kernel,
        **{f"bn_{name}": k for name, k in batch_norm.KERNELS.items()},
    }


# ---- the layers -------------------------------------------------------------


def _role(name: str, block) -> tuple[bool, bool]:
    """(residual, relu) of a conv in torchvision's blocks: the block's last
    conv takes the residual and the ReLU, the downsample conv neither."""
    from torchvision.models.resnet import BasicBlock

    if name.endswith("downsample.0"):
        return False, False
    last = "conv2" if isinstance(block, BasicBlock) else "conv3"
    return name.endswith(last), True


def layers(models=MODELS, batch: int = 32) -> list[Layer]:
    """Every convolution of `models` at `batch` (224×224 input), from a
    forward on the meta device."""
    import torchvision

    out = []
    for model_name in models:
        model = getattr(torchvision.models, model_name)().to("meta")
        blocks = {name: m for name, m in model.named_modules() if name.count(".") == 1}
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                residual, relu = _role(name, blocks.get(name.rsplit(".", 1)[0].replace(".downsample", "")))

                def record(mod, args, _out, name=name, residual=residual, relu=relu):
                    out.append(Layer(model_name, name, tuple(args[0].shape), tuple(mod.weight.shape), mod.stride,
                                     mod.padding, mod.dilation, mod.groups, residual, relu))

                hooks.append(m.register_forward_hook(record))
        with torch.no_grad():
            model(torch.empty(batch, 3, 224, 224, device="meta"))
        for h in hooks:
            h.remove()
    return out


# ---- launch-time specialisation ------------------------------------------------


class _Recorder:
    """Stands in for a kernel launcher (`kernel[grid](*args, **kwargs)`) and
    records the arguments instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@functools.lru_cache(maxsize=None)
def _binder(fn, arch: int):
    """(backend, binder) as JITFunction builds them for a device of `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def _launch_variant(fn, args: tuple, kwargs: dict, arch: int) -> tuple[tuple, Callable[[], tuple]]:
    """What `fn[grid](*args, **kwargs)` compiles on `arch`, as JITFunction.run
    decides it, on meta tensors (data_ptr 0: aligned, as CUDA allocations
    are): (the JIT's cache key — one compiled kernel per key —, a function
    giving the (signature, constexprs, attrs, options) it compiles with).
    Triton's own binder specialises (ints equal to 1, divisibility by 16);
    `_pack_args` turns that into the compile's arguments."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    backend, binder = _binder(fn, arch)
    # the options JITFunction.run adds before binding
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*args, **kwargs)
    key = (fn.__name__, arch, compute_cache_key({}, specialization, options))

    def pack() -> tuple:
        opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        return signature, constexprs, attrs, dict(opts.__dict__)

    return key, pack


@contextlib.contextmanager
def _tf32(allowed: bool):
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _meta(shape, dtype, fmt) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)


def _model_affine(vec: torch.Tensor):
    """The epilogue a model's pairs launch: the eval-mode BN with γ and β
    folded in the kernel (layers.conv_norm_act → ops.conv_bn_act_eval).
    The given-(scale, shift) variant of the public op is the same code with
    those loads and five instructions left out."""
    from resnet_fused.ops.triton.fold import Affine

    return Affine.batch_norm(vec, vec, vec, vec, 1e-5)


def conv_launches(layer: Layer, dtype: torch.dtype, fmt) -> list[tuple]:
    """(config, args, kwargs) of every launch conv_bn_act can make for
    `layer`: one per tiling the tuner may pick (library.triton_conv_bn_act)."""
    from resnet_fused.ops import conv_out_size
    from resnet_fused.ops.triton import conv, library

    x = _meta(layer.x_shape, dtype, fmt)
    w = _meta(layer.w_shape, dtype, fmt)
    shape = conv_out_size(layer.x_shape, layer.w_shape, layer.stride, layer.padding, layer.dilation)
    out = conv.output_like(x, shape)
    residual = _meta(shape, dtype, fmt) if layer.residual else None
    vec = torch.empty(layer.w_shape[0], device="meta")
    index_64 = conv.needs_int64(x, w, residual) or library.out_needs_int64(shape)
    launches = []
    for cfg in conv.configs_for(dtype, layer.w_shape[1], index_64, conv.channels_contiguous(x, w, residual)):
        rec = _Recorder()
        conv.launch(x, w, _model_affine(vec), residual, layer.relu, layer.stride, layer.padding, layer.dilation, layer.groups,
                    out, cfg, rec)
        launches += [(cfg, *call) for call in rec.calls]
    return launches


def bn_launches(layer: Layer, dtype: torch.dtype, fmt) -> list[tuple]:
    """(kernel name, args, kwargs) of train-mode batch_norm_act forward and
    backward on `layer`'s output, and of the cuDNN path's epilogue."""
    from resnet_fused.ops import conv_out_size
    from resnet_fused.ops.triton import batch_norm

    shape = conv_out_size(layer.x_shape, layer.w_shape, layer.stride, layer.padding, layer.dilation)
    x = _meta(shape, dtype, fmt)
    residual = _meta(shape, dtype, fmt) if layer.residual else None
    vec = torch.empty(shape[1], device="meta")
    rec = {name: _Recorder() for name in batch_norm.KERNELS}
    out, mean, invstd, _ = batch_norm.forward(x, vec, vec, 1e-5, residual, layer.relu, rec)
    batch_norm.backward(torch.empty_like(out), x, out, vec, mean, invstd, layer.relu, layer.residual, rec)
    epilogue = {"affine_act": _Recorder()}
    batch_norm.affine_act_(x, _model_affine(vec), residual, layer.relu, epilogue)
    calls = [(name, *call) for name, r in rec.items() for call in r.calls]
    return calls + [("affine_act", *call) for call in epilogue["affine_act"].calls]


def bn_tiling(kwargs: dict) -> str:
    """The BN kernels' tiling in a variant's name: " planes vecV" (NCHW:
    tiles inside one image's planes, L and the strides multiples of V
    elements, batch_norm._tiling), " rows", or "" for the per-channel final
    kernels."""
    if "PLANES" not in kwargs:
        return ""
    return f" planes vec{kwargs['VEC']}" if kwargs["PLANES"] else " rows"


def _add(found: dict, kernel: str, variant: str, arch: int, call: tuple, needs_mma: bool, where: str) -> None:
    """Record one launch: a new Job for a variant not seen yet, else one more
    use of the one it compiles to."""
    args, kwargs = call
    key, pack = _launch_variant(_kernels()[kernel], args, kwargs, arch)
    if key in found:
        found[key].uses.append(where)
    else:
        found[key] = Job(kernel, variant, arch, *pack(), needs_mma, [where])


def jobs(quick: bool = False, models=MODELS, batches=BATCHES, archs=ARCHS) -> list[Job]:
    """One job per distinct (kernel variant, arch) the launcher produces."""
    found: dict = {}
    selection = _quick_selection() if quick else None
    for batch in batches:
        for layer in layers(models, batch):
            for dname, (dtype, tf32) in DTYPES.items():
                for lname, fmt in LAYOUTS.items():
                    pick = selection(layer, dname, lname) if selection else (True, True)
                    if not any(pick):
                        continue
                    where = f"{layer.model} b{batch} {layer.name}"
                    with _tf32(tf32):
                        conv_calls = conv_launches(layer, dtype, fmt) if pick[0] else []
                        bn_calls = bn_launches(layer, dtype, fmt) if pick[1] and not tf32 else []
                    for cfg, args, kwargs in conv_calls:
                        flat = "flat" if kwargs["FLAT_RSC"] else "cblk"
                        index = "int64" if kwargs["INDEX_64"] else "int32"
                        variant = f"{cfg.name} {dname} {lname} {flat} {index}"
                        # fp32 `ieee` runs on the FMA units: there is no exact-fp32 MMA
                        mma = not (dtype == torch.float32 and kwargs["INPUT_PRECISION"] == "ieee")
                        for arch in archs:
                            _add(found, "conv_bn_act", variant, arch, (args, kwargs), mma, where)
                    for name, args, kwargs in bn_calls:
                        variant = f"{dname} {lname}{bn_tiling(kwargs)}"
                        for arch in archs:
                            _add(found, f"bn_{name}", variant, arch, (args, kwargs), False, where)
    return list(found.values())


# resnet50's BN outputs at 112², 56², 28², 14², 7² (the stem's without a
# residual, the others with one): the NCHW planes with VEC 16, 4 and 1
QUICK_NCHW_BN_LAYERS = ("conv1", "layer1.0.conv3", "layer2.0.conv3", "layer3.0.conv3", "layer4.0.conv3")
QUICK_NCHW_BN_DTYPES = ("fp32-ieee", "bf16", "fp16")


def _quick_selection():
    """The representative subset, at batch 32: resnet50's layer2.0.conv2
    (3×3 stride 2) in every fp16 tiling in channels_last, one NCHW and one
    bf16 variant; the stem (flattened reduction) in fp16; the fp32 `ieee`
    variant the tests use for both, in both layouts; a ResNeXt grouped conv
    in bf16; every BN kernel once in channels_last (bf16), and in NCHW at
    each map size of QUICK_NCHW_BN_LAYERS in fp32, bf16 and fp16. Returns a
    function of (layer, dtype, layout) -> (include its conv launches?, its
    BN launches?)."""

    def select(layer: Layer, dtype: str, layout: str) -> tuple[bool, bool]:
        stem = layer.name == "conv1"
        conv_pick = bn_pick = False
        if layer.model == "resnet50" and layer.name in ("layer2.0.conv2", "conv1"):
            conv_pick = (dtype == "fp16" and (layout == "nhwc" or not stem)) or (dtype == "fp32-ieee") or (
                dtype == "bf16" and layout == "nhwc" and not stem)
            bn_pick = layer.name == "layer2.0.conv2" and dtype == "bf16" and layout == "nhwc"
        if layer.model == "resnext50_32x4d" and layer.name == "layer1.0.conv2":
            conv_pick = dtype == "bf16" and layout == "nhwc"
        if layer.model == "resnet50" and layer.name in QUICK_NCHW_BN_LAYERS and layout == "nchw":
            bn_pick = bn_pick or dtype in QUICK_NCHW_BN_DTYPES
        return conv_pick, bn_pick

    return select


def _limit_quick(jobs_: list[Job]) -> list[Job]:
    """In the quick subset, NCHW and bf16 conv variants once each per arch
    (the first tiling); fp16 channels_last keeps every tiling."""
    seen, keep = set(), []
    for j in jobs_:
        parts = j.variant.split()
        if j.kernel == "conv_bn_act" and not (parts[1] == "fp16" and parts[2] == "nhwc"):
            k = (parts[1], parts[2], parts[3], j.arch)
            if k in seen:
                continue
            seen.add(k)
        keep.append(j)
    return keep


# ---- the Hopper (TMA) kernel: sm_90 only -------------------------------------------

TMA_ARCH = 90
# The persistent grid is min(SMs, tiles) at launch: an int argument, so its
# value decides the specialisation (1, divisible by 16) like any other. H100
# SXM and H200 have 132 SMs.
TMA_SMS = 132
TMA_DTYPES = ("fp16", "bf16")


def tma_launches(layer: Layer, dtype: torch.dtype) -> list[tuple]:
    """(config, args, kwargs) of every launch of the Hopper kernel the tuner
    may make for `layer` (channels_last: `conv_tma.applies` requires it);
    none where it does not apply. The arguments come from `conv_tma.launch`
    itself, host TensorDescriptors included: their type (dtype and block
    shape) is part of the signature, their sizes and strides travel in the
    CUtensorMap built at launch and specialise nothing."""
    from resnet_fused.ops import conv_out_size
    from resnet_fused.ops.triton import conv_tma
    from resnet_fused.ops.triton.fold import Affine

    fmt = torch.channels_last
    x = _meta(layer.x_shape, dtype, fmt)
    w = _meta(layer.w_shape, dtype, fmt)
    shape = conv_out_size(layer.x_shape, layer.w_shape, layer.stride, layer.padding, layer.dilation)
    residual = _meta(shape, dtype, fmt) if layer.residual else None
    if not conv_tma.applies(x, w, residual, layer.stride, layer.padding, layer.dilation, layer.groups):
        return []
    vec = torch.empty(layer.w_shape[0], device="meta")
    launches = []
    # the models' epilogue (BN folded) and the public op's (scale, shift
    # given): their tilings differ (conv_tma.configs_for)
    for affine in (_model_affine(vec), Affine.given(vec, vec)):
        for cfg in conv_tma.configs_for(affine):
            rec = _Recorder()
            conv_tma.launch(x, w, affine, residual, layer.relu, layer.stride, layer.padding, layer.dilation,
                            layer.groups, conv_tma.output_like(x, shape), cfg, rec, sms=TMA_SMS)
            launches += [(cfg, *call) for call in rec.calls]
    return launches


def tma_jobs(quick: bool = False, models=MODELS, batches=BATCHES) -> list[Job]:
    """One job per distinct variant of the Hopper kernel the launcher
    produces, for sm_90. Quick: resnet50 at batch 32 in bf16, three layers
    that take the three paths (1×1 GEMM with the residual, 3×3 stride 2,
    3×3 stride 1 on 7×7 maps: several images per tile)."""
    found: dict = {}
    quick_layers = ("layer1.0.conv3", "layer2.0.conv2", "layer4.1.conv2")
    for batch in ((32,) if quick else batches):
        for layer in layers(("resnet50",) if quick else models, batch):
            if quick and layer.name not in quick_layers:
                continue
            for dname in (("bf16",) if quick else TMA_DTYPES):
                for cfg, args, kwargs in tma_launches(layer, DTYPES[dname][0]):
                    path = "gemm" if kwargs["GEMM"] else f"s{kwargs['STRIDE']}"
                    epilogue = "bn" if kwargs["BN"] else "given"
                    variant = f"{cfg.name} {dname} {path} nhwc {epilogue}"
                    where = f"{layer.model} b{batch} {layer.name}"
                    _add(found, "conv_tma", variant, TMA_ARCH, (args, kwargs), True, where)
    for job in found.values():
        job.needs_tma = True
    return list(found.values())


# ---- compiling and reading the result --------------------------------------------


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _wgmma_possible(job: Job) -> bool:
    """Hopper's warpgroup MMA needs a warpgroup (4 warps) per 64 rows of the
    tile; smaller tiles use mma.sync on sm_90 too."""
    block_m = next((v for (i,), v in job.constexprs.items() if _arg_name(job, i) == "BLOCK_M"), 0)
    return job.arch >= 90 and block_m >= 64 and job.options["num_warps"] % 4 == 0


def _arg_name(job: Job, index: int) -> str:
    return list(job.signature)[index]


def compile_job(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton import knobs

    fn = _kernels()[job.kernel]
    log = io.StringIO()
    try:
        src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        # compile even if cached, and print Triton's own ptxas -v log: the
        # spill counts come from there (cuobjdump's STACK is a stack frame,
        # which a call needs without spilling)
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            k = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as e:  # a variant that does not compile is a row of the report, not a crash
        return Result(job, error=f"{type(e).__name__}: {e}".splitlines()[0][:200])
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if frame is None:
        return Result(job, error=f"no ptxas report in: {log.getvalue()[:200]!r}")
    stack_frame, spill_stores, spill_loads = map(int, frame.groups())
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        return Result(job, error=f"unreadable cuobjdump output: {usage[:200]}")
    reg, _stack, static_shared, _local = map(int, m.groups())
    mma = "wgmma" if re.search(r"\bwgmma\.mma_async", ptx) else ("mma" if re.search(r"\bmma\.sync", ptx) else "")
    if job.needs_mma and _wgmma_possible(job) and mma != "wgmma":
        mma = ""  # sm_90 tile that could use wgmma but does not: not the tensor-core path asked for
    return Result(job, reg, spill_stores + spill_loads, stack_frame, static_shared + k.metadata.shared,
                  "cp.async" in ptx, mma, tma="cp.async.bulk.tensor" in ptx,
                  load_bits=widest_access(ptx, "ld"), store_bits=widest_access(ptx, "st"))


def widest_access(ptx: str, op: str) -> int:
    """The widest global `ld` or `st` in PTX text, in bits: `.v4.b32` is
    128 (a 16-byte vector access), a scalar `.b16` 16."""
    widest = 0
    for vec, bits in re.findall(rf"\b{op}\.global(?:\.[a-z_0-9:]+)*?(?:\.v(\d))?\.[bfus](\d+)\b", ptx):
        widest = max(widest, int(vec or 1) * int(bits))
    return widest


def run(quick: bool = False, workers: Optional[int] = None, models=MODELS, batches=BATCHES,
        tilings: Optional[set] = None, tma: Optional[bool] = None) -> list[Result]:
    """Compile the jobs (`tilings`: only conv variants in these tilings, by
    ConvConfig.name, and no BN kernels) in `workers` processes. `tma`: True
    compiles the Hopper kernel's variants only; by default the full report
    has them and the quick one does not (its own test is
    tests/ops/test_triton_tma.py)."""
    if tma:
        todo = tma_jobs(quick, models, batches)
    else:
        todo = jobs(quick, models, batches if not quick else (32,))
        if quick:
            todo = _limit_quick(todo)
        else:
            todo += tma_jobs(False, models, batches)
    if tilings:
        todo = [j for j in todo if j.kernel == "conv_bn_act" and j.variant.split()[0] in tilings]
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers == 1:
        return [compile_job(j) for j in todo]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_job, todo))


def table(results: list[Result]) -> str:
    rows = [("kernel", "variant", "spec", "arch", "regs", "spill B", "stack B", "smem B", "cp.async", "tensor cores",
             "ld/st bits", "layers", "ok")]
    for r in results:
        tc = r.mma or ("NO" if r.job.needs_mma else "none")
        measured = ("error", "", "", "", "", r.error, "") if r.error else (
            str(r.registers), str(r.spill_bytes), str(r.stack_bytes), str(r.shared_bytes),
            "TMA" if r.tma else ("yes" if r.cp_async else "no"), tc, f"{r.load_bits}/{r.store_bits}")
        rows.append((r.job.kernel, r.job.variant, r.job.spec, f"sm_{r.job.arch}", *measured,
                     str(len(r.job.uses)), "yes" if r.ok else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def specialised(job: Job) -> tuple[list[str], list[str]]:
    """(runtime ints that launched as the constant 1, arguments not marked
    divisible by 16): what sets the variant apart from a plain-i32 one.
    Constexpr parameters are upper case."""
    ones = [_arg_name(job, i) for (i,), v in job.constexprs.items() if v == 1 and not _arg_name(job, i).isupper()]
    plain = [_arg_name(job, i) for (i,), a in job.attrs.items()
             if not a and job.signature[_arg_name(job, i)] != "constexpr"]
    return ones, plain


def specs(results: list[Result]) -> str:
    """What each spec name stands for, with one layer that launches it."""
    lines, seen = [], set()
    for r in results:
        j = r.job
        if j.spec in seen:
            continue
        seen.add(j.spec)
        ones, plain = specialised(j)
        lines.append(f"{j.spec} {j.kernel}: =1 {','.join(ones) or '-'}; not %16 {','.join(plain) or '-'}; "
                     f"e.g. {j.uses[0]}")
    return "\n".join(lines)


def as_json(results: list[Result]) -> list[dict]:
    rows = []
    for r in results:
        ones, plain = specialised(r.job)
        rows.append(dict(
            kernel=r.job.kernel, variant=r.job.variant, spec=r.job.spec, arch=r.job.arch, registers=r.registers,
            spill_bytes=r.spill_bytes, stack_bytes=r.stack_bytes, shared_bytes=r.shared_bytes, cp_async=r.cp_async,
            mma=r.mma, needs_mma=r.job.needs_mma, tma=r.tma, load_bits=r.load_bits, store_bits=r.store_bits,
            error=r.error, ok=r.ok, uses=r.job.uses, ones=ones,
            not_divisible_by_16=plain, num_warps=r.job.options["num_warps"],
        ))
    return rows


def summary(results: list[Result]) -> str:
    """Register, cp.async and tensor-core ranges per (kernel, arch, layout)."""
    groups: dict = {}
    for r in results:
        if r.error:
            continue
        layout = next((p for p in r.job.variant.split() if p in LAYOUTS), "")
        groups.setdefault((r.job.kernel, f"sm_{r.job.arch}", layout), []).append(r)
    lines = []
    for (kernel, arch, layout), rs in sorted(groups.items()):
        regs = [r.registers for r in rs]
        cp = sorted({"cp.async" if r.cp_async else "no cp.async" for r in rs})
        tc = sorted({r.mma or "none" for r in rs})
        lines.append(f"{kernel} {arch} {layout}: {len(rs)} variants, {min(regs)}-{max(regs)} registers, "
                     f"max spill {max(r.spill_bytes for r in rs)} B, max smem {max(r.shared_bytes for r in rs)} B, "
                     f"{'/'.join(cp)}, tensor cores {'/'.join(tc)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a representative subset (the test's)")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision models")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--json", default=None, help="also write every row, with the layers using it, here")
    parser.add_argument("--tilings", default=None, help="comma-separated tiling names: only those conv variants")
    parser.add_argument("--tma", action="store_true", help="only the Hopper kernel's (conv_tma) sm_90 variants")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler", file=sys.stderr)
        return 2
    results = run(args.quick, args.workers, tuple(args.models.split(",")),
                  tuple(int(b) for b in args.batches.split(",")),
                  set(args.tilings.split(",")) if args.tilings else None, args.tma or None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(as_json(results), f, indent=1)
    print(table(results))
    print("\nspecialisations:\n" + specs(results))
    print("\nsummary:\n" + summary(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} compiled kernel variants pass "
          "(no spills, shared memory within the SM limit, tensor cores where a GEMM is)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
