"""The per-output-channel affine of the Triton kernels' epilogues: either a
given (scale, shift) pair, or an eval-mode BatchNorm folded inside the
kernel from γ, β, running mean/var, eps and the conv bias, so a model's
conv+BN pair costs one launch and no torch op per forward (never stale, no
cache: the kernel reads the module's tensors as they are).

`channel_affine` is the kernel half, `Affine` the host half that passes
the right pointers and the `BN` constexpr to each kernel (conv.py,
conv_tma.py, batch_norm.py's epilogue). The formula and its rounding order
are ops/fold.py's (`scale_shift`), which computes the same in torch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

# the BN constexpr: 0 = (scale, shift) given; otherwise FOLD plus one bit per
# optional tensor present
FOLD, GAMMA, BETA, CONV_BIAS = 1, 2, 4, 8


@triton.jit
def channel_affine(a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, k, mask, BN: tl.constexpr):
    """fp32 (scale, shift) of output channels `k`. BN == 0: a and b are the
    scale and shift. Otherwise a is running_var, b running_mean, and
    scale = γ·(1/√(var + eps)), shift = β − mean·scale + bias·scale, in
    ops/fold.py's order with correctly rounded division and square root."""
    a = tl.load(a_ptr + k, mask=mask, other=1.0).to(tl.float32)
    b = tl.load(b_ptr + k, mask=mask, other=0.0).to(tl.float32)
    if BN == 0:
        scale = a
        shift = b
    else:
        scale = tl.div_rn(1.0, tl.sqrt_rn(a + eps))
        if BN & 2:
            scale = tl.load(gamma_ptr + k, mask=mask, other=0.0).to(tl.float32) * scale
        shift = -b * scale
        if BN & 4:
            shift = tl.load(beta_ptr + k, mask=mask, other=0.0).to(tl.float32) + shift
        if BN & 8:
            shift = shift + tl.load(bias_ptr + k, mask=mask, other=0.0).to(tl.float32) * scale
    return scale, shift


@dataclasses.dataclass(frozen=True, eq=False)
class Affine:
    """What an epilogue applies per output channel (see the module docstring)."""

    a: Tensor  # scale, or running_var
    b: Tensor  # shift, or running_mean
    gamma: Optional[Tensor] = None
    beta: Optional[Tensor] = None
    conv_bias: Optional[Tensor] = None
    eps: float = 0.0
    bn: int = 0

    @staticmethod
    def given(scale: Tensor, shift: Tensor) -> "Affine":
        return Affine(scale, shift)

    @staticmethod
    def batch_norm(
        gamma: Optional[Tensor], beta: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
        conv_bias: Optional[Tensor] = None,
    ) -> "Affine":
        bn = FOLD | (GAMMA if gamma is not None else 0) | (BETA if beta is not None else 0)
        bn |= CONV_BIAS if conv_bias is not None else 0
        return Affine(running_var, running_mean, gamma, beta, conv_bias, float(eps), bn)

    def args(self) -> tuple:
        """The kernel's (a, b, gamma, beta, bias, eps) arguments; absent
        tensors are stood in for by `a` (never read: their bit is off)."""
        a = self.a
        return (a, self.b, _or(self.gamma, a), _or(self.beta, a), _or(self.conv_bias, a), self.eps)

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.a, self.b, self.gamma, self.beta, self.conv_bias) if t is not None)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The same (scale, shift) computed in torch (the tuner's reference)."""
        if self.bn == 0:
            return self.a, self.b
        from resnet_fused.ops.fold import scale_shift

        return scale_shift(self.gamma, self.beta, self.b, self.a, self.eps, self.conv_bias)


def _or(t: Optional[Tensor], default: Tensor) -> Tensor:
    return default if t is None else t

