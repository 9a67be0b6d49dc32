"""Where a fused model's CPU inference time goes, per layer type, against
this machine's sgemm rate and, optionally, onnxruntime's own profile of the
same layers (the peer whose 1×1 convolutions are the ones to beat).

    python -m resnet_fused.layer_times [--model resnet50] [--batch 1 8] [--size 224]
                                       [--threads 2] [--rounds 10] [--onnxruntime]

Each `ops.cpu.onednn.conv_bn_act` call of a fused forward (fp32,
channels_last input, `cpu` backend) is timed and filed under its layer type;
GFLOP are counted as a direct convolution counts them (Winograd layers do
fewer multiplications, so their rate can pass the sgemm rate). "vs sgemm"
divides a type's rate by a 2048³ `torch.mm` timed in the same process: how
far that layer type is from what this CPU's fp32 GEMM reaches. With
--onnxruntime the torchvision model's ONNX export runs the same input with
onnxruntime's profiler on, its nodes mapped back to the same layer types;
the two run one after the other, not interleaved (onnxruntime's spinning
threads would slow whatever runs next, see `bench._time_rounds`).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time

import torch
import torchvision

import resnet_fused
from resnet_fused.ops.cpu import onednn

TYPES = ("stem 7x7 s2", "1x1 s1 reduce", "1x1 s1 expand", "1x1 s2", "3x3 s1", "3x3 s2", "other conv")


def layer_type(k: int, stride: int, cin: int, cout: int) -> str:
    if cin == 3 and k == 7:
        return "stem 7x7 s2"
    if k == 1:
        return "1x1 s2" if stride == 2 else ("1x1 s1 expand" if cout > cin else "1x1 s1 reduce")
    if k == 3 and stride in (1, 2):
        return f"3x3 s{stride}"
    return "other conv"


@contextlib.contextmanager
def _timed_convolutions(record: dict):
    """Time every onednn.conv_bn_act call while inside: record[type] gets
    [seconds, GFLOP, calls] added."""
    original = onednn.conv_bn_act

    def timed(x, packed, *args, **kwargs):
        start = time.perf_counter()
        out = original(x, packed, *args, **kwargs)
        seconds = time.perf_counter() - start
        k = packed.kernel_size[0]
        cin, cout = x.shape[1], out.shape[1]
        entry = record.setdefault(layer_type(k, packed.stride[0], cin, cout), [0.0, 0.0, 0])
        entry[0] += seconds
        entry[1] += 2 * out.numel() * cin // packed.groups * k * k / 1e9
        entry[2] += 1
        return out

    onednn.conv_bn_act = timed
    try:
        yield
    finally:
        onednn.conv_bn_act = original


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n)
    torch.mm(a, a)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, a)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def fused_layers(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> tuple[dict, float]:
    """{type: (ms per forward, GFLOP per forward, calls per forward)} and the
    whole forward's ms, over `rounds` timed forwards after a warm one."""
    record: dict = {}
    with torch.no_grad():
        model(x)
        total = 0.0
        with _timed_convolutions(record):
            for _ in range(rounds):
                start = time.perf_counter()
                model(x)
                total += time.perf_counter() - start
    return ({t: (s / rounds * 1e3, g / rounds, c // rounds) for t, (s, g, c) in record.items()},
            total / rounds * 1e3)


def onnxruntime_layers(tv: torch.nn.Module, x: torch.Tensor, rounds: int, threads: int) -> tuple[dict, float]:
    """{type: ms per run} from onnxruntime's profile of the ONNX export, and
    the whole run's ms (timed without the profile's warm-up runs)."""
    import onnx

    from resnet_fused import peers

    exported = peers.export_onnx(tv, x.shape[-1])
    graph = onnx.load_from_string(exported).graph
    weights = {i.name: i.dims for i in graph.initializer}
    by_output = {}
    for node in graph.node:  # a conv's type, also under the Relu/Add outputs onnxruntime names fused nodes by
        if node.op_type == "Conv":
            cout, cin, k, _ = weights[node.input[1]]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            by_output[node.output[0]] = by_output[node.name] = layer_type(
                k, attrs.get("strides", [1, 1])[0], cin * attrs.get("group", 1), cout)
        elif node.op_type in ("Relu", "Add") and any(i in by_output for i in node.input):
            by_output[node.output[0]] = next(by_output[i] for i in node.input if i in by_output)
    session = peers.onnxruntime_session(exported, threads, profile=True)
    feed = {"x": x.contiguous().numpy()}
    session.run(None, feed)
    start = time.perf_counter()
    for _ in range(rounds):
        session.run(None, feed)
    total = (time.perf_counter() - start) / rounds * 1e3
    profile = session.end_profiling()
    try:
        with open(profile) as f:
            events = json.load(f)
    finally:
        os.remove(profile)
    per_type: dict = collections.defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            node = name[: -len("_kernel_time")]
            kind = by_output.get(node) or by_output.get(node.removesuffix("_nchwc"))
            per_type[kind or f"other ({e['args'].get('op_name', '?')})"] += e["dur"] / 1e3 / (rounds + 1)
    return dict(per_type), total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_fused.layer_times", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["resnet50"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--onnxruntime", action="store_true", help="add onnxruntime's per-layer profile")
    p.add_argument("--json", default=None, help="write the tables as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = sgemm_gflops()
    print(f"fp32 sgemm (2048³ torch.mm): {rate:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    results = []
    for arch in args.model:
        torch.manual_seed(0)
        tv = getattr(torchvision.models, arch)().eval()
        fused = resnet_fused.fuse(tv)
        for batch in args.batch:
            x = torch.randn(batch, 3, args.size, args.size)
            layers, total = fused_layers(fused, x.contiguous(memory_format=torch.channels_last), args.rounds)
            peer, peer_total = onnxruntime_layers(tv, x, args.rounds, torch.get_num_threads()) \
                if args.onnxruntime else ({}, None)
            print(f"\n{arch}, batch {batch}, {args.size}²: resnet_fused {total:.2f} ms per forward"
                  + (f", onnxruntime {peer_total:.2f} ms" if peer_total is not None else ""))
            print("| layer type | calls | GFLOP | resnet_fused ms | share | GFLOP/s | vs sgemm |"
                  + (" onnxruntime ms |" if peer else ""))
            for t in TYPES + tuple(k for k in peer if k not in TYPES):
                if t not in layers and t not in peer:
                    continue
                ms, gflop, calls = layers.get(t, (0.0, 0.0, 0))
                cells = [t, str(calls), f"{gflop:.2f}", f"{ms:.2f}", f"{ms / total:.0%}",
                         f"{gflop / ms * 1e3:.0f}" if ms else "-", f"{gflop / ms * 1e3 / rate:.2f}×" if ms else "-"]
                if peer:
                    cells.append(f"{peer[t]:.2f}" if t in peer else "-")
                print("| " + " | ".join(cells) + " |")
            rest = total - sum(v[0] for v in layers.values())
            print(f"| everything else (pools, fc, checks, Python) | | | {rest:.2f} | {rest / total:.0%} | | |"
                  + (" |" if peer else ""))
            results.append({"model": arch, "batch": batch, "size": args.size, "total_ms": total,
                            "layers": layers, "onnxruntime_total_ms": peer_total, "onnxruntime_layers": peer})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "layer times", "sgemm_gflops": rate, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
