"""The k x k convolutions that neither Winograd nor the grouped kernel takes
(the stem and ResNet's 3x3 stride-2 layers), each as oneDNN runs it on
pre-packed weights and as the library's implicit GEMM (conv_gemm), with
bias and ReLU, timed in interleaved rounds in one process:

    python benchmarks/interleaved_convs.py --rounds 9 [--batch 1 8] [--layers stem] [--out FILE.md]

Each round times every implementation in turn (a pause, a warm call, then
`--calls` timed calls); the table gives medians and the median of the
per-round ratios, which is what survives a VM whose speed swings within
minutes. `pytest benchmarks/test_ops.py -k conv_kxk --benchmark-only` times
the same layers one implementation after the other instead.
"""
import argparse
import statistics
import sys
import time

import torch

from resnet_fused.bench import SETTLE_S, cpu_description  # importing resnet_fused loads the extension's ops
from resnet_fused.ops import extension

# (name, C, K, kernel, stride, input side)
LAYERS = [
    ("stem", 3, 64, 7, 2, 224),
    ("resnet18 layer2", 64, 128, 3, 2, 56),
    ("resnet50 layer2", 128, 128, 3, 2, 56),
    ("resnet18 layer3", 128, 256, 3, 2, 28),
    ("resnet50 layer3", 256, 256, 3, 2, 28),
    ("resnet18 layer4", 256, 512, 3, 2, 14),
    ("resnet50 layer4", 512, 512, 3, 2, 14),
]


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=0, help="timed calls per round (default: 20 at batch 1, 3 else)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", nargs="+", default=None, help="names (first word) to keep, e.g. stem resnet18")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the table, the machine and the command to this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ops = torch.ops.resnet_fused
    rows, lines = [], []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    emit("| layer | batch | oneDNN ms (GFLOP/s) | conv_gemm ms (GFLOP/s) | oneDNN / conv_gemm | max abs diff |")
    emit("|---|---|---|---|---|---|")
    for n in args.batch:
        for name, c, k, r, s, h in LAYERS:
            if args.layers and name.split()[0] not in args.layers:
                continue
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
            w = torch.randn(k, c, r, r, generator=g) / (r * r * c) ** 0.5
            b = torch.randn(k, generator=g)
            pad = r // 2
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, [pad] * 2, [s] * 2, [1, 1], 1, list(x.shape))
            gemm = ops.conv_gemm_weight(w)
            impls = {
                "onednn": lambda: torch.ops.mkldnn._convolution_pointwise(
                    x, packed, b, [pad] * 2, [s] * 2, [1, 1], 1, "relu", [], ""),
                "conv_gemm": lambda: ops.conv_gemm(x, gemm, b, None, True, [r, r], s, pad),
            }
            diff = (impls["onednn"]() - impls["conv_gemm"]()).abs().max().item()
            calls = args.calls or (20 if n == 1 else 3)
            times = {key: [] for key in impls}
            for _ in range(args.rounds):
                for key, run in impls.items():
                    time.sleep(SETTLE_S)  # what ran before stops spinning (resnet_fused.bench)
                    run()
                    start = time.perf_counter()
                    for _ in range(calls):
                        run()
                    times[key].append((time.perf_counter() - start) / calls * 1e3)
            p = (h + 2 * pad - r) // s + 1
            gflop = 2 * n * k * p * p * c * r * r / 1e9
            med = {key: statistics.median(t) for key, t in times.items()}
            ratio = statistics.median(a / b for a, b in zip(times["onednn"], times["conv_gemm"]))
            rows.append({"layer": name, "batch": n, "onednn_ms": med["onednn"], "conv_gemm_ms": med["conv_gemm"],
                         "ratio": ratio, "max_abs_diff": diff})
            emit(f"| {name}: {c}→{k} {r}×{r} s{s} at {h}² | {n} | {med['onednn']:.2f} ({gflop / med['onednn'] * 1e3:.0f}) "
                 f"| {med['conv_gemm']:.2f} ({gflop / med['conv_gemm'] * 1e3:.0f}) | {ratio:.2f} | {diff:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# k x k convolutions: oneDNN vs conv_gemm, interleaved ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n")
            f.write(f"Command: `python benchmarks/interleaved_convs.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n")
            f.write(f"CPU: {cpu_description()}; GEMM kernel {extension.cpu_gemm_isa()}; torch {torch.__version__}; "
                    f"{args.threads} threads\n\n")
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
