"""Build a fused ResNet, check it against stock torchvision, print the comparison.

    resnet-fused-check [--model resnet50] [--batch 4] [--size 128] [--device auto]

Both models start from the same seed and get the same random, non-trivial
BatchNorm state (identity BN would hide errors in the fused epilogue). On the
device (CUDA when a GPU is visible, else the CPU), for each available backend
that computes on that device's tensors (`backends_for`), it reports the relative output error in eval mode (NCHW and
channels_last), the loss and worst gradient error after one training step, and
the eval forward time next to torchvision's, measured in this process. Exits 1
when an error exceeds its tolerance (1e-4: fp32 outputs and loss; gradients
with both models in float64, see train_step_errors).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import resnet_fused

TOLERANCE = 1e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def randomize_bn(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def backends_for(device: torch.device) -> list[str]:
    """The available concrete backends that compute on `device`'s tensors:
    `cpu` never takes CUDA tensors nor `cuda` CPU ones, and `triton` takes
    CPU tensors only under TRITON_INTERPRET=1 (each backend declares its
    device types)."""
    return [n for n in resnet_fused.available_backends() if device.type in resnet_fused.backends.device_types(n)]


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", choices=resnet_fused.MODEL_NAMES)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="input height and width")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where both models run (default: CUDA when a GPU is visible, else the CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = resolve_device(args.device)

    torch.manual_seed(0)
    tv = getattr(torchvision.models, args.model)()
    torch.manual_seed(0)
    fused = getattr(resnet_fused, args.model)()
    same_init = all(torch.equal(a, b) for a, b in zip(tv.state_dict().values(), fused.state_dict().values()))
    randomize_bn(tv, seed=1)
    fused.load_state_dict(tv.state_dict(), strict=True)
    tv, fused = tv.to(device), fused.to(device)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    target = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    print(f"resnet_fused {resnet_fused.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"model {args.model}, input {tuple(x.shape)} fp32 on {device}, {torch.get_num_threads()} threads")
    print(f"same parameters as torchvision for the same seed: {same_init}")
    served = backends_for(device)
    for name, reason in resnet_fused.backends.status().items():
        if name != "auto":
            state = "available" if reason is None else "unavailable: " + reason
            if reason is None and name not in served:
                state += f", but not for {device.type} tensors (not checked)"
            print(f"  backend {name:7s} {state}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward(model, inp):
        def run():
            with torch.no_grad():
                out = model(inp)
            sync()
            return out

        return run

    tv.eval()
    fused.eval()
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, ref_cl = tv(x), tv_cl(x_cl)
    t_tv = _time(forward(tv, x), args.repeats)

    header = f"{'backend':8s} {'eval err NCHW':>14s} {'eval err NHWC':>14s} {'train loss err':>15s} {'grad err fp64':>15s} {'fwd ms':>8s} {'vs torchvision':>15s}"
    print()
    print(header)
    print(f"{'torchvision':11s}{'':>63s}{t_tv * 1e3:8.1f} {'1.00x':>15s}")
    failed = False
    for name in served:
        with resnet_fused.backend(name):
            fused_cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
            with torch.no_grad():
                err = rel_err(fused(x), ref)
                err_cl = rel_err(fused_cl(x_cl), ref_cl)
            t = _time(forward(fused, x), args.repeats)
            loss_err, grad_err = train_step_errors(tv, fused, x, target)
        worst = max(err, err_cl, loss_err, grad_err)
        failed |= not worst <= TOLERANCE
        print(
            f"{name:8s} {err:14.2e} {err_cl:14.2e} {loss_err:15.2e} {grad_err:15.2e} "
            f"{t * 1e3:8.1f} {t_tv / t:14.2f}x"
        )
    print()
    print(
        f"tolerance {TOLERANCE:.0e} (relative L2 error; outputs and loss fp32, gradients float64): "
        f"{'FAILED' if failed else 'all within'}"
    )
    return 1 if failed else 0


def train_step_errors(tv, fused, x, target) -> tuple[float, float]:
    """Errors of one training step against torchvision, on copies (the models
    and their BN statistics stay as they were): the fp32 loss, and the worst
    parameter gradient with both models in float64. Two different fp32
    implementations of a deep ReLU net disagree on gradients by percents
    whenever one pre-activation within an ulp of zero lands on the other side
    of a ReLU; in float64 that cannot happen, so the comparison is sharp."""
    losses = [F.cross_entropy(copy.deepcopy(m).train()(x), target) for m in (tv, fused)]
    grads = []
    for model in (tv, fused):
        model = copy.deepcopy(model).double().train()
        F.cross_entropy(model(x.double()), target).backward()
        grads.append([p.grad for p in model.parameters()])
    worst = max(rel_err(a, b) for a, b in zip(grads[1], grads[0]) if b.norm() > 0)
    return rel_err(losses[1], losses[0]), worst


if __name__ == "__main__":
    sys.exit(main())
