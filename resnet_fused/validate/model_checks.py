"""The model-level correctness stages: models (eval and one train step
against torchvision), compile (torch.compile, two batch sizes), cudagraph
(capture and replay, and the kernel launches of one forward)."""
from __future__ import annotations

import contextlib
import copy
import itertools

import torch

import resnet_fused
from resnet_fused.check import randomize_bn, train_step_errors, backends_for
from resnet_fused.validate.common import Context, OpCounter, capture_graph, one_tile, rel_err
from resnet_fused.validate.op_checks import FORMATS, _has_triton

MODELS = ("resnet18", "resnet50", "resnext50_32x4d")


# ---- models ------------------------------------------------------------------


def model_pair(arch: str):
    """torchvision's model and the fused one from the same seed, with the same
    random, non-trivial BatchNorm state (as resnet-fused-check builds them)."""
    import torchvision

    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    randomize_bn(tv, seed=1)
    fused = resnet_fused.fuse(tv)
    return tv, fused


def _model_cases(ctx: Context) -> list[dict]:
    cases = []
    for arch, backend in itertools.product(MODELS, backends_for(ctx.device)):
        # quick: resnet18 on every backend; the others on the device's C++ backend, eval in one layout
        if ctx.quick and arch != "resnet18" and backend != backends_for(ctx.device)[-1]:
            continue
        cases.append(dict(model=arch, backend=backend))
    return cases


def _run_model(ctx: Context, case: dict) -> None:
    batch, size = (2, 32) if ctx.quick else (4, 96)
    tv, fused = model_pair(case["model"])
    tv, fused = tv.to(ctx.device).eval(), fused.to(ctx.device).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=g).to(ctx.device)
    target = torch.randint(0, 1000, (batch,), generator=g).to(ctx.device)
    name = f"{case['model']} {case['backend']}"
    table = "whole models vs torchvision"
    small = ctx.quick and case["model"] != "resnet18"
    if small:
        x, target = x[:1], target[:1]
    for fmt_name, fmt in list(FORMATS.items())[-1:] if small else FORMATS.items():
        def eval_err(fmt=fmt):
            tv_f, fused_f = copy.deepcopy(tv).to(memory_format=fmt), copy.deepcopy(fused).to(memory_format=fmt)
            xf = x.to(memory_format=fmt)
            with torch.no_grad(), resnet_fused.backend(case["backend"]):
                return rel_err(fused_f(xf), tv_f(xf)), 1e-4
        ctx.check(table, f"{name} eval fp32 {fmt_name}", eval_err, **case, what=f"eval fp32 {fmt_name}")
    if ctx.cuda:
        def amp_err():
            with torch.no_grad():
                ref = tv(x)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    tv_amp = tv(x)
                    with resnet_fused.backend(case["backend"]):
                        out = fused(x)
            tv_err = rel_err(tv_amp.float(), ref)
            return rel_err(out.float(), ref), max(5e-2, 2 * tv_err), {"torchvision_bf16_err": tv_err}
        ctx.check(table, f"{name} eval bf16 autocast vs fp32", amp_err, **case, what="eval bf16 autocast")

    if small or (ctx.quick and case["backend"] == "eager"):
        return  # quick: (eager trains with torchvision's own ops: nothing to compare)

    def train_err():
        with resnet_fused.backend(case["backend"]):
            loss_err, grad_err = train_step_errors(tv, fused, x, target)
        return max(loss_err, grad_err), 1e-4, {"loss_err": loss_err, "grad_err_fp64": grad_err}
    ctx.check(table, f"{name} train step", train_err, **case, what="train step (loss fp32, grads fp64)")


def models(ctx: Context) -> None:
    with one_tile() if _has_triton(ctx) else contextlib.nullcontext():  # results, not speed: one compile per variant
        for case in ctx.mine(_model_cases(ctx)):
            _run_model(ctx, case)


# ---- compile -----------------------------------------------------------------


def compiled(ctx: Context) -> None:
    with one_tile() if _has_triton(ctx) else contextlib.nullcontext():
        _compiled(ctx)


def _compiled(ctx: Context) -> None:
    """torch.compile(fullgraph=True) of a fused model at two batch sizes (the
    second is the partial last batch: torch.compile recompiles with a
    symbolic batch size). Inductor on a GPU; aot_eager on the CPU (inductor's
    C++ compile of a whole ResNet takes minutes there)."""
    arch = "resnet18"  # the op patterns of every ResNet, at the least compile time
    batches = (2, 3) if ctx.quick else (8, 5)
    size = 32 if ctx.quick else 96
    backend = "inductor" if ctx.cuda else "aot_eager"
    torch._dynamo.reset()
    # auto (triton on a GPU) first, then the C++ backend; quick: auto only
    for name in (["auto"] if ctx.quick else ["auto", backends_for(ctx.device)[-1]]):
        _, fused = model_pair(arch)
        fused = fused.to(ctx.device).eval().to(memory_format=torch.channels_last)
        model = torch.compile(fused, fullgraph=True, backend=backend)
        for batch in batches:
            def err(batch=batch):
                x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
                x = x.to(ctx.device).to(memory_format=torch.channels_last)
                with torch.no_grad(), resnet_fused.backend(name):
                    out = model(x)
                    want = fused(x)
                return rel_err(out, want), 1e-4
            ctx.check("torch.compile(fullgraph=True) vs eager", f"{arch} {name} {backend} batch {batch}", err,
                      model=arch, backend=name, compiler=backend, batch=batch)
        torch._dynamo.reset()


# ---- cudagraph ------------------------------------------------------------------


def cudagraph(ctx: Context) -> None:
    with one_tile() if _has_triton(ctx) else contextlib.nullcontext():
        _cudagraph(ctx)
        _launches(ctx)


def count_launches(fn, device: torch.device) -> int:
    """Kernels one call of fn() launches: on CUDA the profiler's kernel
    events; on the CPU (no launches) the ops it dispatches, the same
    count for the triton backend under the interpreter."""
    if device.type != "cuda":
        with OpCounter() as counter:
            fn()
        return sum(counter.ops.values())
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# what the stem's pooling and the head may launch beyond the pairs (max
# pool, average pool, the fc GEMM and its bias: cuBLAS may split it)
HEAD_LAUNCHES = 6


def _launches(ctx: Context) -> None:
    """Kernel launches of one fp32 inference forward (no autocast: its
    weight casts are launches of their own). Checked on the triton backend,
    which folds each BN into its kernel: at most one launch per conv+BN
    pair plus the head. The counts of torchvision and of the other backends
    (the convolution, the epilogue and the torch ops of the scale/shift
    fold per pair) go in the same row."""
    if "triton" not in backends_for(ctx.device):
        return
    arch, batch, size = ("resnet18", 1, 32) if ctx.quick else ("resnet50", 1, 224)
    tv, fused = model_pair(arch)
    tv, fused = tv.to(ctx.device).eval(), fused.to(ctx.device).eval()
    x = torch.randn(batch, 3, size, size, device=ctx.device).contiguous(memory_format=torch.channels_last)
    pairs = sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())

    def launches(model, name="auto") -> int:
        with torch.no_grad(), resnet_fused.backend(name):
            model(x)  # tunes, packs
            return count_launches(lambda: model(x), ctx.device)

    def run():
        n = launches(fused, "triton")
        others = {f"{b}_launches": launches(fused, b) for b in backends_for(ctx.device) if b != "triton"}
        info = {"launches": n, "pairs": pairs, "torchvision_launches": launches(tv), **others}
        return float(n), float(pairs + HEAD_LAUNCHES), info

    what = "kernel launches per forward" if ctx.cuda else "CPU analogue: ops dispatched per forward"
    ctx.check(what, f"{arch} triton", run, model=arch, backend="triton", batch=batch)


def _cudagraph(ctx: Context) -> None:
    """Capture a fused forward in a CUDA graph after warm-up (tuning and
    compiles done), replay it on new input, compare with an eager forward.
    On the CPU (no graphs) the analogue: forwards into static buffers are
    bitwise repeatable, what a replayed graph relies on."""
    arch, batch, size = ("resnet18", 2, 32) if ctx.quick else ("resnet50", 8, 96)
    for name in ["auto"] if ctx.quick else ["auto"] + backends_for(ctx.device)[1:]:
        def run(name=name):
            _, fused = model_pair(arch)
            fused = fused.to(ctx.device).eval().to(memory_format=torch.channels_last)
            g = torch.Generator().manual_seed(4)
            xs = [torch.randn(batch, 3, size, size, generator=g).to(ctx.device).to(memory_format=torch.channels_last)
                  for _ in range(2)]
            static = xs[0].clone()
            # no autocast weight cache: a graph must not capture a cast made once outside it
            amp = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda, cache_enabled=False)
            with torch.no_grad(), resnet_fused.backend(name), amp:
                if not ctx.cuda:
                    first = fused(static)
                    static.copy_(xs[1])
                    return (0.0 if torch.equal(fused(static), fused(xs[1])) and first.shape == (batch, 1000)
                            else float("inf")), 0.0
                replay, out = capture_graph(lambda: fused(static))
                static.copy_(xs[1])
                replay()
                want = fused(xs[1])
            torch.cuda.synchronize()
            return rel_err(out.float(), want.float()), 1e-2, {"bitwise": torch.equal(out, want)}
        what = "CUDA graph replay vs eager" if ctx.cuda else "CPU analogue: static-buffer forward repeatable"
        ctx.check(what, f"{arch} {name}", run, model=arch, backend=name, batch=batch)
