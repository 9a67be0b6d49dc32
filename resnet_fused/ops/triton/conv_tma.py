"""conv_bn_act for Hopper (sm_90): the implicit-GEMM convolution with every
operand moved by TMA (tensor descriptors), wgmma tiles of 128×128 and
128×256, a persistent tile loop, and the epilogue of `conv.py` (scale/shift,
residual with channel offset, ReLU keeping NaN) stored through TMA.

Long on purpose: the kernel, its launcher (descriptor building, the tiling fit)
and the weight pre-pack share the TmaConfig and the layout of the packed
weights, which change together.

A candidate beside `conv.conv_bn_act_kernel`, never a replacement: it
serves fp16/bf16 channels_last layers whose sizes TMA can describe
(`applies`), and the tuner times it against that kernel and cuDNN on sm_90
only (docs/design.md §6; no GPU has run it yet).

Operands (all host-side `TensorDescriptor`s, built once per launch, so no
device allocator is needed):
* weights: pre-packed once per weight version as K × (R·S·C/groups), read as
  that 2-D matrix where C/groups is a multiple of BLOCK_K (every ResNet layer
  but the stem), else viewed [G, K/G, R·S, C/G] so a box never reads the next
  tap's values (out-of-bounds boxes are zero-filled instead);
* activations, 3×3 and strided 1×1: per-(r, s) boxes of the NHWC tensor,
  viewed [N, H', W', G, C/G]. The M tile is images × output rows × output
  columns (BLOCK_IMG × BLOCK_H × BLOCK_W, fitted to the layer's P and Q), and
  the box of tap (r, s) starts at the tile's first output pixel shifted by
  the tap: TMA's zero fill of out-of-bounds coordinates (negative ones too)
  is the convolution's padding. Stride 2 uses four phase views (H' = every
  second row from row oh, W' likewise from ow): the taps of one phase read
  one view with unit steps, so each phase is a plain TMA loop;
* 1×1 stride-1 convolutions: a GEMM over (N·H·W) × C with 2-D descriptors.

The convolution path computes weights × activationsᵀ (the accumulator is
transposed once per tile, for the epilogue): Triton 3.8 loads an A operand
that has a reshape in front of it into registers, but views a reshaped B
operand in shared memory, so with the activation box (images × rows ×
columns merged into 128 rows) as B and the weights as a plain 2-D box as A,
wgmma reads both from shared memory (aot.py's TTGIR shows no local_load
before warp_group_dot). The 1×1 GEMM needs no reshape at all.

Not served (`applies` is False; today's kernel or cuDNN runs them): fp32
(a 64-channel fp32 box is 256 B, past the 128 B swizzle the wgmma operand
layout wants), channel counts per group not a multiple of 8 (TMA needs
16-byte strides: the C = 3 stem and ResNeXt's 4-channel groups), strides
other than 1 and 2, and NCHW inputs. The stem is left to the existing
kernel rather than padded to C = 8: padding copies the largest activation
of the network each call and grows its 147-long reduction to 392.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from resnet_fused.ops.triton import interpreting
from resnet_fused.ops.triton.conv import needs_int64
from resnet_fused.ops.triton.fold import Affine, channel_affine


@triton.jit
def _taps(pad, dil, STRIDE: tl.constexpr, phase: tl.constexpr, R):
    """(first tap, step, count) of the taps r whose input offset r·dil − pad
    lies in `phase` modulo STRIDE: they read one phase view with unit
    steps."""
    if STRIDE == 1:
        return 0, 1, R
    else:  # STRIDE == 2
        if dil % 2 == 1:
            first = (pad + phase) % 2
            return first, 2, tl.maximum((R - first + 1) // 2, 0)
        else:  # every tap has the parity of pad
            return 0, 1, tl.where(pad % 2 == phase, R, 0)


@triton.jit
def _epilogue(
    acc, kn0, g, pid_m, n0, p0, q0,
    y_d, r_d, a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, res_ptr,
    n_img, p_out, q_out, k_g, sr_n, sr_c, sr_h, sr_w, r_c0, r_cn,
    BN: tl.constexpr, GEMM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RES_TMA: tl.constexpr, RES_INDEX_64: tl.constexpr,
    RELU: tl.constexpr, BLOCK_IMG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, EPI_N: tl.constexpr,
):
    """conv.py's epilogue in fp32 registers on an EPI_N-channel slice of the
    accumulator starting at channel kn0 of group g, stored by TMA."""
    BLOCK_M: tl.constexpr = BLOCK_IMG * BLOCK_H * BLOCK_W
    offs_n = kn0 + tl.arange(0, EPI_N)
    mask_n = offs_n < k_g
    k_out = g * k_g + offs_n
    scale, shift = channel_affine(a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, k_out, mask_n, BN)
    out = acc * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL and RES_TMA:
        # channels outside [r_c0, r_c0 + r_cn) are out of the box: zero
        # filled. A group's box may run into the next group's channels;
        # those columns are past k_g and the store clips them.
        if GEMM:
            res = r_d.load([pid_m * BLOCK_M, g * k_g + kn0 - r_c0])
        else:
            res = r_d.load([n0, p0, q0, g * k_g + kn0 - r_c0]).reshape(BLOCK_M, EPI_N)
        out += res.to(tl.float32)
    elif HAS_RESIDUAL:
        # pointer loads: any residual layout and channel offset; int64
        # only where the residual needs it (64-bit offset tensors of a
        # 128×256 tile spill)
        offs = tl.arange(0, BLOCK_M)
        if GEMM:
            m = pid_m * BLOCK_M + offs
            if RES_INDEX_64:
                m = m.to(tl.int64)
            n_idx = m // (p_out * q_out)
            p_idx = (m // q_out) % p_out
            q_idx = m % q_out
        else:
            n_idx = n0 + offs // (BLOCK_H * BLOCK_W)
            if RES_INDEX_64:
                n_idx = n_idx.to(tl.int64)
            p_idx = p0 + (offs // BLOCK_W) % BLOCK_H
            q_idx = q0 + offs % BLOCK_W
        in_m = (n_idx < n_img) & (p_idx < p_out) & (q_idx < q_out)
        k_res = (k_out.to(tl.int64) if RES_INDEX_64 else k_out) - r_c0
        res_mask = in_m[:, None] & (mask_n & (k_res >= 0) & (k_res < r_cn))[None, :]
        res_off = (n_idx * sr_n + p_idx * sr_h + q_idx * sr_w)[:, None] + (k_res * sr_c)[None, :]
        out += tl.load(res_ptr + res_off, mask=res_mask, other=0.0).to(tl.float32)
    if RELU:
        out = tl.where(out < 0.0, 0.0, out)  # keeps NaN, as torch.relu does
    out = out.to(y_d.dtype)
    # TMA clips the store at every bound: partial tiles need no mask
    if GEMM:
        y_d.store([pid_m * BLOCK_M, kn0], out)
    else:
        y_d.store([n0, p0, q0, g, kn0], out.reshape(BLOCK_IMG, BLOCK_H, BLOCK_W, 1, EPI_N))


@triton.jit
def conv_tma_kernel(
    # activation descriptors: phase (oh, ow) = (0,0), (0,1), (1,0), (1,1);
    # stride 1 and the GEMM use x_d0 alone (the others are the same one)
    x_d0, x_d1, x_d2, x_d3,
    w_d, y_d,
    # the residual as a descriptor (RES_TMA: channels_last, 16-byte aligned
    # channel offset) or through pointers (any layout); the other one unused
    r_d,
    # the per-channel affine (fold.py)
    a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps,
    res_ptr,
    n_img, p_out, q_out, r_taps, s_taps, c_g, k_g, groups,
    pad_h, pad_w, dil_h, dil_w,
    sr_n, sr_c, sr_h, sr_w,
    # the residual holds output channels [r_c0, r_c0 + r_cn) (option-A
    # shortcuts read in place)
    r_c0, r_cn,
    num_programs,
    BN: tl.constexpr,
    STRIDE: tl.constexpr,
    GEMM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RES_TMA: tl.constexpr,
    RES_INDEX_64: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_IMG: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    # the weights as a 2-D [K, R·S·C/G] descriptor: no reshape in front of
    # the MMA; needs C/G a multiple of BLOCK_K so no box crosses into the
    # next tap (rows past a group's K/G are computed, then clipped)
    W_2D: tl.constexpr,
    # as in conv.py: the 3.8 interpreter's bf16 dot is wrong; widen there only
    WIDEN_OPERANDS: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_IMG * BLOCK_H * BLOCK_W
    if GEMM:
        num_m = tl.cdiv(n_img * p_out * q_out, BLOCK_M)
    else:
        tiles_w = tl.cdiv(q_out, BLOCK_W)
        tiles_h = tl.cdiv(p_out, BLOCK_H)
        num_m = tl.cdiv(n_img, BLOCK_IMG) * tiles_h * tiles_w
    num_n = tl.cdiv(k_g, BLOCK_N)
    tiles_per_group = num_m * num_n
    num_tiles = tiles_per_group * groups
    c_blocks = tl.cdiv(c_g, BLOCK_K)

    # persistent: one program per SM walks tiles num_programs apart, so no
    # partial second wave of programs is launched and each program's setup
    # is paid once (whether the epilogue overlaps the next tile's loads is
    # the compiler's; no GPU has measured it)
    for tile in range(tl.program_id(0), num_tiles, num_programs):
        g = tile // tiles_per_group
        t = tile % tiles_per_group
        # grouped ordering: GROUP_M row tiles share each weight tile in L2
        pids_per_group = GROUP_M * num_n
        first_m = (t // pids_per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (t % pids_per_group) % rows
        pid_n = (t % pids_per_group) // rows
        k0 = pid_n * BLOCK_N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n0 = 0  # the conv path's tile origin (unused by the GEMM)
        p0 = 0
        q0 = 0
        if GEMM:
            m0 = pid_m * BLOCK_M
            for i in tl.range(0, c_blocks, warp_specialize=WARP_SPEC):
                a = x_d0.load([m0, i * BLOCK_K])
                b = w_d.load([k0, i * BLOCK_K])
                if WIDEN_OPERANDS:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b.T, acc)
        else:
            q0 = (pid_m % tiles_w) * BLOCK_W
            p0 = ((pid_m // tiles_w) % tiles_h) * BLOCK_H
            n0 = (pid_m // (tiles_w * tiles_h)) * BLOCK_IMG
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for ph in tl.static_range(STRIDE):
                r_first, r_step, r_count = _taps(pad_h, dil_h, STRIDE, ph, r_taps)
                for pw in tl.static_range(STRIDE):
                    s_first, s_step, s_count = _taps(pad_w, dil_w, STRIDE, pw, s_taps)
                    if ph * STRIDE + pw == 0:
                        xd = x_d0
                    elif ph * STRIDE + pw == 1:
                        xd = x_d1
                    elif ph * STRIDE + pw == 2:
                        xd = x_d2
                    else:
                        xd = x_d3
                    for i in tl.range(0, r_count * s_count * c_blocks, warp_specialize=WARP_SPEC):
                        c0 = (i % c_blocks) * BLOCK_K
                        tap = i // c_blocks
                        r = r_first + (tap // s_count) * r_step
                        s = s_first + (tap % s_count) * s_step
                        # exact divisions: r·dil − pad − ph is a multiple of STRIDE
                        h = p0 + (r * dil_h - pad_h - ph) // STRIDE
                        w = q0 + (s * dil_w - pad_w - pw) // STRIDE
                        a = xd.load([n0, h, w, g, c0]).reshape(BLOCK_M, BLOCK_K)
                        if W_2D:
                            b = w_d.load([g * k_g + k0, (r * s_taps + s) * c_g + c0])
                        else:
                            b = w_d.load([g, k0, r * s_taps + s, c0]).reshape(BLOCK_N, BLOCK_K)
                        if WIDEN_OPERANDS:
                            a = a.to(tl.float32)
                            b = b.to(tl.float32)
                        # weights × activationsᵀ: wgmma reads B from shared
                        # memory through the reshaped box, while an A operand
                        # behind a reshape is loaded into registers first
                        acc_t = tl.dot(b, a.T, acc_t)

            acc = acc_t.T  # once per tile, through shared memory
        # the epilogue in N halves where the tile is 256 wide: the residual
        # and output slices of a whole 128×256 tile next to its accumulator
        # spill (aot.py's report)
        if SPLIT_EPILOGUE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc_lo, acc_hi = tl.split(halves)
            _epilogue(acc_lo, k0, g, pid_m, n0, p0, q0, y_d, r_d, a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, res_ptr,
                      n_img, p_out, q_out, k_g, sr_n, sr_c, sr_h, sr_w, r_c0, r_cn,
                      BN, GEMM, HAS_RESIDUAL, RES_TMA, RES_INDEX_64, RELU, BLOCK_IMG, BLOCK_H, BLOCK_W, BLOCK_N // 2)
            _epilogue(acc_hi, k0 + BLOCK_N // 2, g, pid_m, n0, p0, q0, y_d, r_d, a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, res_ptr,
                      n_img, p_out, q_out, k_g, sr_n, sr_c, sr_h, sr_w, r_c0, r_cn,
                      BN, GEMM, HAS_RESIDUAL, RES_TMA, RES_INDEX_64, RELU, BLOCK_IMG, BLOCK_H, BLOCK_W, BLOCK_N // 2)
        else:
            _epilogue(acc, k0, g, pid_m, n0, p0, q0, y_d, r_d, a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, res_ptr,
                      n_img, p_out, q_out, k_g, sr_n, sr_c, sr_h, sr_w, r_c0, r_cn,
                      BN, GEMM, HAS_RESIDUAL, RES_TMA, RES_INDEX_64, RELU, BLOCK_IMG, BLOCK_H, BLOCK_W, BLOCK_N)


@dataclasses.dataclass(frozen=True)
class TmaConfig:
    """One tiling of the Hopper kernel."""

    block_m: int
    block_n: int
    block_k: int = 64
    num_stages: int = 4
    num_warps: int = 8
    warp_specialize: bool = False
    group_m: int = 8

    @property
    def name(self) -> str:
        ws = "ws" if self.warp_specialize else ""
        return f"tma-m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}{ws}"


# The sm_90 candidates (tests/ops/test_triton_tma.py compiles each variant the
# launcher produces: TMA, wgmma, no spills, shared memory within 227 KB).
# 128×256 holds a 128 KB fp32 accumulator: 8 warps (two warpgroups) keep it
# at 128 registers a thread, 3 stages of 48 KB operands plus the epilogue's
# 32 KB half-tile staging buffer stay under the limit.
# No warp-specialised tiling: in Triton 3.8 `tl.range(warp_specialize=True)`
# on sm_90 left this kernel's loop unpartitioned at 8 warps (the same code as
# without it) and failed to compile at 4 warps (NVGPUWarpSpecialization:
# "descriptor block and tensor must have the same number of elements").
# WARP_SPEC stays in the kernel for a Triton that partitions it.
CONFIGS_SM90: tuple[TmaConfig, ...] = (
    TmaConfig(128, 128, 64, num_stages=4, num_warps=8),
    TmaConfig(128, 128, 64, num_stages=5, num_warps=8),
    TmaConfig(128, 256, 64, num_stages=3, num_warps=8),
)


def configs_for(affine: Affine) -> tuple[TmaConfig, ...]:
    """The tilings offered for an epilogue: with the BN folded in the kernel
    (fold.py; what models launch) the 128×256 tiling's split epilogue
    spills on sm_90 (aot.py: 255 registers, 272 B, for the 1×1 GEMM), so
    it is offered only with a given scale and shift."""
    if affine.bn:
        return tuple(cfg for cfg in CONFIGS_SM90 if cfg.block_n <= 128)
    return CONFIGS_SM90


# Under TRITON_INTERPRET=1: the tile shapes are the real ones (they decide the
# box shapes and the partial-tile handling); stages and warps mean nothing there.
INTERPRETER_CONFIG = TmaConfig(128, 128, 64, num_stages=1, num_warps=4)

DTYPES = (torch.float16, torch.bfloat16)
# Output channels per group below this leave a 128-wide N tile over half
# empty (ResNeXt's groups have 4-32): `conv.py`'s narrow-N tiles serve them.
MIN_CHANNELS_PER_GROUP = 64


def is_gemm(weight: Tensor, stride, padding, groups) -> bool:
    """1×1 stride-1 unpadded convolutions are a plain GEMM over (N·H·W) × C."""
    return tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1


def applies(x: Tensor, weight: Tensor, residual: Optional[Tensor], stride, padding, dilation, groups) -> bool:
    """Whether this kernel can run the layer (TMA's rules: 16-byte aligned
    bases and strides, a contiguous innermost dimension). The caller decides
    the device (sm_90 only)."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    return (
        x.dtype in DTYPES
        and weight.dtype == x.dtype
        and (residual is None or residual.dtype == x.dtype)
        and x.dim() == 4
        and x.numel() > 0
        and k > 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.data_ptr() % 16 == 0
        and (c // groups) % 8 == 0
        and (k // groups) % 8 == 0
        and (groups == 1 or k // groups >= MIN_CHANNELS_PER_GROUP)
        and stride[0] == stride[1]
        and stride[0] in (1, 2)
        and h >= stride[0]
        and w >= stride[1]
    )


# ---- the weight pre-pack ----------------------------------------------------------

_PACKED_MAX = 256  # more than any model's convolutions; oldest dropped first
_packed: dict[tuple, tuple] = {}


def packed_weight(weight: Tensor) -> Tensor:
    """The weight as K × (R·S·C/groups), contiguous (a view of a
    channels_last weight; else one copy), cached per weight version: keyed by
    data_ptr and _version like the other weight caches, and valid only while
    the cached entry's weight is this very tensor (a freed weight's address
    can come back for another)."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()), weight.dtype,
           str(weight.device))
    hit = _packed.get(key)
    if hit is not None and hit[0]() is weight:
        return hit[1]
    packed = weight.permute(0, 2, 3, 1).contiguous()
    try:
        ref = weakref.ref(weight)
    except TypeError:  # not weak-referenceable: not cached
        return packed
    if len(_packed) >= _PACKED_MAX:
        _packed.pop(next(iter(_packed)))
    _packed[key] = (ref, packed)
    return packed


# ---- the launch --------------------------------------------------------------------


def _pow2_at_most(v: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(int(v), 1)), cap)


def m_tile(config: TmaConfig, n: int, p: int, q: int) -> tuple[int, int, int]:
    """(images, rows, columns) of the M tile: columns cover Q (a power of two
    at or above it), rows then P, images the rest, so small late-stage
    feature maps (7×7) fill a 128-row tile with several images."""
    bw = _pow2_at_most(q, config.block_m)
    bh = _pow2_at_most(p, config.block_m // bw)
    return config.block_m // (bw * bh), bh, bw


def residual_tma(residual: Tensor, channel_offset: int) -> bool:
    """Whether the residual can be read by TMA: channels_last and dense, a
    16-byte aligned base, channel count and channel offset (the interpreter
    checks box offsets for that alignment; ResNet's option-A offsets, K/4,
    have it)."""
    return (
        residual.is_contiguous(memory_format=torch.channels_last)
        and residual.data_ptr() % 16 == 0
        and residual.shape[1] % 8 == 0
        and channel_offset % 8 == 0
    )


def _descriptor(base: Tensor, shape, strides, block, offset: int = 0):
    """A TMA descriptor of `base` seen as `shape`/`strides` (elements, from
    `offset`), built as `TensorDescriptor.from_tensor` of that view: the one
    form torch's wrap_triton rebuilds when it traces a kernel (it records a
    descriptor argument as its tensor and block shape only)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    view = base.as_strided(tuple(shape), tuple(strides), base.storage_offset() + offset)
    return TensorDescriptor.from_tensor(view, list(block))


def _phase_views(x: Tensor, groups: int, stride: int, block) -> list:
    """The activation descriptors: per phase (oh, ow), every stride-th row
    from row oh and column from ow, as [N, H', W', G, C/G]."""
    n, c, h, w = x.shape
    sn, _, sh, sw = x.stride()
    descs = []
    for oh in range(stride):
        for ow in range(stride):
            shape = (n, (h - oh + stride - 1) // stride, (w - ow + stride - 1) // stride, groups, c // groups)
            descs.append(_descriptor(x, shape, (sn, sh * stride, sw * stride, c // groups, 1), block,
                                     oh * sh + ow * sw))
    return descs + [descs[0]] * (4 - len(descs))


def num_programs(device: torch.device, tiles: int, sms: Optional[int] = None) -> int:
    """One program per SM (at most one per tile); under the interpreter two,
    so the persistent loop runs several tiles per program in tests."""
    if sms is None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    elif sms is None:
        sms = 2
    return max(1, min(sms, tiles))


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
    config: TmaConfig,
    kernel=None,
    residual_channel_offset: int = 0,
    programs: Optional[int] = None,
    sms: Optional[int] = None,
    res_index_64: Optional[bool] = None,
) -> Tensor:
    """Run the kernel with one tiling, writing `out` (N, K, P, Q),
    channels_last. `kernel`: the JIT function or its wrap_triton wrapper (or
    aot.py's recorder); `programs`: the persistent grid (default: one program
    per SM, at most one per tile); `sms`: the SM count that default assumes
    (default: x's device's; aot.py passes an H100's on meta tensors);
    `res_index_64` forces the pointer-read residual's offset width (tests)."""
    kernel = conv_tma_kernel if kernel is None else kernel
    n, c, h, w = x.shape
    k, c_g, r, s = weight.shape
    _, _, p, q = out.shape
    k_g = k // groups
    if n * p * q == 0 or k == 0:
        return out
    if not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("conv_tma.launch: `out` must be channels_last (the TMA store writes NHWC boxes)")
    wp = packed_weight(weight)
    bk, bn = config.block_k, config.block_n
    split = bn > 128
    en = bn // 2 if split else bn  # the epilogue's slice: the output and residual boxes' width
    gemm = is_gemm(weight, stride, padding, groups)
    w_2d = gemm or c_g % bk == 0
    m = n * p * q
    if gemm:
        bi, bh, bw = 1, 1, config.block_m
        xd = _descriptor(x, (n * h * w, c), (c, 1), (config.block_m, bk))
        xds = [xd] * 4
        wd = _descriptor(wp, (k, c), (c, 1), (bn, bk))
        yd = _descriptor(out, (m, k), (k, 1), (config.block_m, en))
        tiles_m = triton.cdiv(m, config.block_m)
    else:
        bi, bh, bw = m_tile(config, n, p, q)
        xds = _phase_views(x, groups, stride[0], (bi, bh, bw, 1, bk))
        if w_2d:
            wd = _descriptor(wp, (k, r * s * c_g), (r * s * c_g, 1), (bn, bk))
        else:
            wd = _descriptor(wp, (groups, k_g, r * s, c_g), (k_g * r * s * c_g, r * s * c_g, c_g, 1), (1, bn, 1, bk))
        yd = _descriptor(out, (n, p, q, groups, k_g), (p * q * k, q * k, k, k_g, 1), (bi, bh, bw, 1, en))
        tiles_m = triton.cdiv(n, bi) * triton.cdiv(p, bh) * triton.cdiv(q, bw)
    tiles = tiles_m * triton.cdiv(k_g, bn) * groups
    grid_size = programs if programs is not None else num_programs(x.device, tiles, sms)
    res = residual if residual is not None else out  # never read when HAS_RESIDUAL is off
    res_tma = residual is not None and residual_tma(residual, residual_channel_offset)
    if res_tma:
        r_cn = residual.shape[1]
        rd = (_descriptor(residual, (m, r_cn), (r_cn, 1), (config.block_m, en)) if gemm else
              _descriptor(residual, (n, p, q, r_cn), (p * q * r_cn, q * r_cn, r_cn, 1), (bi, bh, bw, en)))
    else:
        rd = yd
    kernel[(grid_size,)](
        *xds, wd, yd, rd, *affine.args(), res,
        n, p, q, r, s, c_g, k_g, groups,
        padding[0], padding[1], dilation[0], dilation[1],
        res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        residual_channel_offset, res.shape[1],
        grid_size,
        BN=affine.bn,
        STRIDE=1 if gemm else stride[0],
        GEMM=gemm,
        HAS_RESIDUAL=residual is not None,
        RES_TMA=res_tma,
        RES_INDEX_64=(residual is not None and not res_tma
                      and (needs_int64(residual) if res_index_64 is None else res_index_64)),
        RELU=relu,
        BLOCK_IMG=bi,
        BLOCK_H=bh,
        BLOCK_W=bw,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=config.group_m,
        WARP_SPEC=config.warp_specialize,
        SPLIT_EPILOGUE=split,
        W_2D=w_2d,
        WIDEN_OPERANDS=interpreting() and x.dtype == torch.bfloat16,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def output_like(x: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def run(config: TmaConfig, x, weight, affine, residual, relu, stride, padding, dilation, groups,
        residual_channel_offset: int = 0, kernel=None) -> Tensor:
    """A tuning candidate's launcher (library.triton_conv_bn_act's
    `implicit_gemm(cfg)` shape): allocates the channels_last output (the op's
    layout, as `applies` requires a channels_last x) and runs one tiling."""
    from resnet_fused.ops import conv_out_shape

    out = output_like(x, conv_out_shape(x, weight, stride, padding, dilation))
    return launch(x, weight, affine, residual, relu, tuple(stride), tuple(padding), tuple(dilation), groups,
                  out, config, kernel, residual_channel_offset)


def is_sm90(device: torch.device) -> bool:
    """The candidates join the tuning on Hopper (compute capability 9.x)
    only: sm_100's TMA and MMA differ, and sm_80 has no TMA."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def candidates(x, weight, affine, residual, relu, stride, padding, dilation, groups,
               residual_channel_offset: int = 0, kernel=None) -> dict:
    """TmaConfig -> zero-argument launcher returning its output, for the
    tuner (library.triton_conv_bn_act): every sm_90 tiling where the device
    is sm_90 and the kernel applies, else none."""
    if not is_sm90(x.device) or not applies(x, weight, residual, stride, padding, dilation, groups):
        return {}
    return {
        cfg: (lambda cfg=cfg: run(cfg, x, weight, affine, residual, relu, stride, padding, dilation, groups,
                                  residual_channel_offset, kernel))
        for cfg in configs_for(affine)
    }
