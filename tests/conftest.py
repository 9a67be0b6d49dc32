import os

import pytest
import torch

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


def assert_equivalent(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """Relative-norm check plus an elementwise check scaled to the reference;
    NaN/inf never pass."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert torch.isfinite(ref).all(), f"{what}: non-finite values in the reference"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    scale = ref.detach().abs().max().double().item()
    torch.testing.assert_close(
        out.detach().double(), ref.detach().double(), rtol=tol, atol=max(tol * scale, 1e-30), msg=what
    )


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial BN state: random γ, β, running mean and variance."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.num_features if isinstance(m, torch.nn.BatchNorm2d) else m.running_mean.numel()
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
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
