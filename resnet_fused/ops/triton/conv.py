"""conv_bn_act as one Triton kernel: implicit-GEMM convolution with the
BatchNorm scale/shift (given, or folded from the BN's tensors in the kernel:
fold.py), residual add and ReLU applied in registers before the single store.

GEMM view (per group g): M = N·P·Q output pixels, N_gemm = K/groups output
channels, reduction over R·S·C/groups. Every tensor is addressed through its
strides, so NCHW and channels_last inputs, weights and residuals all work
without copies; channels_last (C contiguous) is the layout the tiles are laid
out for, and the output takes x's memory format.

Two reduction schedules (constexpr `FLAT_RSC`):
* channel-blocked (default): the loop runs over (r, s, c-block); a tile's
  BLOCK_K channels are contiguous in NHWC memory.
* flattened: the loop runs over the flattened (r, s, c) index, decomposed per
  element. Used when C/groups is small (the 7×7 stem has C = 3): blocking C
  would pad 3 channels to BLOCK_K ≥ 16 and waste 80% of the tensor-core work,
  while flattening pads 147 = 7·7·3 only up to a multiple of BLOCK_K.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from resnet_fused.ops.common import memory_format
from resnet_fused.ops.triton.fold import Affine, channel_affine

from resnet_fused.ops.triton import interpreting  # noqa: F401  (re-exported for tuning)


@triton.jit
def conv_bn_act_kernel(
    x_ptr, w_ptr,
    # the per-channel affine (fold.py): scale/shift, or BN folded in here
    a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps,
    res_ptr, y_ptr,
    # sizes
    N, H, W, P, Q, R, S, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # strides (elements)
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    # the residual holds output channels [R_C0, R_C0 + R_CN): the zero-padded
    # option-A shortcut reads in place, never materialised
    R_C0, R_CN,
    BN: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    FLAT_RSC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INDEX_64: tl.constexpr,
    # Triton 3.8's interpreter multiplies bf16 dot operands wrongly (raw
    # bits); there, bf16 operands are widened to fp32 first. Products of two
    # bf16 values are exact in fp32, so this computes what the tensor cores
    # do (exact products, fp32 accumulation). Never set for compiled code.
    WIDEN_OPERANDS: tl.constexpr,
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    M = N * P * Q
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K_G, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share each weight tile while it is
    # hot in L2
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    # int64 offsets only where a tensor passes 2^31 elements (batch 2,612 at
    # 256×56×56 does): 64-bit pointer math doubles the address registers.
    if INDEX_64:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < K_G
    k_out = group * K_G + offs_n  # output channel
    n_idx = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p_idx = pq // Q
    q_idx = pq % Q
    h0 = p_idx * stride_h - pad_h
    w0 = q_idx * stride_w - pad_w
    x_base = x_ptr + n_idx * sx_n + (group * C_G) * sx_c
    w_base = w_ptr + k_out * sw_k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_RSC:
        RSC = R * S * C_G
        for k0 in range(0, RSC, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < RSC
            c = offs_k % C_G
            rs = offs_k // C_G
            r = rs // S
            s = rs % S
            h = h0[:, None] + (r * dil_h)[None, :]
            w = w0[:, None] + (s * dil_w)[None, :]
            in_x = (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a = tl.load(
                x_base[:, None] + c[None, :] * sx_c + h * sx_h + w * sx_w,
                mask=mask_m[:, None] & mask_k[None, :] & in_x,
                other=0.0,
            )
            b = tl.load(
                w_base[None, :] + (c * sw_c + r * sw_r + s * sw_s)[:, None],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            if WIDEN_OPERANDS:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        c_blocks = tl.cdiv(C_G, BLOCK_K)
        for i in range(0, R * S * c_blocks):
            rs = i // c_blocks
            c0 = (i % c_blocks) * BLOCK_K
            r = rs // S
            s = rs % S
            h = h0 + r * dil_h
            w = w0 + s * dil_w
            in_x = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < C_G
            a = tl.load(
                (x_base + h * sx_h + w * sx_w)[:, None] + offs_c[None, :] * sx_c,
                mask=in_x[:, None] & mask_c[None, :],
                other=0.0,
            )
            b = tl.load(
                w_base[None, :] + (offs_c * sw_c + r * sw_r + s * sw_s)[:, None],
                mask=mask_c[:, None] & mask_n[None, :],
                other=0.0,
            )
            if WIDEN_OPERANDS:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # epilogue, in fp32 registers
    scale, shift = channel_affine(a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, k_out, mask_n, BN)
    out = acc * scale[None, :] + shift[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    k64 = k_out.to(tl.int64) if INDEX_64 else k_out
    if HAS_RESIDUAL:
        k_res = k64 - R_C0
        res_off = (n_idx * sr_n + p_idx * sr_h + q_idx * sr_w)[:, None] + (k_res * sr_c)[None, :]
        res_mask = mask & ((k_res >= 0) & (k_res < R_CN))[None, :]
        out += tl.load(res_ptr + res_off, mask=res_mask, other=0.0).to(tl.float32)
    if RELU:
        out = tl.where(out < 0.0, 0.0, out)  # keeps NaN, as torch.relu does
    y_off = (n_idx * sy_n + p_idx * sy_h + q_idx * sy_w)[:, None] + (k64 * sy_c)[None, :]
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """One tiling of the implicit GEMM."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"


# The autotuning space: every tiling here compiles for sm_80 and sm_90 with no
# register spills (python -m resnet_fused.ops.triton.aot prints the table).
# Wide-N tiles for the late-stage layers, narrow-N tiles for 64-channel layers
# and grouped convolutions (ResNeXt has 4–8 output channels per group at 32
# groups), small-M tiles for small batches, 4 stages for the long reductions
# of the late layers (3·3·512), a 64-channel K step that halves the loop trips
# where C/groups allows it. 128×128 tiles are absent: with pointer-gathered
# operands (no TMA for implicit GEMM) they spill on both architectures at 4
# or 8 warps.
CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig(128, 64, 32, num_warps=8, num_stages=3),
    ConvConfig(64, 128, 32, num_warps=8, num_stages=3),
    ConvConfig(64, 64, 32, num_warps=4, num_stages=3),
    ConvConfig(64, 64, 32, num_warps=8, num_stages=3),
    ConvConfig(128, 32, 32, num_warps=8, num_stages=3),
    ConvConfig(64, 32, 32, num_warps=4, num_stages=3),
    ConvConfig(128, 16, 16, num_warps=4, num_stages=3),
    # K = 64 here spilled 48-52 B on sm_80 in NCHW fp16/bf16 at batch 1 (the
    # launched variants, aot.py); K = 32 needs 128 registers, no spill
    ConvConfig(32, 64, 32, num_warps=4, num_stages=3),
    ConvConfig(64, 64, 64, num_warps=8, num_stages=3),
    ConvConfig(128, 64, 32, num_warps=8, num_stages=4),
    ConvConfig(64, 128, 32, num_warps=8, num_stages=4),
    ConvConfig(64, 64, 32, num_warps=4, num_stages=4),
)
# Only where the channels are unit-stride in x, the weight and the residual
# (channels_last; `channels_contiguous`): the loads vectorise and every
# launched variant fits without spilling (102-255 registers, aot.py over all
# three models and batches). With NCHW's strided channel gathers the same
# tilings spilled 400-1270 B (resnet50 batch 1): 4 warps holding a 128×64 or
# 64×128 accumulator, or a 64-channel K step at 4 warps.
CHANNELS_LAST_CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig(64, 64, 64, num_warps=4, num_stages=3),
    ConvConfig(128, 64, 64, num_warps=8, num_stages=3),
    ConvConfig(128, 64, 32, num_warps=4, num_stages=3),
    ConvConfig(64, 128, 32, num_warps=4, num_stages=3),
)
# fp32 operands (twice the registers per element), the flattened stem
# reduction and int64 offsets raise register pressure past what most of the
# tilings above survive without spilling. A K step of 16 passes for all of
# them; with 32 the launched variants spilled 8-24 B (fp32 at batch 1, the
# ResNeXt grouped convs' flattened reduction in fp32).
WIDE_CONFIGS: tuple[ConvConfig, ...] = (ConvConfig(64, 64, 16, num_warps=8, num_stages=3),)
# Under TRITON_INTERPRET=1 nothing is timed: one fixed configuration.
INTERPRETER_CONFIG = ConvConfig(64, 128, 64, num_warps=4, num_stages=1)

# C/groups below this takes the flattened (r, s, c) reduction
FLAT_RSC_MAX_CHANNELS = 16


def flat_rsc(channels_per_group: int) -> bool:
    return channels_per_group < FLAT_RSC_MAX_CHANNELS


def configs_for(
    dtype: torch.dtype, channels_per_group: int, index_64: bool, channels_contiguous: bool = False
) -> tuple[ConvConfig, ...]:
    """The tilings verified spill-free (tests/ops/test_triton_aot.py) for
    this kernel variant."""
    if dtype in (torch.float16, torch.bfloat16) and not flat_rsc(channels_per_group) and not index_64:
        return CONFIGS + CHANNELS_LAST_CONFIGS if channels_contiguous else CONFIGS
    return WIDE_CONFIGS


def channels_contiguous(*tensors: Optional[Tensor]) -> bool:
    """Whether every given tensor has unit stride along channels (dim 1):
    what lets the kernel's channel-block loads vectorise (Triton specialises
    a stride equal to 1 into a constant), so CHANNELS_LAST_CONFIGS fit."""
    return all(t is None or t.shape[1] <= 1 or t.stride(1) == 1 for t in tensors)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 convolutions use TF32 tensor cores only where the user allowed
    it for cuDNN convolutions, as torch does."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def output_like(x: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def output_strides(shape, fmt: torch.memory_format) -> tuple:
    """The strides `output_like` gives an output of `shape` in `fmt`."""
    from torch._prims_common import make_channels_last_strides_for, make_contiguous_strides_for

    if fmt == torch.channels_last:
        return tuple(make_channels_last_strides_for(shape))
    return tuple(make_contiguous_strides_for(shape))


def needs_int64(*tensors: Optional[Tensor]) -> bool:
    """Whether an offset the kernel forms can pass int32: offsets stay within
    each tensor's extent plus a tile of masked overhang, so 2^30 leaves room."""
    return any(
        t is not None and sum((d - 1) * st for d, st in zip(t.shape, t.stride())) + 1 > 2**30 for t in tensors
    )


def launch(
    x: Tensor,
    weight: Tensor,
    affine: Affine,
    residual: Optional[Tensor],
    relu: bool,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out: Tensor,
    config: ConvConfig,
    kernel=None,
    index_64: Optional[bool] = None,
    residual_channel_offset: int = 0,
) -> Tensor:
    """Run the kernel with one tiling, writing `out` (N, K, P, Q), with
    `affine` (fold.py) as its epilogue's per-channel scale and shift.

    `kernel` is the launcher to use: the raw JIT function, or its
    `torch.library.wrap_triton` wrapper when called from a custom op.
    `index_64` forces the offset width (tests); by default it is int64 only
    where a tensor is large enough to need it."""
    kernel = conv_bn_act_kernel if kernel is None else kernel
    n, c, h, w = x.shape
    k, c_g, r, s = weight.shape
    _, _, p, q = out.shape
    k_g = k // groups
    m = n * p * q
    if m == 0 or k == 0:
        return out
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(k_g, config.block_n), groups)
    res = residual if residual is not None else out  # never read when HAS_RESIDUAL is off
    kernel[grid](
        x, weight, *affine.args(), res, out,
        n, h, w, p, q, r, s, c_g, k_g,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
        residual_channel_offset, res.shape[1],
        BN=affine.bn,
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
        FLAT_RSC=flat_rsc(c_g),
        INPUT_PRECISION=input_precision(x.dtype),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        INDEX_64=needs_int64(x, weight, out, residual) if index_64 is None else index_64,
        WIDEN_OPERANDS=interpreting() and x.dtype == torch.bfloat16,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
