"""resnet-fused-validate: everything that matters about this install on this
machine's GPU (or CPU), in one command, with one report.

    resnet-fused-validate [--device auto|cpu|cuda] [--quick] [--out validate_out]
                          [--time-limit 480] [--stages ops models ...] [--jobs N]
    python -m resnet_fused.validate ...

Stages, in order (each in its own process, under its own time limit):
  environment  GPU, SM count, driver, torch/Triton/CUDA/cuDNN versions, backends
  ops          conv_bn_act against float64 on the device: every ResNet layer type
               x every Triton tiling the launcher can pick x dtypes (bf16, fp16,
               fp32 with TF32 off and on) x layouts x epilogues x forced int64;
               each backend's op; the cuDNN + Triton epilogue path; the C++
               epilogue's vector and scalar paths
  batch_norm   train-mode batch_norm_act forward and backward against float64,
               run twice: bitwise determinism of the kernel backends
  models       resnet18, resnet50, resnext50_32x4d: eval and one train step
               against torchvision, per backend of the device
  compile      torch.compile(fullgraph=True) of a fused model at two batch sizes
  cudagraph    CUDA-graph capture and replay after warm-up
  warmup       the speed stage's forwards once, over --jobs processes: Triton and
               torch.compile fill their disk caches in parallel
  speed        inference throughput (CUDA events, warm-up, median): torchvision
               eager AMP NCHW and channels_last, torchvision under torch.compile,
               resnet_fused auto/cuda/triton, resnet_fused under torch.compile
  train        one training step: time and peak memory
  layers       resnet50 per layer: each Triton candidate's time, TFLOP/s, GB/s,
               and the one the tuner chose

Results go to OUT/report.json (every row) and OUT/summary.md, both rewritten
after each stage: a crash or a time-out in one stage keeps the others'.
Exit status: 1 when a check failed or a correctness stage crashed, 2 when
nothing failed but a stage timed out or had no time left, else 0.

`--device cpu --quick` runs the CPU analogue of every stage (eager, cpu, triton
under the interpreter, tiny shapes) in under two minutes; tests/test_validate.py
runs it. On a GPU, the correctness stages split their cases over --jobs
processes: Triton compiles kernels in each in parallel and caches them on disk
(TRITON_CACHE_DIR), where the later stages find them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from resnet_fused.validate.report import Report, read_rows, tail


@dataclass(frozen=True)
class Stage:
    name: str
    share: float  # of the time left when it starts, among the stages still to run (GPU)
    quick_limit_s: float  # with --quick (the CPU analogue): seconds, with room for a loaded machine
    correctness: bool  # a crash here fails the run
    parallel: bool  # its cases split over --jobs processes


# Shares, weighed by what each stage compiles and runs on an H100-class GPU:
# a stage that needs less leaves its time to the stages after it.
STAGES = (
    Stage("environment", 0.03, 30, False, False),
    Stage("ops", 0.20, 60, True, True),
    Stage("batch_norm", 0.06, 30, True, True),
    Stage("models", 0.12, 90, True, True),
    Stage("compile", 0.10, 60, True, False),
    Stage("cudagraph", 0.05, 30, True, False),
    Stage("warmup", 0.12, 30, False, True),
    Stage("speed", 0.18, 60, False, False),
    Stage("train", 0.06, 60, False, False),
    Stage("layers", 0.08, 30, False, False),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
DEFAULT_TIME_LIMIT = 480  # seconds: 8 minutes on one H100-class GPU, compiles included


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-fused-validate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="CUDA when a GPU is visible (auto), else the CPU")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: the CPU analogue of each stage")
    p.add_argument("--out", default="validate_out", help="folder for report.json, summary.md and logs")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, help="seconds for the whole run")
    p.add_argument("--stage-limit", type=float, default=None,
                   help="seconds per stage (default: a stage's share of the time left; fixed with --quick)")
    p.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=list(STAGE_NAMES), help="stages to run")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes for the correctness stages (default: 1 on CPU, min(8, cores/2) on a GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 20; 3 with --quick)")
    # the stage processes' own arguments, and validate's self-test
    p.add_argument("--child", nargs="+", choices=STAGE_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--parts", help=argparse.SUPPRESS)
    p.add_argument("--self-test-break", metavar="BACKEND", default=None,
                   help="make BACKEND's outputs wrong on purpose, to see this command fail (tests use it)")
    return p


def _check_args(args) -> None:
    if args.time_limit <= 0:
        raise SystemExit(f"--time-limit must be positive, got {args.time_limit}")
    if args.stage_limit is not None and args.stage_limit <= 0:
        raise SystemExit(f"--stage-limit must be positive, got {args.stage_limit}")
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.self_test_break is not None and args.self_test_break not in ("eager", "cpu", "cuda", "triton"):
        raise SystemExit(f"--self-test-break must name a concrete backend, got {args.self_test_break!r}")


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _child_env(device: str) -> dict:
    """The stage processes import the resnet_fused this process imported
    (not one in the working directory: a source checkout has no _C)."""
    import resnet_fused

    here = os.path.dirname(os.path.dirname(os.path.abspath(resnet_fused.__file__)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the triton backend on CPU tensors, before resnet_fused is imported
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _child_argv(args, stages: list, device: str, shard: int, shards: int, parts: str) -> list[str]:
    # -P: no working directory on sys.path (see _child_env)
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    argv = [sys.executable, *safe, "-m", "resnet_fused.validate", "--child", *stages, "--device", device,
            "--shard", str(shard), "--shards", str(shards), "--parts", parts, "--out", args.out]
    if args.quick:
        argv.append("--quick")
    if args.repeats:
        argv += ["--repeats", str(args.repeats)]
    if args.self_test_break:
        argv += ["--self-test-break", args.self_test_break]
    return argv


class _Worker:
    """One stage process: runs its stages in order, telling the parent
    through a progress file when each starts and ends (or fails)."""

    def __init__(self, args, stages: list, device: str, shard: int, shards: int, parts: str):
        self.progress = os.path.join(parts, f"progress.{stages[0]}.{shard}")
        self.log = os.path.join(parts, f"{stages[0]}.{shard}.log")
        for path in (self.progress, self.log):
            if os.path.exists(path):
                os.remove(path)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(_child_argv(args, stages, device, shard, shards, parts),
                                         stdout=log, stderr=subprocess.STDOUT, env=_child_env(device))

    def events(self) -> list[tuple[str, str]]:
        if not os.path.exists(self.progress):
            return []
        with open(self.progress) as f:
            return [tuple(line.split()) for line in f if len(line.split()) == 2]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _stage_rows(parts: str, name: str, shards: int) -> list[dict]:
    return read_rows([os.path.join(parts, f"{name}.{i}.jsonl") for i in range(shards)])


def _run_group(args, group: list, device: str, shards: int, deadline: float, limit_for, on_result) -> list:
    """Run `group` (stages in order; or one parallel stage over `shards`
    processes) until done, a stage's limit or the deadline; `on_result`
    gets each finished stage. Returns the stages not started (a crash or a
    time-out ends the process: the rest go to a fresh one)."""
    parts = os.path.join(args.out, "parts")
    os.makedirs(parts, exist_ok=True)
    for stage in group:
        for i in range(shards):
            path = os.path.join(parts, f"{stage.name}.{i}.jsonl")
            if os.path.exists(path):
                os.remove(path)
    workers = [_Worker(args, [s.name for s in group], device, i, shards, parts) for i in range(shards)]
    started: dict = {}  # stage name -> (monotonic start, limit)
    finished: dict = {}  # stage name -> status
    by_name = {s.name: s for s in group}

    def result(stage, status, note=None):
        t0, limit = started[stage.name]
        logs = "\n".join(filter(None, (tail(w.log, 3000) for w in workers)))
        on_result({"name": stage.name, "status": status, "seconds": time.monotonic() - t0, "limit_s": limit,
                   "correctness": stage.correctness, "processes": shards, "note": note,
                   "exit_codes": [w.proc.poll() for w in workers],
                   "rows": _stage_rows(parts, stage.name, shards), "log_tail": logs})
        finished[stage.name] = status

    while True:
        alive = any(w.proc.poll() is None for w in workers)
        events = [w.events() for w in workers]  # read after the poll: nothing a dead process wrote is missed
        for name in by_name:
            if name not in started and any((("start", name) in ev) for ev in events):
                started[name] = (time.monotonic(), limit_for(by_name[name]))
            if name in started and name not in finished:
                ends = [next((e for e, n in ev if n == name and e in ("end", "error")), None) for ev in events]
                if all(ends):
                    result(by_name[name], "ok" if all(e == "end" for e in ends) else "crashed")
        current = [n for n in started if n not in finished]
        if len(finished) == len(group):  # every stage reported: let the process exit
            for w in workers:
                try:
                    w.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    w.kill()
            break
        if not alive:
            if not started:  # died before its first stage (an import error, say): that stage fails
                current = [group[0].name]
                started[group[0].name] = (time.monotonic(), 0.0)
            for name in current:  # the process died inside this stage
                result(by_name[name], "crashed", f"the stage process exited with {[w.proc.poll() for w in workers]}")
            break
        late = [n for n in current if time.monotonic() - started[n][0] > started[n][1]]
        if late or time.monotonic() > deadline:
            for w in workers:
                w.kill()
            if not started:  # still starting up at the deadline
                current = [group[0].name]
                started[group[0].name] = (time.monotonic(), 0.0)
            for name in current:
                result(by_name[name], "timeout", f"killed at its limit of {started[name][1]:.0f} s")
            break
        time.sleep(0.2)
    return [s for s in group if s.name not in finished]


def _skipped(stage: Stage, why: str) -> dict:
    return {"name": stage.name, "status": "skipped", "seconds": 0.0, "limit_s": 0, "note": why,
            "correctness": stage.correctness, "rows": []}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    if args.child:
        from resnet_fused.validate import stages

        return stages.run_child(args)
    device = _device(args.device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
    jobs = args.jobs or (1 if device == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2)))
    report = Report(args.out, {"device": device, "quick": args.quick, "time_limit_s": args.time_limit,
                               "jobs": jobs, "argv": " ".join(sys.argv[1:] if argv is None else argv)})
    start = time.monotonic()
    deadline = start + args.time_limit
    pending = [s for s in STAGES if s.name in args.stages]

    done = set()

    def limit_for(stage: Stage) -> float:
        """--stage-limit if given, else its share of the time left among the
        stages still to run (a fixed time with --quick); never past the deadline."""
        left = max(1.0, deadline - time.monotonic())
        if args.stage_limit:
            own = args.stage_limit
        elif args.quick:
            own = stage.quick_limit_s
        else:
            shares = sum(s.share for s in STAGES if s.name in args.stages and s.name not in done)
            own = left * stage.share / max(shares, stage.share)
        return min(own, left)

    def on_result(result):
        done.add(result["name"])
        if result["name"] == "environment":
            env = next((r for r in result["rows"] if r.get("table") == "environment"), {})
            report.meta["device_name"] = env.get("device_name", device)
        report.add(result)
        failed = sum(r.get("ok") is False for r in result["rows"])
        print(f"resnet-fused-validate: {result['name']}: {result['status']}, {len(result['rows'])} rows, "
              f"{failed} failed checks, {result['seconds']:.1f} s", flush=True)

    while pending:
        if deadline - time.monotonic() < 5:
            for stage in pending:
                report.add(_skipped(stage, f"no time left of --time-limit {args.time_limit:g} s"))
            break
        # a parallel stage runs alone over its processes; the others share one
        # process in order (one start-up of torch and CUDA for all of them)
        if pending[0].parallel and jobs > 1:
            group, shards = pending[:1], jobs
        else:
            n = next((i for i, s in enumerate(pending) if s.parallel and jobs > 1), len(pending))
            group, shards = pending[:n], 1
        left = _run_group(args, group, device, shards, deadline, limit_for, on_result)
        pending = left + pending[len(group):]
    report.meta["seconds"] = round(time.monotonic() - start, 1)
    report.write()
    code = report.exit_code()
    print(f"resnet-fused-validate: exit {code}; report {report.json_path}, summary {report.md_path}")
    return code
