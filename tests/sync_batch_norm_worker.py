"""One rank of tests/test_sync_batch_norm.py's gloo group, and what the test
shares with it (models, batches, the training step).

    python sync_batch_norm_worker.py RANK WORLD INIT_FILE DEVICE OUT_FILE SCENARIO...

trains each scenario's model on this rank's batches and writes, per scenario,
the losses and gradients summed over the ranks, this rank's parameters and
buffers afterwards, how often the sync op ran and the unfused-block warnings.
"""
from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import resnet_fused
from resnet_fused.ops import sync_batch_norm as sync_ops

STEPS = 2
LR = 0.5

# name -> (CIFAR shortcut, per-rank batch sizes, memory_efficient, converter, DDP, BN momentum, backend)
SCENARIOS = {
    "ddp": ("B", (3, 3), False, "resnet_fused", True, 0.1, "auto"),
    "memory_efficient_unequal": ("A", (4, 1), True, "resnet_fused", False, None, "auto"),
    "empty_rank": ("B", (3, 0), False, "resnet_fused", False, 0.3, "auto"),
    "torch_converter": ("A", (2, 3), True, "torch", False, 0.1, "auto"),
    "eager_backend": ("B", (1, 3), True, "resnet_fused", False, 0.1, "eager"),
}


def build_model(scenario: str, device: str) -> nn.Module:
    """The scenario's float64 fused CIFAR ResNet-8 with random, non-trivial BN
    state (docs/design.md §5: never identity BN), the same on every call."""
    shortcut, _, efficient, _, _, momentum, _ = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = resnet_fused.cifar_resnet(8, num_classes=5, shortcut=shortcut).double()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.momentum = momentum
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64))
                m.bias.copy_(0.2 * torch.randn(c, generator=g, dtype=torch.float64))
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
    if efficient:
        resnet_fused.memory_efficient(model)
    return model.to(device)


def batches(scenario: str, device: str) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """[step][rank] -> (images, labels); each rank's images from a different
    distribution, so that its own statistics are far from the group's."""
    sizes = SCENARIOS[scenario][1]
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(STEPS):
        step = []
        for rank, n in enumerate(sizes):
            x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) * (1 + rank) + 2 * rank
            y = torch.randint(0, 5, (n,), generator=g)
            step.append((x.to(device), y.to(device)))
        out.append(step)
    return out


def total_count(scenario: str) -> int:
    return sum(SCENARIOS[scenario][1])


def loss_of(logits: torch.Tensor, labels: torch.Tensor, total: int) -> torch.Tensor:
    # the union batch's mean loss is the sum of these over the ranks
    return F.cross_entropy(logits, labels, reduction="sum") / total


def state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _count_sync_calls() -> list:
    """Record each call of the two sync ops by name (the fused path's proof)."""
    calls = []
    for name in ("sync_batch_norm_act", "conv_sync_bn_act_train"):
        op = getattr(sync_ops, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)

        setattr(sync_ops, name, counted)
    return calls


def run(scenario: str, rank: int, world: int, device: str, calls: list) -> dict:
    _, _, _, converter, use_ddp, _, backend = SCENARIOS[scenario]
    model = build_model(scenario, device)
    if converter == "torch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = resnet_fused.convert_sync_batchnorm(model)
    model.train()
    net = nn.parallel.DistributedDataParallel(model) if use_ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    total = total_count(scenario)
    losses, grads = [], []
    del calls[:]
    with warnings.catch_warnings(record=True) as caught, resnet_fused.backend(backend):
        warnings.simplefilter("always")
        for step in batches(scenario, device):
            x, y = step[rank]
            opt.zero_grad()
            loss = loss_of(net(x), y, total)
            # DDP averages the ranks' gradients: scaled by the world size they are the sum
            (loss * world if use_ddp else loss).backward()
            summed = loss.detach().clone()
            dist.all_reduce(summed)
            losses.append(summed.cpu())
            step_grads = {}
            for name, p in model.named_parameters():
                if not use_ddp:
                    dist.all_reduce(p.grad)
                step_grads[name] = p.grad.detach().cpu().clone()
            grads.append(step_grads)
            opt.step()
    unfused = [str(w.message) for w in caught if "unfused" in str(w.message)]
    return {"losses": losses, "grads": grads, "state": state(model), "sync_calls": list(calls), "unfused": unfused}


# the op on its own, fp32: per-rank batch sizes, channels, narrow residual (channels, offset)
OP_SIZES = (3, 2)
OP_CHANNELS, OP_RESIDUAL = 6, (2, 2)
OP_MOMENTUM, OP_EPS = 0.1, 1e-5


def op_inputs() -> tuple[list, tuple]:
    """([rank] -> (x, narrow residual, upstream gradient)), (weight, bias, running_mean, running_var)."""
    g = torch.Generator().manual_seed(4)
    c, (cr, _) = OP_CHANNELS, OP_RESIDUAL
    ranks = [
        (torch.randn(n, c, 5, 5, generator=g) * (1 + r) + 3 * r, torch.randn(n, cr, 5, 5, generator=g),
         torch.randn(n, c, 5, 5, generator=g))
        for r, n in enumerate(OP_SIZES)
    ]
    params = (1 + 0.3 * torch.randn(c, generator=g), 0.2 * torch.randn(c, generator=g),
              torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g))
    return ranks, params


def run_op(rank: int, device: str) -> dict:
    """sync_batch_norm_act in fp32 on a channels_last x with a narrow residual."""
    ranks, params = op_inputs()
    x, residual, grad_out = (t.to(device) for t in ranks[rank])
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    residual.requires_grad_()
    weight, bias = (p.to(device).requires_grad_() for p in params[:2])
    running_mean, running_var = (p.to(device) for p in params[2:])
    out = sync_ops.sync_batch_norm_act(
        x, weight, bias, running_mean, running_var, OP_MOMENTUM, OP_EPS, residual, True,
        residual_channel_offset=OP_RESIDUAL[1],
    )
    (out * grad_out).sum().backward()
    for p in (weight, bias):
        dist.all_reduce(p.grad)
    # the module on its own (not in a fused block), 2-D input as BatchNorm1d's, momentum=None
    module = resnet_fused.FusedSyncBatchNorm(OP_CHANNELS, momentum=None).to(device)
    features = x.detach().mean((2, 3)) * (1 + rank)
    for _ in range(2):
        module_out = module(features)
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    return {
        "module_out": cpu(module_out), "module_state": state(module),
        "out": cpu(out), "channels_last": out.is_contiguous(memory_format=torch.channels_last),
        "grad_x": cpu(x.grad), "grad_residual": cpu(residual.grad), "grad_weight": cpu(weight.grad),
        "grad_bias": cpu(bias.grad), "running_mean": cpu(running_mean), "running_var": cpu(running_var),
    }


def main(argv: list[str]) -> None:
    rank, world, init_file, device, out_file, *scenarios = argv
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calls = _count_sync_calls()
        results = {s: run_op(rank, device) if s == "op" else run(s, rank, world, device, calls) for s in scenarios}
        torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
