"""BatchNorm(batch statistics of a process group) [+ residual] → ReLU for
training across processes (SyncBatchNorm), on every backend's train kernels.

What torch's SyncBatchNorm computes (torch.nn.modules._functions.SyncBatchNorm),
with the fused epilogue:
* forward: each rank's per-channel (count, mean, M2) → all_gather → the
  group's mean and biased variance by Chan et al.'s merge (weights n_i, every
  term non-negative: no cancellation) → running statistics updated with the
  unbiased variance over the group's count → normalise, + residual, ReLU;
* backward: the two per-channel sums Σdz and Σdz·x̂ all-reduced over the
  group, then dx over the group's count; grad_weight and grad_bias stay the
  rank's own (DDP reduces parameter gradients), as in torch.

The kernels are the selected backend's `batch_norm_act_parts`
(docs/design.md §4, ops/recompute.py), which normalise with the rank's own
statistics and take the mean and invstd to differentiate at. Two exact
identities make them compute the group's results:
* forward: with the rank's statistics (m_l, s_l = 1/sqrt(v_l + eps)) and the
  group's (m_g, s_g), `γ·s_g·(x − m_g) + β = (x − m_l)·s_l·w' + b'` for
  `w' = γ·s_g/s_l`, `b' = β + γ·s_g·(m_l − m_g)`; so the kernel gets
  (w', b') and its epilogue (residual, ReLU, in-place narrow residual) is
  kept. The rank's statistics computed here and inside the kernel may differ
  in the last bit; that moves x̂ by one rounding of (m_l − m_g)·s_g, the
  error any BN's x − mean has.
* backward: the kernel, given (m_g, s_g), returns the rank's Σdz and Σdz·x̂
  (as grad_bias, grad_weight) and dx with the rank's count n_l:
  `k·(dz − Σdz/n_l − x̂·Σdz·x̂/n_l)`, k = γ·s_g. Adding
  `k·((Σdz/n_l − Σdz_g/N) + x̂·(Σdz·x̂/n_l − Σdz·x̂_g/N))` gives the group's dx.

A rank with an empty batch (n_l = 0) takes part in every collective with zero
statistics, as torch's does; its output is empty.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from resnet_fused import backends
from resnet_fused import ops as _ops
from resnet_fused.ops import common, recompute


def _acc_dtype(x: Tensor) -> torch.dtype:
    # the kernels' statistics dtype (csrc/batch_norm_act_args.h acc_dtype)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def local_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """(mean, biased variance, count) per channel of x (N, C, H, W), in float64;
    zeros for an empty batch."""
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=x.device)
        return zeros, zeros.clone(), 0
    # fp16/bf16 are reduced in fp32 (var_mean would round its result to x's dtype)
    var, mean = torch.var_mean(x.to(_acc_dtype(x)), dim=(0, 2, 3), correction=0)
    return mean.double(), var.double(), count


def merge_stats(means: Tensor, variances: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, int]:
    """Chan et al.'s merge of per-rank (mean, biased variance, count), rows = ranks:
    N = Σ n_i, mean = Σ n_i·mean_i / N, M2 = Σ n_i·var_i + Σ n_i·(mean_i − mean)².
    The k-way form of the pairwise update: every term of M2 is non-negative,
    so no cancellation. Ranks with n_i = 0 weigh nothing. Returns (mean, biased
    variance, N); all zero when every rank is empty."""
    total = int(counts.sum().item())
    if total == 0:
        return means[0] * 0, variances[0] * 0, 0
    w = counts.to(means.dtype).unsqueeze(1)
    mean = (w * means).sum(0) / total
    m2 = (w * variances).sum(0) + (w * (means - mean) ** 2).sum(0)
    return mean, m2 / total, total


def group_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, int]:
    """The group's (mean, biased variance, count) from each rank's, one all_gather."""
    world = dist.get_world_size(group)
    packed = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    # all_gather, not all_gather_into_tensor: gloo has only the former
    dist.all_gather(gathered, packed, group=group)
    rows = torch.stack(gathered)
    c = mean.shape[0]
    # counts travel as float64: exact up to 2**53
    return merge_stats(rows[:, :c], rows[:, c : 2 * c], rows[:, 2 * c].round().long())


class SyncParts:
    """A `batch_norm_act_parts` pair (ops/recompute.py's contract) whose
    statistics are the process group's, built on a backend's own pair. One
    instance per call: forward keeps the group's count for backward."""

    def __init__(self, parts: tuple, group) -> None:
        self.local_forward, self.local_backward = parts
        self.group = group
        self.count = 0  # the group's, set by forward
        self.needs_dx = True

    def forward(self, x, weight, bias, running_mean, running_var, momentum, eps, residual, relu):
        mean_l, var_l, n_l = local_stats(x)
        mean_g, var_g, total = group_stats(mean_l, var_l, n_l, self.group)
        if total == 1:  # the unbiased variance would divide by 0 (torch's gives NaN)
            raise ValueError(
                "Expected more than 1 value per channel across the process group when training, "
                f"got 1 (x of shape {tuple(x.shape)} on this rank)"
            )
        self.count = total
        acc = _acc_dtype(x)
        if running_mean is not None and total > 0:
            # in the statistics' dtype, as the one-process kernels' update (rounded once to the buffers')
            common.update_running_stats(running_mean, running_var, mean_g.to(acc), var_g.to(acc), momentum, total)
        invstd_g = torch.rsqrt(var_g + eps)
        gamma = torch.ones_like(mean_g) if weight is None else weight.detach().double()
        beta = torch.zeros_like(mean_g) if bias is None else bias.detach().double()
        scaled = gamma * invstd_g
        w = scaled * torch.sqrt(var_l + eps)  # γ·s_g / s_l
        b = beta + scaled * (mean_l - mean_g)
        out, _, _ = self.local_forward(x, w.to(acc), b.to(acc), None, None, 0.0, eps, residual, relu)
        return out, mean_g.to(acc), invstd_g.to(acc)

    def backward(self, grad_out, x, out, weight, mean, invstd, eps, relu, residual_grad):
        acc = _acc_dtype(x)
        # a weight of ones: the kernels then return both sums whatever the module's affine
        w = torch.ones_like(mean) if weight is None else weight
        grad_x, sum_dz_xhat, sum_dz, grad_res = self.local_backward(
            grad_out, x, out, w, mean, invstd, eps, relu, residual_grad
        )
        grad_w = None if weight is None else sum_dz_xhat
        grad_b = None if weight is None else sum_dz
        if not self.needs_dx:
            return None, grad_w, grad_b, grad_res
        local = torch.cat([sum_dz.double(), sum_dz_xhat.double()])
        total = local.clone()
        dist.all_reduce(total, dist.ReduceOp.SUM, group=self.group)
        n_l = x.numel() // x.shape[1] if x.shape[1] else 0
        if n_l == 0:
            return grad_x, grad_w, grad_b, grad_res
        c = x.shape[1]
        delta = local / n_l - total / self.count  # (Σdz, Σdz·x̂): the rank's means − the group's
        k = w.double() * invstd.double()
        k0 = (k * delta[:c]).to(acc).view(1, c, 1, 1)
        k1 = (k * invstd.double() * delta[c:]).to(acc).view(1, c, 1, 1)
        # k1·(x − m_g), not k1·x + const: no cancellation when |m_g| >> σ
        grad_x.add_(torch.addcmul(k0, x.to(acc) - mean.view(1, c, 1, 1), k1))
        return grad_x, grad_w, grad_b, grad_res

    def pair(self) -> tuple:
        return self.forward, self.backward


class SyncBatchNormAct(torch.autograd.Function):
    """Differentiable `SyncParts.forward` (the plain training path; the
    memory-efficient one is ops/recompute.py's ConvBatchNormAct on the same parts)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, parts, running_mean, running_var, momentum, eps, relu):
        out, mean, invstd = parts.forward(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu)
        ctx.save_for_backward(x, out if relu else None, weight, mean, invstd)
        ctx.parts, ctx.eps, ctx.relu = parts, eps, relu
        ctx.has_residual = residual is not None
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out, weight, mean, invstd = ctx.saved_tensors
        out = x if out is None else out  # unread without ReLU
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        parts = ctx.parts
        # every rank has the same graph, so every rank makes the same choice
        # (torch's SyncBatchNorm all-reduces only when x needs a gradient, too)
        parts.needs_dx = need_x
        grad_x, grad_w, grad_b, grad_r = parts.backward(
            grad_out.contiguous(memory_format=common.memory_format(x)), x, out, weight, mean, invstd, ctx.eps,
            ctx.relu, ctx.has_residual and need_r,
        )
        w_dtype, b_dtype = ctx.dtypes
        return (
            grad_x if need_x else None,
            grad_w.to(w_dtype) if need_w and grad_w is not None else None,
            grad_b.to(b_dtype) if need_b and grad_b is not None else None,
            grad_r if need_r else None,
            None, None, None, None, None, None,
        )


def resolve_group(process_group):
    """`process_group`, or the default group for None; a clear error where
    torch.distributed cannot serve it."""
    if not dist.is_available():
        raise RuntimeError("SyncBatchNorm needs torch.distributed, which this torch build lacks")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "SyncBatchNorm in training needs torch.distributed initialised "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return dist.group.WORLD if process_group is None else process_group


def sync_batch_norm_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    residual_channel_offset: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """`batch_norm_act(training=True)` (docs/design.md §4) with the batch
    statistics of `process_group` (None: the default group): every rank of
    the group calls it, each with its own batch (any size, 0 included).
    Running statistics, when given, are updated with the group's unbiased
    variance, identically on every rank. Differentiable in x, weight, bias
    and residual; grad_weight and grad_bias are the rank's own (summed over
    ranks they are the whole batch's: DDP reduces them)."""
    group = resolve_group(process_group)
    channels = _ops.check_batch_norm_act_train(
        x, weight, bias, running_mean, running_var, momentum, eps, residual, relu, residual_channel_offset
    )
    if residual_channel_offset is not None:
        residual = common.pad_residual(residual, channels, residual_channel_offset)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    parts = backends.resolve("batch_norm_act_parts", x.device)
    return SyncBatchNormAct.apply(
        x, weight, bias, residual, SyncParts(parts, group), running_mean, running_var, float(momentum), float(eps),
        relu,
    )


def conv_sync_bn_act_train(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    residual_channel_offset: Optional[int] = None,
    process_group=None,
) -> Tensor:
    """`ops.conv_bn_act_train` (conv2d, then BN keeping no convolution output
    for backward: `memory_efficient`) with `sync_batch_norm_act`'s statistics."""
    group = resolve_group(process_group)
    x, weight, stride, padding, dilation, _, residual = _ops.check_conv_bn_act_train(
        x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual, relu,
        stride, padding, dilation, groups, residual_channel_offset,
    )
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    parts = SyncParts(backends.resolve("batch_norm_act_parts", x.device), group)
    return recompute.conv_bn_act_train(
        parts.pair(), x, weight, bn_weight, bn_bias, running_mean, running_var, float(momentum), float(eps),
        residual, relu, stride, padding, dilation, groups,
    )
