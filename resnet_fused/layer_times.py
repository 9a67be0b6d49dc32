"""Where a fused model's CPU inference time goes, per layer type, against
this machine's sgemm rate and, optionally, onnxruntime's own profile of the
same layers (the peer whose 1×1 convolutions are the ones to beat).

    python -m resnet_fused.layer_times [--model resnet50] [--batch 1 8] [--size 224]
                                       [--threads 2] [--rounds 10] [--onnxruntime] [--per-layer]

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

With --per-layer each convolution gets its own row as well, in forward
order: the kernel that ran it, its time inside the forward, its time run
again alone right after each timed forward (same inputs, a warm call first:
its weights and workspace in cache, so the gap to the in-model time is what
the forward's cold weights and evicted activations cost) and, with
--onnxruntime, onnxruntime's node for the same convolution.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Optional

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


@dataclasses.dataclass
class Call:
    """One conv_bn_act call of a timed forward."""
    type: str
    kernel: str  # which CPU kernel ran it (`kernel_name`)
    cin: int
    cout: int
    out_hw: tuple
    seconds: float
    gflop: float  # as a direct convolution counts them
    replay: Optional[tuple] = None  # (x, packed, args, kwargs) to run it again alone


def kernel_name(packed) -> str:
    """The CPU kernel that runs `packed` (ops.cpu.onednn.conv_bn_act)."""
    if packed.winograd:
        return "winograd"
    if packed.gemm:
        return "gemm"
    if packed.grouped:
        return "grouped"
    return "onednn"


@contextlib.contextmanager
def _timed_convolutions(calls: list, keep_inputs: bool = False):
    """Time every onednn.conv_bn_act call while inside: `calls` gets a Call
    per call, in order (with `keep_inputs`, what it needs to run again)."""
    original = onednn.conv_bn_act

    def timed(x, packed, *args, **kwargs):
        start = time.perf_counter()
        out = original(x, packed, *args, **kwargs)
        seconds = time.perf_counter() - start
        k = packed.kernel_size[0]
        cin, cout = x.shape[1], out.shape[1]
        calls.append(Call(layer_type(k, packed.stride[0], cin, cout), kernel_name(packed), cin, cout,
                          tuple(out.shape[2:]), seconds,
                          2 * out.numel() * cin // packed.groups * k * k / 1e9,
                          (x, packed, args, kwargs) if keep_inputs else None))
        return out

    onednn.conv_bn_act = timed
    try:
        yield
    finally:
        onednn.conv_bn_act = original


def _alone(call: Call) -> float:
    """Seconds of `call` run again by itself, after one untimed call (a
    residual the call consumes is copied first, outside the timing)."""
    x, packed, args, kwargs = call.replay

    def fresh():
        return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)

    onednn.conv_bn_act(x, packed, *fresh(), **kwargs)
    again = fresh()
    start = time.perf_counter()
    onednn.conv_bn_act(x, packed, *again, **kwargs)
    return time.perf_counter() - start


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n)
    torch.mm(a, a)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, a)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def fused_layers(model: torch.nn.Module, x: torch.Tensor, rounds: int,
                 per_layer: bool = False) -> tuple[dict, float, list]:
    """{type: (ms per forward, GFLOP per forward, calls per forward)}, the
    whole forward's ms, over `rounds` timed forwards after a warm one, and
    with `per_layer` one dict per convolution in forward order (median ms
    in the forward and run alone, see the module's doc)."""
    calls: list = []
    alone: list = []
    with torch.no_grad():
        model(x)
        total = 0.0
        for _ in range(rounds):
            start = len(calls)
            with _timed_convolutions(calls, keep_inputs=per_layer):
                begin = time.perf_counter()
                model(x)
                total += time.perf_counter() - begin
            if per_layer:
                alone.append([_alone(c) for c in calls[start:]])
                for c in calls[start:]:
                    c.replay = None
    record: dict = {}
    for c in calls:
        entry = record.setdefault(c.type, [0.0, 0.0, 0])
        entry[0] += c.seconds
        entry[1] += c.gflop
        entry[2] += 1
    layers = []
    if per_layer and rounds:
        n = len(calls) // rounds
        for i, c in enumerate(calls[:n]):
            layers.append({"type": c.type, "kernel": c.kernel, "cin": c.cin, "cout": c.cout, "out_hw": list(c.out_hw),
                           "gflop": c.gflop,
                           "ms": statistics.median(calls[r * n + i].seconds for r in range(rounds)) * 1e3,
                           "alone_ms": statistics.median(a[i] for a in alone) * 1e3})
    return ({t: (s / rounds * 1e3, g / rounds, c // rounds) for t, (s, g, c) in record.items()},
            total / rounds * 1e3, layers)


def onnxruntime_layers(tv: torch.nn.Module, x: torch.Tensor, rounds: int, threads: int) -> tuple[dict, float, list]:
    """{type: ms per run} from onnxruntime's profile of the ONNX export, the
    whole run's ms (timed without the profile's warm-up runs), and per
    convolution in graph order (torchvision's forward order) its channels
    and ms per run."""
    import onnx

    from resnet_fused import peers

    exported = peers.export_onnx(tv, x.shape[-1])
    graph = onnx.load_from_string(exported).graph
    weights = {i.name: i.dims for i in graph.initializer}
    by_output, index, convs = {}, {}, []
    for node in graph.node:  # a conv's type, also under the Relu/Add outputs onnxruntime names fused nodes by
        if node.op_type == "Conv":
            cout, cin, k, _ = weights[node.input[1]]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            by_output[node.output[0]] = by_output[node.name] = layer_type(
                k, attrs.get("strides", [1, 1])[0], cin * attrs.get("group", 1), cout)
            index[node.output[0]] = index[node.name] = len(convs)
            convs.append({"cin": cin * attrs.get("group", 1), "cout": cout, "ms": 0.0})
        elif node.op_type in ("Relu", "Add") and any(i in by_output for i in node.input):
            source = next(i for i in node.input if i in by_output)
            by_output[node.output[0]], index[node.output[0]] = by_output[source], index[source]
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
            if node not in by_output:
                node = node.removesuffix("_nchwc")
            kind = by_output.get(node)
            ms = e["dur"] / 1e3 / (rounds + 1)
            per_type[kind or f"other ({e['args'].get('op_name', '?')})"] += ms
            if kind:
                convs[index[node]]["ms"] += ms
    return dict(per_type), total, convs


def _add_onnxruntime(per_layer: list, peer_convs: list) -> bool:
    """Give each --per-layer row its onnxruntime node's ms ("onnxruntime_ms"),
    where onnxruntime's convolutions are the forward's, in the same order;
    whether they were."""
    same = bool(peer_convs) and len(peer_convs) == len(per_layer) and all(
        (p["cin"], p["cout"]) == (c["cin"], c["cout"]) for p, c in zip(peer_convs, per_layer))
    if same:
        for c, p in zip(per_layer, peer_convs):
            c["onnxruntime_ms"] = p["ms"]
    return same


def _print_per_layer(per_layer: list) -> None:
    peer = bool(per_layer) and "onnxruntime_ms" in per_layer[0]
    print("\n| # | layer type | kernel | channels | output | in forward ms | alone ms | forward / alone |"
          + (" onnxruntime ms |" if peer else ""))
    for i, c in enumerate(per_layer):
        cells = [str(i), c["type"], c["kernel"], f"{c['cin']}→{c['cout']}", "×".join(map(str, c["out_hw"])),
                 f"{c['ms']:.3f}", f"{c['alone_ms']:.3f}", f"{c['ms'] / c['alone_ms']:.2f}"]
        if peer:
            cells.append(f"{c['onnxruntime_ms']:.3f}")
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_fused.layer_times", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["resnet50"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--onnxruntime", action="store_true", help="add onnxruntime's per-layer profile")
    p.add_argument("--per-layer", action="store_true",
                   help="a row per convolution as well: in the forward, alone, and onnxruntime's node")
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
            layers, total, per_layer = fused_layers(fused, x.contiguous(memory_format=torch.channels_last),
                                                    args.rounds, args.per_layer)
            peer, peer_total, peer_convs = onnxruntime_layers(tv, x, args.rounds, torch.get_num_threads()) \
                if args.onnxruntime else ({}, None, [])
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
            if args.per_layer:
                if peer_convs and not _add_onnxruntime(per_layer, peer_convs):
                    print("(onnxruntime's convolutions are not the forward's, in order: no onnxruntime column)")
                _print_per_layer(per_layer)
            results.append({"model": arch, "batch": batch, "size": args.size, "total_ms": total,
                            "layers": layers, "onnxruntime_total_ms": peer_total, "onnxruntime_layers": peer,
                            "per_layer": per_layer})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "layer times", "sgemm_gflops": rate, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
