"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90,
without a GPU, and what the compiled code says about itself.

    python -m resnet_fused.ops.triton.aot            # table of every kernel × config × arch
    python -m resnet_fused.ops.triton.aot --quick    # one config per kernel

For each compiled kernel it reports registers per thread, local memory
(spills: STACK/LOCAL from cuobjdump), shared memory (Triton's dynamic
allocation plus static), and whether the GEMM uses tensor cores: `mma.sync`
on sm_80, `wgmma` (Hopper warpgroup MMA) on sm_90. tests/ops/test_triton_aot.py
runs this and asserts on the result.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import torch

ARCHS = (80, 90)
# Shared memory per SM a block may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 166912, 90: 232448}
MAX_REGISTERS = 255


@dataclasses.dataclass
class Job:
    kernel: str  # name in KERNELS below
    variant: str  # human-readable
    arch: int
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    needs_mma: bool


@dataclasses.dataclass
class Result:
    job: Job
    registers: int = -1
    spill_bytes: int = -1  # stack + local
    shared_bytes: int = -1
    mma: Optional[bool] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.spill_bytes == 0
            and self.shared_bytes <= SMEM_LIMIT[self.job.arch]
            and (self.mma or not self.job.needs_mma)
        )


def _kernels():
    from resnet_fused.ops.triton import batch_norm, conv

    return {
        "conv_bn_act": conv._conv_bn_act_kernel,
        **{f"bn_{name}": k for name, k in batch_norm.KERNELS.items()},
    }


def _signature(fn, pointer_dtypes: dict, constexprs: dict, default_ptr: str, int_type: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_dtypes.get(name, default_ptr)
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = int_type
    return sig


def jobs(quick: bool = False) -> list[Job]:
    from resnet_fused.ops.triton import batch_norm, conv

    import itertools

    kernels = _kernels()
    out = []
    fp32_vectors = {"scale_ptr": "*fp32", "shift_ptr": "*fp32"}
    # exactly the (tiling, variant) pairs conv.configs_for can hand the launcher
    variants = []
    for dtype, flat, index_64 in itertools.product(("fp16", "bf16", "fp32"), (False, True), (False, True)):
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        c_g = 3 if flat else 64
        configs = conv.configs_for(torch_dtype, c_g, index_64)
        if quick and not (dtype == "fp16" and not flat and not index_64) and not (dtype == "fp32" and flat and index_64):
            continue
        for cfg in configs[:1] if quick else configs:
            variants.append((cfg, dtype, flat, index_64))
    for cfg, dtype, flat, index_64 in variants:
        consts = dict(
            HAS_RESIDUAL=True, RELU=True, FLAT_RSC=flat, INPUT_PRECISION="tf32" if dtype == "fp32" else "ieee",
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            INDEX_64=index_64, WIDEN_OPERANDS=False,
        )
        sig = _signature(kernels["conv_bn_act"], fp32_vectors, consts, f"*{dtype}", "i32")
        variant = f"{cfg.name} {dtype} {'flat' if flat else 'cblk'} {'int64' if index_64 else 'int32'}"
        for arch in ARCHS:
            out.append(Job("conv_bn_act", variant, arch, sig, consts, cfg.num_warps, cfg.num_stages, True))
    bn_consts = {
        "stats_partial": dict(ACC="fp32", BLOCK_R=batch_norm.BLOCK_R, BLOCK_C=batch_norm.BLOCK_C, ROWS_64=False),
        "stats_final": dict(ACC="fp32", BLOCK_C=batch_norm.FINAL_BLOCK_C),
        "apply": dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_RESIDUAL=True, RELU=True, ACC="fp32",
                      BLOCK_R=batch_norm.BLOCK_R, BLOCK_C=batch_norm.BLOCK_C, ROWS_64=False),
        "bwd_partial": dict(RELU=True, ACC="fp32", BLOCK_R=batch_norm.BLOCK_R, BLOCK_C=batch_norm.BLOCK_C,
                            ROWS_64=False),
        "bwd_final": dict(ACC="fp32", BLOCK_C=batch_norm.FINAL_BLOCK_C),
        "bwd_apply": dict(HAS_WEIGHT=True, RELU=True, RESIDUAL_GRAD=True, ACC="fp32",
                          BLOCK_R=batch_norm.BLOCK_R, BLOCK_C=batch_norm.BLOCK_C, ROWS_64=False),
    }
    import triton.language as tl

    for name, consts in bn_consts.items():
        consts = {k: (tl.float32 if v == "fp32" else v) for k, v in consts.items()}
        fn = kernels[f"bn_{name}"]
        stats = {p: "*fp32" for p in fn.arg_names if p.endswith("_ptr") and p not in
                 ("x_ptr", "out_ptr", "res_ptr", "grad_ptr", "dx_ptr", "dres_ptr")}
        sig = _signature(fn, stats, consts, "*bf16", "i32")
        for arch in ARCHS:
            out.append(Job(f"bn_{name}", "bf16", arch, sig, consts, 4, 1, False))
    return out


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _wgmma_possible(job: Job) -> bool:
    """Hopper's warpgroup MMA needs a warpgroup (4 warps) per 64 rows of the
    tile; smaller tiles use mma.sync on sm_90 too."""
    return job.arch >= 90 and job.constexprs.get("BLOCK_M", 0) >= 64 and job.num_warps % 4 == 0


def compile_job(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[job.kernel]
    try:
        src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                           options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
    except Exception as e:  # report, do not hide
        return Result(job, error=f"{type(e).__name__}: {e}".splitlines()[0][:200])
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        return Result(job, error=f"unreadable cuobjdump output: {usage[:200]}")
    reg, stack, static_shared, local = map(int, m.groups())
    mma = ("wgmma" in ptx) if _wgmma_possible(job) else ("mma.sync" in ptx)
    return Result(job, reg, stack + local, static_shared + k.metadata.shared, mma)


def run(quick: bool = False, workers: Optional[int] = None) -> list[Result]:
    todo = jobs(quick)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers == 1:
        return [compile_job(j) for j in todo]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_job, todo))


def table(results: list[Result]) -> str:
    rows = [("kernel", "variant", "arch", "regs", "spill B", "smem B", "tensor cores", "ok")]
    for r in results:
        tc = "-" if not r.job.needs_mma else (("wgmma" if _wgmma_possible(r.job) else "mma") if r.mma else "NO")
        rows.append((
            r.job.kernel, r.job.variant, f"sm_{r.job.arch}",
            *(("error", "", "") if r.error else (str(r.registers), str(r.spill_bytes), str(r.shared_bytes))),
            tc if not r.error else r.error, "yes" if r.ok else "NO",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tile configuration per kernel")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler", file=sys.stderr)
        return 2
    results = run(args.quick, args.workers)
    print(table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} compiled kernels pass "
          "(no spills, shared memory within the SM limit, tensor cores where a GEMM is)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
