"""The stage processes: `run_child` sets one up (device, TF32 off, its share
of the cases) and runs one stage function; `environment` is the first stage."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

from resnet_fused.validate.common import Context, break_backend


def environment(ctx: Context) -> None:
    import torchvision

    import resnet_fused
    from resnet_fused.check import backends_for
    from resnet_fused.ops import extension

    row = {"table": "environment", "device": str(ctx.device), "python": platform.python_version(),
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "resnet_fused": resnet_fused.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError as e:
        row["triton"] = f"not importable: {e}"
    row["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        row.update(device_name=props.name, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   gpus=torch.cuda.device_count(), driver=_driver())
    else:
        row["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
    row["backends_for_device"] = ", ".join(backends_for(ctx.device))
    try:
        row["extension_build"] = str(extension.build_info())
    except RuntimeError as e:
        row["extension_build"] = str(e)
    ctx.emit(**row)
    for name, reason in resnet_fused.backends.status().items():
        if name != "auto":
            devices = resnet_fused.backends.device_types(name)
            ctx.emit(table="backends", backend=name, available=reason is None, reason=reason,
                     device_types="/".join(devices), checked_here=name in backends_for(ctx.device))
    # the backends this device must have: eager always, and its kernel backend
    expected = ["eager", "cuda", "triton"] if ctx.cuda else ["eager", "cpu", "triton"]
    for name in expected:
        ctx.check("backends this device needs", f"{name} on {ctx.device.type}",
                  lambda name=name: (0.0 if name in backends_for(ctx.device) else float("inf"), 0.0,
                                     {"reason": resnet_fused.backends.reason_unavailable(name)}))


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()[:100]
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"


def _stage_functions() -> dict:
    from resnet_fused.validate import model_checks, op_checks, speed

    return {
        "environment": environment,
        "ops": op_checks.ops_stage,
        "batch_norm": op_checks.batch_norm,
        "models": model_checks.models,
        "compile": model_checks.compiled,
        "cudagraph": model_checks.cudagraph,
        "warmup": speed.warmup,
        "speed": speed.speed,
        "train": speed.train,
        "layers": speed.layers,
    }


def run_child(args) -> int:
    """Stages in this process, in order (or one shard of one); each stage's
    rows go to PARTS/STAGE.SHARD.jsonl, and PARTS/progress.FIRST.SHARD tells
    the parent when each starts and ends. An exception ends its stage (as
    crashed) and the next one runs."""
    import traceback

    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 unless a check turns TF32 on
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.self_test_break:
        break_backend(args.self_test_break)
    progress = os.path.join(args.parts, f"progress.{args.child[0]}.{args.shard}")
    functions = _stage_functions()

    def tell(event, name):
        with open(progress, "a") as f:
            f.write(f"{event} {name}\n")

    for name in args.child:
        ctx = Context(device, args.quick, args.shard, args.shards, os.path.join(args.parts, f"{name}.{args.shard}.jsonl"),
                      args.self_test_break, repeats=args.repeats or (3 if args.quick else 20))
        tell("start", name)
        try:
            functions[name](ctx)
        except Exception:
            traceback.print_exc()
            tell("error", name)
            continue
        finally:
            print(f"stage {name} done", flush=True)
        tell("end", name)
    return 0
