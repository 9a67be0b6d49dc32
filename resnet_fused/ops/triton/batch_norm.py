"""Train-mode batch_norm_act as Triton kernels: batch statistics, normalise,
residual add and ReLU forward; dγ, dβ, dx and d(residual) backward.

Long on purpose: the forward and backward kernels share one tiling and index
formulas (`_tile`, `_offsets`, `_residual_offsets`), which must change
together.

x is viewed as positions × channels, a position being (n, l) with
l = h·W + w; every kernel works on tiles of BLOCK_R positions × BLOCK_C
channels, and the tiling follows the layout's contiguous axis:

* NCHW (l contiguous): a tile holds positions [l0, l0 + BLOCK_R) of one
  image n (BLOCK_R = min(BLOCK_R, L rounded up to a power of two), half
  that where VEC = 1), tile
  t = n·cdiv(L, BLOCK_R) + l0/BLOCK_R, offsets n·s_n + c·s_c + l with n a
  scalar. The compiler sees l contiguous and, where L and the n, c strides
  are multiples of VEC (the host's power of two ≤ 16, `_tiling`, claimed
  through `_multiple`) and the pointers 16-byte aligned (Triton's own
  launch-time check), issues vector accesses: 16 bytes per access for
  L = 56², 28², 112² in any dtype and 14² in fp32, 8 bytes for 14² in
  bf16/fp16 (a plane of 196 two-byte elements starts 8-byte aligned),
  scalar but coalesced for 7² (49 is odd).
* channels_last (C contiguous), and NCHW with L = 1 (the same memory): a
  tile holds rows [t·BLOCK_R, (t + 1)·BLOCK_R) of the N·L rows, which may
  cross images (n, l from one division per element); vectors along C.

Reductions are two-stage with a fixed shape-only partition and a fixed
merge order: program (channel block, chunk) summarises the tiles
[chunk·k, (chunk + 1)·k) in tile order (k from `_chunking`: N·L, C and the
tile sizes only), each tile's (count, mean, M2) merged into the running one
by Chan's formula; the chunks are then merged in chunk order. No atomics, so
results are bitwise reproducible run to run (what
`torch.use_deterministic_algorithms(True)` asks for) at no cost. In NCHW a
tile never spans two images, so the partition differs from channels_last's
(the same rounding class, other bits).

Passes over x (the activations): forward 2 reads + 1 write (statistics,
then normalise), backward 2 reads of (grad_out, x, out) + 1 or 2 writes
(dx, d(residual)) — the fewest the math allows without keeping a tile of
every channel on chip (bytes per element: docs/performance.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from resnet_fused.ops.common import memory_format

from resnet_fused.ops.triton import interpreting
from resnet_fused.ops.triton.fold import Affine, channel_affine


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of (count, mean, M2) summaries."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    mean = mean_a + delta * frac
    m2 = m2_a + m2_b + delta * delta * n_a * frac
    return n, mean, m2


@triton.jit
def _multiple(v, VEC: tl.constexpr):
    """v, which the host checked is a multiple of VEC, as the compiler can
    see it is one. Triton marks an int argument divisible by 16 by itself;
    this carries the smaller powers of two (196 = 14·14 is 4·49), which
    `tl.multiple_of` does not do for a scalar argument (it leaves no trace
    in Triton 3.8: tried). Two instructions per program."""
    if VEC > 1:
        v = (v // VEC) * VEC
    return v


@triton.jit
def _tile(t, N, L, ROWS, VEC: tl.constexpr, BLOCK_R: tl.constexpr, PLANES: tl.constexpr, ROWS_64: tl.constexpr):
    """Tile t's BLOCK_R positions as (n, l, mask), l = h·W + w.

    PLANES (NCHW): positions [l0, l0 + BLOCK_R) of one image n, tile
    t = n·cdiv(L, BLOCK_R) + l0/BLOCK_R; n is a scalar, so offsets
    n·s_n + l (s_l = 1) are contiguous and, with L and the strides multiples
    of VEC, VEC-aligned: the compiler can see both and issues vector loads.
    Otherwise (channels_last, where the channels are the contiguous axis,
    and L = 1) rows t·BLOCK_R + [0, BLOCK_R) of the N·L rows, which may
    cross images: n and l are vectors, from one division per element.

    Indices are 32-bit unless one can pass int32 (ROWS_64, `_tiling`: rows,
    tiles and positions stay below twice the row count, channel offsets
    below C·s_c); the position offsets formed from them are 64-bit either
    way. What the narrow index saves is a 64-bit division, a subroutine
    call that spills on sm_80."""
    if ROWS_64:
        t = t.to(tl.int64)
    if PLANES:
        tiles_per_plane = tl.cdiv(L, BLOCK_R)
        n = t // tiles_per_plane
        l = (t - n * tiles_per_plane) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (l < _multiple(L, VEC)) & (n < N)
    else:
        rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
        n = rows // L
        l = rows - n * L
        mask = rows < ROWS
    return n, l, mask


@triton.jit
def _channel_offsets(offs_c, s_c, VEC: tl.constexpr, ROWS_64: tl.constexpr):
    """c·s_c: 32-bit unless it can pass int32 (the host's bound covers
    C·s_c of every tensor: `_tiling`); 64-bit would hold one more register
    per channel a thread holds, for every tensor."""
    if ROWS_64:
        return offs_c.to(tl.int64) * _multiple(s_c, VEC)
    return offs_c * _multiple(s_c, VEC)


@triton.jit
def _offsets(n, l, offs_c, s_n, s_c, s_l, VEC: tl.constexpr, ROWS_64: tl.constexpr):
    """Offsets of the tile (positions × channels) of a tensor whose (h, w)
    strides are (W·s_l, s_l) (format-contiguous x, out, dx; grad_out)."""
    pos = n.to(tl.int64) * _multiple(s_n, VEC) + l.to(tl.int64) * s_l
    return pos[:, None] + _channel_offsets(offs_c, s_c, VEC, ROWS_64)[None, :]


@triton.jit
def _residual_offsets(
    n, l, offs_c, W, r_n, r_c, r_h, r_w, R_C0, R_CN, VEC: tl.constexpr, RES_PLANE: tl.constexpr, ROWS_64: tl.constexpr,
):
    """Offsets and channel mask of a residual read through its 4 strides (so
    a strided view such as x[:, :, ::2, ::2] is read in place), holding
    output channels [R_C0, R_C0 + R_CN); the others get no residual (the
    zero-padded option-A shortcut, never materialised). RES_PLANE: its
    (h, w) strides are (W·r_w, r_w), so position l is at l·r_w (no
    division; contiguous where r_w = 1)."""
    if RES_PLANE:
        pos = n.to(tl.int64) * _multiple(r_n, VEC) + l.to(tl.int64) * r_w
    else:
        h = l // W
        pos = n.to(tl.int64) * _multiple(r_n, VEC) + h.to(tl.int64) * r_h + (l - h * W).to(tl.int64) * r_w
    rc = offs_c - R_C0
    off = pos[:, None] + _channel_offsets(rc, r_c, VEC, ROWS_64)[None, :]
    return off, (rc >= 0) & (rc < R_CN)


@triton.jit
def _bn_stats_partial_kernel(
    x_ptr, part_ptr,
    C, N, L, ROWS, s_n, s_c, s_l, TILES_PER_CHUNK,
    ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PLANES: tl.constexpr, ROWS_64: tl.constexpr,
):
    pid_c = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    count = tl.zeros((BLOCK_C,), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    # Statistics of x − pivot, pivot = the channel's first element: chunk
    # means then stay near 0, where their rounding (which enters every
    # merge) is small, even for data far from 0.
    pivot = tl.load(x_ptr + offs_c.to(tl.int64) * s_c, mask=mask_c, other=0.0).to(ACC)
    t0 = chunk.to(tl.int64) * TILES_PER_CHUNK if ROWS_64 else chunk * TILES_PER_CHUNK
    for i in range(0, TILES_PER_CHUNK):
        n, l, mask_r = _tile(t0 + i, N, L, ROWS, VEC, BLOCK_R, PLANES, ROWS_64)
        mask = mask_r[:, None] & mask_c[None, :]
        off = _offsets(n, l, offs_c, s_n, s_c, s_l, VEC, ROWS_64)
        x = tl.where(mask, tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC) - pivot[None, :], 0.0)
        n_b = tl.sum(mask_r.to(ACC), axis=0)
        mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_b + tl.zeros_like(count), mean_b, m2_b)
    base = chunk.to(tl.int64) * 3 * C
    tl.store(part_ptr + base + offs_c, count, mask=mask_c)
    tl.store(part_ptr + base + C + offs_c, mean, mask=mask_c)
    tl.store(part_ptr + base + 2 * C + offs_c, m2, mask=mask_c)


@triton.jit
def _bn_stats_final_kernel(
    x_ptr, part_ptr, mean_ptr, invstd_ptr, var_ptr, C, s_c, CHUNKS, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    count = tl.zeros((BLOCK_C,), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    for chunk in range(0, CHUNKS):
        base = chunk * 3 * C
        n_b = tl.load(part_ptr + base + offs_c, mask=mask_c, other=0.0)
        mean_b = tl.load(part_ptr + base + C + offs_c, mask=mask_c, other=0.0)
        m2_b = tl.load(part_ptr + base + 2 * C + offs_c, mask=mask_c, other=0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_b, mean_b, m2_b)
    var = m2 / tl.maximum(count, 1.0)
    pivot = tl.load(x_ptr + offs_c.to(tl.int64) * s_c, mask=mask_c, other=0.0).to(ACC)
    tl.store(mean_ptr + offs_c, pivot + mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var + eps)
    else:  # correctly rounded, not the fast approximations
        invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(invstd_ptr + offs_c, invstd, mask=mask_c)


@triton.jit
def _bn_act_apply_kernel(
    x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
    C, N, L, W, ROWS, s_n, s_c, s_l, r_n, r_c, r_h, r_w, R_C0, R_CN,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PLANES: tl.constexpr, RES_PLANE: tl.constexpr, ROWS_64: tl.constexpr,
):
    n, l, mask_r = _tile(tl.program_id(0), N, L, ROWS, VEC, BLOCK_R, PLANES, ROWS_64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_r[:, None] & mask_c[None, :]
    scale = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    off = _offsets(n, l, offs_c, s_n, s_c, s_l, VEC, ROWS_64)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    if HAS_RESIDUAL:
        r_off, r_mask = _residual_offsets(n, l, offs_c, W, r_n, r_c, r_h, r_w, R_C0, R_CN, VEC, RES_PLANE, ROWS_64)
        y += tl.load(res_ptr + r_off, mask=mask & r_mask[None, :], other=0.0).to(ACC)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_act_kernel(
    y_ptr, a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, res_ptr,
    C, N, L, W, ROWS, s_n, s_c, s_l, r_n, r_c, r_h, r_w, R_C0, R_CN,
    BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PLANES: tl.constexpr, RES_PLANE: tl.constexpr, ROWS_64: tl.constexpr,
):
    """In place: y = act(y·scale[c] + shift[c] + residual) with the
    per-channel affine of fold.py, the epilogue behind a cuDNN convolution
    (conv.py's epilogue, on a stored output)."""
    n, l, mask_r = _tile(tl.program_id(0), N, L, ROWS, VEC, BLOCK_R, PLANES, ROWS_64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_r[:, None] & mask_c[None, :]
    scale, shift = channel_affine(a_ptr, b_ptr, gamma_ptr, beta_ptr, bias_ptr, eps, offs_c, mask_c, BN)
    off = _offsets(n, l, offs_c, s_n, s_c, s_l, VEC, ROWS_64)
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        r_off, r_mask = _residual_offsets(n, l, offs_c, W, r_n, r_c, r_h, r_w, R_C0, R_CN, VEC, RES_PLANE, ROWS_64)
        y += tl.load(res_ptr + r_off, mask=mask & r_mask[None, :], other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_bwd_partial_kernel(
    grad_ptr, x_ptr, out_ptr, mean_ptr, part_ptr,
    C, N, L, ROWS, s_n, s_c, s_l, g_n, g_c, g_l, TILES_PER_CHUNK,
    RELU: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PLANES: tl.constexpr, ROWS_64: tl.constexpr,
):
    pid_c = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    sum_g = tl.zeros((BLOCK_C,), ACC)
    sum_gx = tl.zeros((BLOCK_C,), ACC)
    t0 = chunk.to(tl.int64) * TILES_PER_CHUNK if ROWS_64 else chunk * TILES_PER_CHUNK
    for i in range(0, TILES_PER_CHUNK):
        n, l, mask_r = _tile(t0 + i, N, L, ROWS, VEC, BLOCK_R, PLANES, ROWS_64)
        mask = mask_r[:, None] & mask_c[None, :]
        off = _offsets(n, l, offs_c, s_n, s_c, s_l, VEC, ROWS_64)
        g_off = _offsets(n, l, offs_c, g_n, g_c, g_l, VEC, ROWS_64)
        g = tl.load(grad_ptr + g_off, mask=mask, other=0.0).to(ACC)
        if RELU:
            out = tl.load(out_ptr + off, mask=mask, other=0.0)
            g = tl.where(out <= 0, 0.0, g)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * tl.where(mask, x - mean[None, :], 0.0), axis=0)
    base = chunk.to(tl.int64) * 2 * C
    tl.store(part_ptr + base + offs_c, sum_g, mask=mask_c)
    tl.store(part_ptr + base + C + offs_c, sum_gx, mask=mask_c)


@triton.jit
def _bn_act_bwd_final_kernel(
    part_ptr, invstd_ptr, sum_g_ptr, grad_w_ptr, C, CHUNKS,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    sum_g = tl.zeros((BLOCK_C,), ACC)
    sum_gx = tl.zeros((BLOCK_C,), ACC)
    for chunk in range(0, CHUNKS):
        base = chunk * 2 * C
        sum_g += tl.load(part_ptr + base + offs_c, mask=mask_c, other=0.0)
        sum_gx += tl.load(part_ptr + base + C + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    tl.store(sum_g_ptr + offs_c, sum_g, mask=mask_c)  # = dβ
    tl.store(grad_w_ptr + offs_c, sum_gx * invstd, mask=mask_c)  # = dγ


@triton.jit
def _bn_act_bwd_apply_kernel(
    grad_ptr, x_ptr, out_ptr, mean_ptr, invstd_ptr, w_ptr, sum_g_ptr, grad_w_ptr, dx_ptr, dres_ptr,
    C, N, L, W, ROWS, s_n, s_c, s_l, g_n, g_c, g_l, d_n, d_c, d_h, d_w, R_C0, R_CN,
    HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr, RESIDUAL_GRAD: tl.constexpr,
    ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PLANES: tl.constexpr, RES_PLANE: tl.constexpr, ROWS_64: tl.constexpr,
):
    n, l, mask_r = _tile(tl.program_id(0), N, L, ROWS, VEC, BLOCK_R, PLANES, ROWS_64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_r[:, None] & mask_c[None, :]
    inv_count = tl.full((), 1.0, ACC) / ROWS  # in ACC: a literal 1.0 / ROWS is fp32 even for float64
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    gamma_invstd = invstd
    if HAS_WEIGHT:
        gamma_invstd = invstd * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    mean_g = tl.load(sum_g_ptr + offs_c, mask=mask_c, other=0.0) * inv_count
    # x̂ coefficient: invstd · dγ / count
    coef = tl.load(grad_w_ptr + offs_c, mask=mask_c, other=0.0) * invstd * inv_count
    off = _offsets(n, l, offs_c, s_n, s_c, s_l, VEC, ROWS_64)
    g_off = _offsets(n, l, offs_c, g_n, g_c, g_l, VEC, ROWS_64)
    g = tl.load(grad_ptr + g_off, mask=mask, other=0.0).to(ACC)
    if RELU:
        out = tl.load(out_ptr + off, mask=mask, other=0.0)
        g = tl.where(out <= 0, 0.0, g)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    dx = (g - mean_g[None, :] - (x - mean[None, :]) * coef[None, :]) * gamma_invstd[None, :]
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if RESIDUAL_GRAD:
        d_off, d_mask = _residual_offsets(n, l, offs_c, W, d_n, d_c, d_h, d_w, R_C0, R_CN, VEC, RES_PLANE, ROWS_64)
        tl.store(dres_ptr + d_off, g.to(dres_ptr.dtype.element_ty), mask=mask & d_mask[None, :])


# Tiles. The elementwise kernels read tiles of BLOCK_R positions × BLOCK_C
# channels (in NCHW, at most BLOCK_R positions of one image: `_tiling`,
# `_tile`); the reductions walk TILES_PER_CHUNK tiles per
# program. Enough reduction programs to fill a large GPU (132 SMs × a few
# waves) when C is small; the partition depends on the shape only, never on
# the device. Under the interpreter each program is Python, so there it is
# fewer, larger tiles (which also exercises the masking of partial tiles
# differently).
if interpreting():
    BLOCK_R, BLOCK_C, TARGET_PROGRAMS = 256, 64, 16
else:
    BLOCK_R, BLOCK_C, TARGET_PROGRAMS = 64, 32, 1024
FINAL_BLOCK_C = 128


def _rows_64(rows: int) -> bool:
    """Whether a row index a kernel forms can pass int32: they stay below
    rows plus one chunk (at most rows rounded up to a tile). Tile indices
    and in-plane positions stay below the same bound."""
    return 2 * rows + BLOCK_R >= 2**31


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """How the kernels walk x's N·H·W positions (see `_tile`)."""

    planes: bool  # NCHW: tiles of positions within one image's planes
    block_r: int  # positions per tile
    tiles: int
    vec: int  # a power of two ≤ 16 dividing L and the n, c strides passed
    rows_64: bool

    def kwargs(self) -> dict:
        return dict(VEC=self.vec, BLOCK_R=self.block_r, PLANES=self.planes, ROWS_64=self.rows_64)


def _tiling(x: Tensor, *others: Tensor) -> _Tiling:
    """The tiling of x (format-contiguous); `others`: every other tensor the
    kernels address through their own strides (their n and c strides are
    claimed multiples of VEC to the compiler, and c·s_c of each must fit
    the index width). NCHW with L = 1 is channels_last in memory and takes
    the row tiling, whose tiles are contiguous along C there."""
    n, c, h, w = x.shape
    l, rows = h * w, n * h * w
    strides = [s for t in (x, *others) for s in (t.stride(0), t.stride(1))]
    rows_64 = _rows_64(max(rows, c * max(t.stride(1) for t in (x, *others))))
    if memory_format(x) == torch.contiguous_format and l > 1:
        vec = math.gcd(16, l, *strides)
        # Scalar accesses hold an address per element: at 16 elements per
        # thread (BLOCK_R × BLOCK_C over 4 warps) the 7² variants took
        # 127–168 registers, at 8 64–96 (the vector ones 29–72 at 16).
        block = min(BLOCK_R if vec > 1 else BLOCK_R // 2, triton.next_power_of_2(l))
        return _Tiling(True, block, n * triton.cdiv(l, block), vec, rows_64)
    return _Tiling(False, BLOCK_R, triton.cdiv(rows, BLOCK_R), 1, rows_64)


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    """t's (n, c, h, w) strides, w's replaced by h's where W = 1 (l = h
    there). A size-1 dim's stride is whatever torch left: x.transpose(2, 3)
    of an N×C×1×W map is contiguous, with stride(3) = W, not 1."""
    s_n, s_c, s_h, s_w = t.stride()
    return s_n, s_c, s_h, s_h if t.shape[3] == 1 else s_w


def _res_plane(t: Tensor) -> bool:
    """Whether t's (h, w) strides are (W·s_w, s_w) (`_strides`): position
    l = h·W + w at l·s_w."""
    _, _, s_h, s_w = _strides(t)
    return t.shape[2] == 1 or s_h == t.shape[3] * s_w


def _acc(x: Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def _view(t: Tensor) -> tuple[int, int, int]:
    """(stride of n, stride of c, stride of l) for a format-contiguous 4-D
    tensor (or any whose (h, w) strides are (W·s_l, s_l): `_res_plane`)."""
    s_n, s_c, _, s_l = _strides(t)
    return s_n, s_c, s_l


def _chunking(tiles: int, channels: int) -> tuple[int, int]:
    """(chunks, tiles per chunk) of the reductions: consecutive tiles, the
    last chunk shorter; shape-only."""
    c_blocks = triton.cdiv(channels, BLOCK_C)
    chunks = max(1, min(tiles, TARGET_PROGRAMS // c_blocks))
    per_chunk = triton.cdiv(tiles, chunks)
    return triton.cdiv(tiles, per_chunk), per_chunk


def _empty_batch_statistics(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, var) of no rows: what the kernels' merge gives for a
    count of 0 (mean 0, variance 0), with no kernel launched (there is no
    element to read, not even the pivot). F.batch_norm's output on an empty
    batch is empty and its running statistics stay as they are: callers
    must not fold these into them (see library._keep_running_stats_if_empty)."""
    _, acc = _acc(x)
    c = x.shape[1]
    var = x.new_zeros((c,), dtype=acc)
    return x.new_zeros((c,), dtype=acc), torch.full_like(var, eps).rsqrt(), var


def forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
    kernels: dict,
    residual_channel_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, invstd, biased var). `kernels` maps kernel names to the
    launchers to use (raw or wrap_triton-wrapped). The residual (any strides)
    may hold fewer channels than x: output channels [offset, offset + its
    channels) get it, the others nothing."""
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    rows, l = n * h * w, h * w
    acc_tl, acc = _acc(x)
    out = torch.empty_like(x, memory_format=fmt)
    mean = x.new_empty((c,), dtype=acc)
    invstd = x.new_empty((c,), dtype=acc)
    var = x.new_empty((c,), dtype=acc)
    if rows == 0 or c == 0:  # F.batch_norm: an empty output with x's strides
        return torch.empty_like(x), *_empty_batch_statistics(x, eps)
    res = residual if residual is not None else x
    s_n, s_c, s_l = _view(x)
    tiling = _tiling(x, res)
    chunks, tiles_per_chunk = _chunking(tiling.tiles, c)
    part = x.new_empty((chunks, 3, c), dtype=acc)
    kernels["stats_partial"][(triton.cdiv(c, BLOCK_C), chunks)](
        x, part, c, n, l, rows, s_n, s_c, s_l, tiles_per_chunk,
        ACC=acc_tl, BLOCK_C=BLOCK_C, **tiling.kwargs(),
    )
    kernels["stats_final"][(triton.cdiv(c, FINAL_BLOCK_C),)](
        x, part, mean, invstd, var, c, s_c, chunks, eps, ACC=acc_tl, BLOCK_C=FINAL_BLOCK_C
    )
    kernels["apply"][(tiling.tiles, triton.cdiv(c, BLOCK_C))](
        x, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean, res, out,
        c, n, l, w, rows, s_n, s_c, s_l, *_strides(res), residual_channel_offset, res.shape[1],
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RELU=relu, ACC=acc_tl, BLOCK_C=BLOCK_C, RES_PLANE=_res_plane(res), **tiling.kwargs(),
    )
    return out, mean, invstd, var


def backward(
    grad_out: Tensor,
    x: Tensor,
    out: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
    residual_grad: bool,
    kernels: dict,
    residual_channels: int = -1,
    residual_channel_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_residual or an empty tensor).
    grad_residual has `residual_channels` channels (-1: all of x's), the
    gradient of output channels [offset, offset + residual_channels)."""
    fmt = memory_format(x)
    n, c, h, w = x.shape
    rows, l = n * h * w, h * w
    acc_tl, acc = _acc(x)
    if not _res_plane(grad_out) or grad_out.stride(1) == 0:
        grad_out = grad_out.contiguous(memory_format=fmt)
    c_res = c if residual_channels < 0 else residual_channels
    if rows == 0 or c == 0:  # F.batch_norm: dγ = dβ = 0 (sums over no rows)
        grad_res = torch.empty((n, c_res, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        return (torch.empty_like(x), x.new_zeros((c,), dtype=acc), x.new_zeros((c,), dtype=acc),
                grad_res if residual_grad else x.new_empty((0,)))
    g_n, g_c, g_l = _view(grad_out)
    s_n, s_c, s_l = _view(x)
    grad_x = torch.empty_like(x, memory_format=fmt)
    grad_res = torch.empty((n, c_res, h, w), dtype=x.dtype, device=x.device, memory_format=fmt) if residual_grad else x.new_empty((0,))
    dres = grad_res if residual_grad else grad_x
    # one tiling (and VEC) for both passes: every tensor either one addresses
    tiling = _tiling(x, grad_out, dres)
    chunks, tiles_per_chunk = _chunking(tiling.tiles, c)
    part = x.new_empty((chunks, 2, c), dtype=acc)
    kernels["bwd_partial"][(triton.cdiv(c, BLOCK_C), chunks)](
        grad_out, x, out, mean, part, c, n, l, rows, s_n, s_c, s_l, g_n, g_c, g_l, tiles_per_chunk,
        RELU=relu, ACC=acc_tl, BLOCK_C=BLOCK_C, **tiling.kwargs(),
    )
    grad_bias = x.new_empty((c,), dtype=acc)
    grad_weight = x.new_empty((c,), dtype=acc)
    kernels["bwd_final"][(triton.cdiv(c, FINAL_BLOCK_C),)](
        part, invstd, grad_bias, grad_weight, c, chunks, ACC=acc_tl, BLOCK_C=FINAL_BLOCK_C
    )
    kernels["bwd_apply"][(tiling.tiles, triton.cdiv(c, BLOCK_C))](
        grad_out, x, out, mean, invstd, weight if weight is not None else mean, grad_bias, grad_weight,
        grad_x, dres,
        c, n, l, w, rows, s_n, s_c, s_l, g_n, g_c, g_l, *_strides(dres), residual_channel_offset, dres.shape[1],
        HAS_WEIGHT=weight is not None, RELU=relu, RESIDUAL_GRAD=residual_grad,
        ACC=acc_tl, BLOCK_C=BLOCK_C, RES_PLANE=_res_plane(dres), **tiling.kwargs(),
    )
    return grad_x, grad_weight, grad_bias, grad_res


KERNELS = {
    "stats_partial": _bn_stats_partial_kernel,
    "stats_final": _bn_stats_final_kernel,
    "apply": _bn_act_apply_kernel,
    "affine_act": _affine_act_kernel,
    "bwd_partial": _bn_act_bwd_partial_kernel,
    "bwd_final": _bn_act_bwd_final_kernel,
    "bwd_apply": _bn_act_bwd_apply_kernel,
}


class _NoLaunch:
    """Stands in for a kernel launcher where nothing may run (fake tensors
    under the interpreter): shapes and dtypes still come from the same code."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


NO_LAUNCH = {name: _NoLaunch() for name in KERNELS}


def affine_act_(
    y: Tensor, affine: Affine, residual: Optional[Tensor], relu: bool, kernels: dict,
    residual_channel_offset: int = 0,
) -> Tensor:
    """In place: y = act(y·scale[c] + shift[c] + residual), `affine` (fold.py)
    giving scale and shift: the epilogue behind a cuDNN convolution, one
    launch, no scratch tensor."""
    fmt = memory_format(y)
    assert y.is_contiguous(memory_format=fmt)
    if y.numel() == 0:
        return y
    n, c, h, w = y.shape
    rows, l = n * h * w, h * w
    s_n, s_c, s_l = _view(y)
    res = residual if residual is not None else y
    tiling = _tiling(y, res)
    kernels["affine_act"][(tiling.tiles, triton.cdiv(c, BLOCK_C))](
        y, *affine.args(), res,
        c, n, l, w, rows, s_n, s_c, s_l, *_strides(res), residual_channel_offset, res.shape[1],
        BN=affine.bn, HAS_RESIDUAL=residual is not None, RELU=relu,
        BLOCK_C=BLOCK_C, RES_PLANE=_res_plane(res), **tiling.kwargs(),
    )
    return y
