"""Throughput of torchvision vs resnet_fused on this machine, side by side.

Long on purpose: the command line, the implementations it builds and the
interleaved timing loop share the Impl records (the CPU peers are in peers.py).

    python -m resnet_fused.bench [--model resnet18 resnet50] [--batch 1 8] [--train]
                                 [--dtype float32] [--device auto] [--backend auto]
                                 [--compile] [--peers onnxruntime openvino] [--mixed]
                                 [--json out.json] [--plot out.png]
    python -m resnet_fused.bench --traffic [--gpu H100] [--dtype bfloat16]

Per model and batch size, every implementation (torchvision NCHW and
channels_last, resnet_fused per backend in both layouts) runs on the same
input, interleaved round by round so that drift in machine speed hits all rows
alike (each round runs every implementation twice in a row and times the
second call: the threads another engine leaves spinning cannot slow it); the
table shows the median images/s, the speed-up over torchvision eager (NCHW)
and the maximum error against torchvision's output on that input
(max |out − ref| / max |ref|; for --train, the relative error of the loss), so
speed is never shown without correctness. Both models get the same weights
and the same random, non-trivial BatchNorm state. With --train each row is one
step (forward, backward, SGD) and the activation memory kept for backward is
shown too. --peers adds the CPU engines a user would pick instead
(onnxruntime, OpenVINO, on the exported torchvision model, see
resnet_fused.peers), with a row per --dtype the engine computes in (OpenVINO
bf16 where the CPU has it; onnxruntime fp32 only); --compile gives
torch.compile a row per dtype too; --mixed adds a row per model that serves the batch sizes
in turn (1, 8, 1, 8, ...: each timed round runs each size once), to show
that changing sizes costs what constant ones do.

--traffic prints a model instead of measurements: kernel launches, bytes moved
through device memory and FLOPs per forward, and the roofline floor on an
A100/H100/H200 (see resnet_fused.traffic).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from resnet_fused import peers, traffic
from resnet_fused.check import randomize_bn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resnet_fused.bench", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", nargs="+", default=["resnet18", "resnet50"], choices=resnet_fused.MODEL_NAMES)
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default: 1 8 on CPU, 1 32 128 on CUDA)")
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None,
                   help="compute dtype(s) via autocast; several give rows per dtype in the same rounds "
                        "(default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--backend", nargs="+", default=["auto"], choices=list(resnet_fused.backends.NAMES),
                   help="resnet_fused backends to time (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--train", action="store_true", help="time one training step instead of inference")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation (median reported)")
    p.add_argument("--compile", action="store_true",
                   help="add torchvision under torch.compile (inference: inductor freezing, channels_last); "
                        "compiling takes minutes")
    p.add_argument("--peers", nargs="+", default=[], choices=list(peers.NAMES),
                   help="add these CPU inference engines (on the ONNX export of the torchvision model; a row per "
                        "--dtype they compute in: onnxruntime fp32, OpenVINO fp32 and bf16/fp16 where the CPU has it)")
    p.add_argument("--mixed", action="store_true",
                   help="add a row per model serving the --batch sizes in turn (inference)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE", help="plot images/s against batch size (needs matplotlib)")
    p.add_argument("--traffic", action="store_true", help="print the launch/bytes/FLOPs model instead of timing")
    p.add_argument("--gpu", nargs="+", choices=list(traffic.GPUS), default=list(traffic.GPUS),
                   help="GPUs for the --traffic roofline floor")
    return p


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def saved_bytes(model, x, target) -> int:
    """Bytes of distinct storages autograd keeps for backward in one forward
    (parameters and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), target)
    return sum(n for p, n in seen.items() if p not in own)


class _Impl:
    def __init__(self, name, model, backend, memory_format, dtype=torch.float32, remake=None):
        self.name, self.model, self.backend, self.memory_format = name, model, backend, memory_format
        self.dtype = dtype
        # for a compiled model or an engine: dtype -> the implementation
        # built for that compute dtype, or a string saying why there is none
        self.remake = remake
        self.times = []
        self.err = None
        self.saved_bytes = None

    def scope(self):
        import contextlib

        return resnet_fused.backend(self.backend) if self.backend else contextlib.nullcontext()


def _impls(arch: str, backends: list, device, compiled: bool = False, train: bool = False, engines=(),
           size: int = 224) -> list:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    randomize_bn(tv, seed=1)
    impls = []
    for fmt, suffix in ((torch.contiguous_format, ""), (torch.channels_last, "-channels_last")):
        impls.append(_Impl("torchvision" + suffix, copy.deepcopy(tv), None, fmt))
    if compiled:
        # every compiled copy adds guards to the one cache of ResNet.forward's
        # code (module identity, autocast state); past dynamo's recompile
        # limit (8) a new copy silently runs eager, so start each row set afresh
        torch._dynamo.reset()
        if not train:
            # what a user gets from PyTorch for CPU inference at best: inductor
            # with weight freezing (conv+BN folding, oneDNN weight prepacking)
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True

        def compile_for(dtype):  # one compiled model per compute dtype (run under its autocast)
            model = copy.deepcopy(tv).to(device).to(memory_format=torch.channels_last)
            return torch.compile(model if train else model.eval())

        impls.append(_Impl("torchvision-compile" + ("" if train else "-freezing") + "-channels_last",
                           compile_for(torch.float32), None, torch.channels_last, remake=compile_for))
    if engines:
        onnx_model = peers.export_onnx(copy.deepcopy(tv), size)
        threads = torch.get_num_threads()
        for name in engines:
            def engine_for(dtype, name=name):
                reason = peers.unavailable(name, dtype)
                if reason:
                    return reason
                try:
                    return peers.Engine(name, onnx_model, threads, dtype)
                except peers.PrecisionUnavailable as e:
                    return str(e)

            impls.append(_Impl(name, engine_for(torch.float32), None, torch.contiguous_format, remake=engine_for))
    for backend in backends:
        label = "resnet_fused" if backend == "auto" else f"resnet_fused-{backend}"
        fused = resnet_fused.fuse(tv)
        for fmt, suffix in ((torch.contiguous_format, ""), (torch.channels_last, "-channels_last")):
            impls.append(_Impl(label + suffix, copy.deepcopy(fused), backend, fmt))
    for impl in impls:
        if not isinstance(impl.model, torch._dynamo.eval_frame.OptimizedModule):
            impl.model = impl.model.to(device).to(memory_format=impl.memory_format)
    return impls


def _with_dtypes(impls: list, dtypes: list) -> list:
    """Each implementation once per dtype (same rounds); the first dtype's
    rows keep their names, the others get the dtype appended."""
    out = []
    for i, dtype in enumerate(dtypes):
        for impl in impls:
            name = impl.name if i == 0 else f"{impl.name} {str(dtype).replace('torch.', '')}"
            if impl.remake is not None and dtype != impl.dtype:  # compiled and engine rows: built per dtype
                model = impl.remake(dtype)
                if isinstance(model, str):
                    print(f"no {name} row: {model}", file=sys.stderr)
                    continue
            elif i == 0:
                model = impl.model
            else:
                model = copy.deepcopy(impl.model)
            out.append(_Impl(name, model, impl.backend, impl.memory_format, dtype))
    return out


_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx_ne_convert", "amx_bf16", "amx_fp16")


def cpu_description() -> str:
    """The CPU this process runs on, as a result file names it: the model
    name and the ISA features that decide the CPU paths (from /proc/cpuinfo
    where there is one), and torch's dispatch capability."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = " ".join(f for f in _ISA_FLAGS if f in flags) or "flags unknown"
    return f"{model}, {os.cpu_count()} logical CPUs, {isa}; torch capability {torch.backends.cpu.get_cpu_capability()}"


# Pause before each implementation's calls: longer than onnxruntime's worker
# threads spin after a run (~50 ms).
SETTLE_S = 0.1


def _time_rounds(impls: list, runs: list, rounds: int, progress=lambda r: None, clock=time.perf_counter,
                 sleep=time.sleep) -> None:
    """Interleaved timing: each round, for every implementation in turn, a
    pause (SETTLE_S), then two calls in a row, the second timed. The pause
    lets what the previous implementation left running stop: onnxruntime's
    worker threads spin for ~50 ms after a run (measured on 2 cores: a fused
    resnet50 forward right after one took 67–75 ms instead of 39; an
    untimed call alone does not cover a forward shorter than that — resnet18
    at batch 1 measured 0.5x its alone speed), and torch's OpenMP workers
    spin briefly too. The untimed call then wakes the implementation's own
    threads, so it is timed as in a process that serves only it."""
    for r in range(rounds):
        progress(r)
        for impl, run in zip(impls, runs):
            sleep(SETTLE_S)
            run()
            start = clock()
            run()
            impl.times.append(clock() - start)


def _measure(arch, batch, args, device, dtypes, step, total) -> dict:
    """Rows for `batch`, an int, or a tuple of sizes served in turn (--mixed:
    each run does one forward per size, and the outputs are compared
    concatenated)."""
    impls = _with_dtypes(
        _impls(arch, args.backend, device, args.compile, args.train, args.peers, args.size), dtypes
    )
    g = torch.Generator().manual_seed(2)
    sizes = batch if isinstance(batch, tuple) else (batch,)
    xs = [torch.randn(b, 3, args.size, args.size, generator=g).to(device) for b in sizes]
    x = xs[0]
    target = torch.randint(0, 1000, (sizes[0],), generator=g).to(device)

    def autocast(impl):
        return torch.autocast(device.type, dtype=impl.dtype, enabled=impl.dtype != torch.float32)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def make_run(impl):
        xi = x.to(memory_format=impl.memory_format)
        model = impl.model
        if not args.train:
            model.eval()
            inputs = [t.to(memory_format=impl.memory_format) for t in xs]

            def run():
                with torch.no_grad(), impl.scope(), autocast(impl):
                    outs = [model(t) for t in inputs]
                sync()
                return outs[0] if len(outs) == 1 else torch.cat(outs)

            return run
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def run():
            with impl.scope():
                opt.zero_grad(set_to_none=True)
                with autocast(impl):
                    loss = F.cross_entropy(model(xi), target)
                loss.backward()
                opt.step()
            sync()
            return loss

        return run

    runs = [make_run(i) for i in impls]
    # correctness first, on copies for training (a step changes the weights)
    refs = []
    for impl in impls:
        if args.train:
            probe = copy.deepcopy(getattr(impl.model, "_orig_mod", impl.model)).train()
            with impl.scope(), autocast(impl):
                out = F.cross_entropy(probe(x.to(memory_format=impl.memory_format)), target)
            impl.saved_bytes = _probe_memory(probe, impl, x, target, device, autocast(impl))
        else:
            out = runs[impls.index(impl)]()
        refs.append(out)
    for impl, out in zip(impls, refs):
        impl.err = _max_err(out, refs[0]) if not args.train else abs(out.item() - refs[0].item()) / abs(refs[0].item())
    for run in runs:
        run()  # warm-up (and cuDNN/Triton autotuning)
    _time_rounds(impls, runs, args.rounds,
                 lambda r: _progress(f"[{step}/{total}] {arch} batch {batch}: round {r + 1}/{args.rounds}"))
    base = statistics.median(impls[0].times)
    rows = []
    for impl in impls:
        med = statistics.median(impl.times)
        compiled = next((c for c in impls if "compile" in c.name and c.dtype == impl.dtype), None)
        per_round = None if compiled is None else per_round_ratio(compiled.times, impl.times)
        rows.append({
            "model": arch, "batch": "+".join(map(str, sizes)) if len(sizes) > 1 else batch,
            "implementation": impl.name, "backend": impl.backend,
            "dtype": str(impl.dtype).replace("torch.", ""),
            "median_s": med, "images_per_s": sum(sizes) / med, "speedup_vs_torchvision": base / med,
            "per_round_vs_compile": per_round,
            "error_vs_torchvision": impl.err, "saved_activation_bytes": impl.saved_bytes,
            "times_s": impl.times,
        })
    return rows


def per_round_ratio(reference_times: list, times: list) -> float:
    """Median over rounds of reference time / time: how much faster than the
    reference, compared within each round. On a host whose speed drifts
    between rounds this is steadier than the ratio of the two medians."""
    if len(reference_times) != len(times) or not times:
        raise ValueError("reference_times and times must be non-empty and of the same length")
    return statistics.median(r / t for r, t in zip(reference_times, times))


def _probe_memory(model, impl, x, target, device, autocast) -> Optional[int]:
    xi = x.to(memory_format=impl.memory_format)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with impl.scope(), autocast:
            loss = F.cross_entropy(model(xi), target)
        peak = torch.cuda.max_memory_allocated() - before
        del loss
        return peak
    with impl.scope(), autocast:
        return saved_bytes(model, xi, target)


def _print_table(rows: list, train: bool) -> None:
    for arch in dict.fromkeys(r["model"] for r in rows):
        print(f"\n{arch}")
        mem = train
        rounds = any(r.get("per_round_vs_compile") is not None for r in rows if r["model"] == arch)
        head = f"{'batch':>5s}  {'implementation':32s} {'images/s':>10s} {'vs torchvision':>15s} {'max err':>9s}"
        if rounds:
            head += f" {'vs compile, per round':>22s}"
        if mem:
            head += f" {'activations MiB':>16s}"
        print(head)
        for r in (r for r in rows if r["model"] == arch):
            line = (f"{r['batch']!s:>5s}  {r['implementation']:32s} {r['images_per_s']:10.1f} "
                    f"{r['speedup_vs_torchvision']:14.2f}x {r['error_vs_torchvision']:9.1e}")
            if rounds:
                pr = r.get("per_round_vs_compile")
                line += f" {pr:21.3f}x" if pr is not None else f" {'':22s}"
            if mem:
                line += f" {r['saved_activation_bytes'] / 2**20:16.1f}"
            print(line)


def _plot(rows: list, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or pip install 'resnet_fused[plot]')")
    archs = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for impl in dict.fromkeys(r["implementation"] for r in rows if r["model"] == arch):
            pts = sorted((r["batch"], r["images_per_s"]) for r in rows  # --mixed rows have no one batch size
                         if r["model"] == arch and r["implementation"] == impl and isinstance(r["batch"], int))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        ax.set_title(arch)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _traffic(args, dtype) -> int:
    batches = args.batch or [1, 32, 128]
    print("A model of device-memory traffic, not a measurement (resnet_fused.traffic): per inference forward,")
    print(f"{args.size}x{args.size} inputs, {str(dtype).replace('torch.', '')}; floor = sum over kernels of "
          "max(bytes/bandwidth, FLOPs/peak), datasheet rates:")
    for g in args.gpu:
        gpu = traffic.GPUS[g]
        print(f"  {g}: {gpu.name}, {gpu.bandwidth / 1e12:.2f} TB/s, {gpu.flops_per_s(dtype) / 1e12:.1f} TFLOP/s")
    results = []
    for arch in args.model:
        print(f"\n{arch}")
        floors = "".join(f" {g + ' floor ms':>15s}" for g in args.gpu)
        print(f"{'batch':>5s}  {'implementation':14s} {'launches':>9s} {'GB moved':>10s} {'GFLOP':>9s}{floors}")
        for batch in batches:
            counted = traffic.count(arch, batch, dtype, args.size)
            for name, t in counted.items():
                ms = {g: traffic.floor_seconds(t, traffic.GPUS[g], dtype) * 1e3 for g in args.gpu}
                print(f"{batch:5d}  {name:14s} {t.launches:9d} {t.bytes / 1e9:10.3f} {t.flops / 1e9:9.1f}"
                      + "".join(f" {ms[g]:15.3f}" for g in args.gpu))
                results.append({"model": arch, "batch": batch, "implementation": name, "launches": t.launches,
                                "bytes": t.bytes, "flops": t.flops, "floor_ms": ms})
            tv, fu = counted["torchvision"], counted["resnet_fused"]
            print(f"{'':5s}  bytes torchvision/resnet_fused = {tv.bytes / fu.bytes:.2f}x, "
                  f"launches {tv.launches}/{fu.launches}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "traffic model", "dtype": str(dtype), "size": args.size, "results": results}, f, indent=1)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    # --traffic describes a GPU: bf16 unless asked otherwise
    dtypes = [DTYPES[d] for d in (args.dtype or ["bfloat16" if device.type == "cuda" or args.traffic else "float32"])]
    dtype = dtypes[0]
    if args.traffic:
        return _traffic(args, dtype)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.batch is not None and any(b < 1 for b in args.batch):
        raise SystemExit("--batch sizes must be positive")
    if args.peers and (device.type != "cpu" or args.train):
        raise SystemExit("--peers: the engines are timed for CPU inference only (no --train, --device cpu)")
    for name in args.peers:
        reason = peers.unavailable(name)
        if reason is not None:
            raise SystemExit(f"--peers {name}: {reason}")
    if args.mixed and args.train:
        raise SystemExit("--mixed times inference only")
    for b in args.backend:
        reason = resnet_fused.backends.reason_unavailable(b)
        if reason is not None:
            raise SystemExit(f"--backend {b}: unavailable here ({reason})")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch or ([1, 32, 128] if device.type == "cuda" else [1, 8])
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"resnet_fused {resnet_fused.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    if device.type == "cpu":
        print(f"cpu: {cpu_description()}")
    print(f"{'training step' if args.train else 'inference'} on {name} ({torch.get_num_threads()} threads), "
          f"{args.size}x{args.size}, {', '.join(str(d).replace('torch.', '') for d in dtypes)}"
          f"{' (autocast)' if any(d != torch.float32 for d in dtypes) else ''}, "
          f"median of {args.rounds} interleaved rounds")
    if device.type == "cpu":
        print(f"cpu backend: fp32 3x3 stride-1 convolutions as "
              f"{'Winograd F(4x4, 3x3)' if resnet_fused.cpu_winograd() else 'oneDNN direct'} "
              f"(RESNET_FUSED_CPU_WINOGRAD={'1' if resnet_fused.cpu_winograd() else '0'})")
    rows = []
    runs = batches + ([tuple(batches)] if args.mixed and len(batches) > 1 else [])
    total = len(args.model) * len(runs)
    step = 0
    for arch in args.model:
        for batch in runs:
            step += 1
            rows += _measure(arch, batch, args, device, dtypes, step, total)
    _print_table(rows, args.train)
    meta = {
        "device": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "resnet_fused": resnet_fused.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtypes": [str(d).replace("torch.", "") for d in dtypes],
        "size": args.size, "train": args.train, "rounds": args.rounds,
        "cpu_winograd": resnet_fused.cpu_winograd() if device.type == "cpu" else None,
        "cpu": cpu_description(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "measurement", **meta, "results": rows}, f, indent=1)
    if args.plot:
        _plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
