import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter.
# This must happen before resnet_fused (and so every @triton.jit) is imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Exact fp32 everywhere: the equivalence tolerances below assume no TF32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# Tolerances on ||out - ref|| / ||ref|| (DESIGN §5).
OP_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NET_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    num = (out - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def assert_equivalent(
    out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output", elementwise_tol: float = None
) -> None:
    """Relative-norm check (‖out − ref‖/‖ref‖ ≤ tol) plus an elementwise check
    that catches localised errors a norm over a large tensor could hide:
    |out − ref| ≤ e·max|ref| + e·|ref| with e = elementwise_tol (default tol).
    NaN/inf never pass."""
    elementwise_tol = tol if elementwise_tol is None else elementwise_tol
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert torch.isfinite(ref).all(), f"{what}: non-finite values in the reference"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    scale = ref.detach().abs().max().double().item()
    torch.testing.assert_close(
        out.detach().double(),
        ref.detach().double(),
        rtol=elementwise_tol,
        atol=max(elementwise_tol * scale, 1e-30),
        msg=lambda m: f"{what}: {m}",
    )


def randomize_norms(model: torch.nn.Module, seed: int = 1, last_norms=()) -> torch.nn.Module:
    """Non-trivial BN state: random γ, β, running mean and variance.

    The last BN of each residual block gets γ in [0.1, 0.4], as in trained
    ResNets: with γ ≥ 0.5 there too, every block amplifies the residual stream
    and three SGD steps on a 100-layer net reach losses of 1e33, a chaotic
    problem on which no two implementations (not even two fp64 ones) agree.
    `last_norms`: those BNs of models not built from torchvision blocks."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    last_norms = {id(m) for m in last_norms}
    for m in model.modules():
        if isinstance(m, Bottleneck):
            last_norms.add(id(m.bn3))
        elif isinstance(m, BasicBlock):
            last_norms.add(id(m.bn2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.num_features if isinstance(m, torch.nn.BatchNorm2d) else m.running_mean.numel()
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    low, span = (0.1, 0.3) if id(m) in last_norms else (0.5, 1.0)
                    m.weight.copy_(torch.rand(c, generator=g) * span + low)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


@pytest.fixture(autouse=True)
def _default_backend():
    """Each test starts from the default selection."""
    import resnet_fused

    resnet_fused.set_backend("auto")
    yield
    resnet_fused.set_backend("auto")
