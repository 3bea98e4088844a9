"""SyncBatchNorm: batch statistics of the whole data-parallel batch with one all-reduce each way.

``torch.nn.SyncBatchNorm`` all-gathers ``world x [mean (C), invstd (C), count (1)]`` in the
forward, then drops the ranks with an empty batch by boolean indexing (a host sync that also
breaks CUDA-graph capture). Per-channel shifted *sums* add up across ranks, so one all-reduce of
``[sum(x - s), sum((x - s)^2), n]`` (2C + 1 numbers) is enough, and an empty rank contributes
zeros without any filtering. The shift ``s`` is the running mean: it is identical on every rank
(no communication) and close to the batch mean once training has started, which keeps
``E[(x - s)^2] - E[x - s]^2`` free of cancellation. The backward keeps torch's one all-reduce of
``[sum(dy), sum(dy * x_hat)]`` (2C numbers).

Padded elements (``mask`` False) are normalised like the others but never enter the statistics;
their output gradient still reaches the statistics' gradient, since their outputs depend on them.

Path: ``batch_norm_ref`` (float64, :mod:`distnorm.functional.reference`) -> ``_SyncBatchNormFn``
(normalise + backward with the global sums) -> :func:`sync_batch_norm` (statistics, running
stats) -> :class:`SyncBatchNorm` (drop-in module) and :func:`convert_sync_batchnorm`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distnorm import comm
from distnorm.comm import Group
from distnorm.data_parallel._nonfinite import guard_running_stats, init_nonfinite_guard
from distnorm.functional.batch_stats import channel_sums, channel_view

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm"]


def _where(group: Group) -> str:
    return f"rank {comm.group_rank(group)} of {comm.group_size(group)}"


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (bf16/fp16 statistics are never kept)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_input(
    x: torch.Tensor, num_features: int | None, channel_dim: int, mask: torch.Tensor | None, group: Group, where: str
) -> None:
    """Shape checks shared by the data-parallel batch norms (no host sync: shapes only).

    ``num_features=None`` skips the channel-count check.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{where}: input must be a floating-point tensor, got {got} ({_where(group)})")
    if x.dim() < 2:
        raise ValueError(
            f"{where}: input must have at least 2 dims (batch and channel), got shape {tuple(x.shape)} "
            f"({_where(group)})"
        )
    if num_features is not None and x.shape[channel_dim] != num_features:
        raise ValueError(
            f"{where}: input must have num_features = {num_features} channels on channel_dim={channel_dim}, "
            f"got shape {tuple(x.shape)} ({_where(group)})"
        )
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"{where}: mask must be a bool tensor (True = real element), got {mask.dtype} ({_where(group)})")
        c_dim = channel_dim % x.dim()
        expected = tuple(s for i, s in enumerate(x.shape) if i != c_dim)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"{where}: mask must have the input's shape without the channel dim {expected}, got "
                f"{tuple(mask.shape)} ({_where(group)})"
            )


def check_batch_not_empty(
    x: torch.Tensor, count: torch.Tensor, channel_dim: int, mask: torch.Tensor | None, group: Group, where: str
) -> None:
    """Fail when the global batch has no element to take statistics from.

    With one rank and no mask the count is the shape: a ValueError before any work (torch's rule:
    more than one value per channel). Otherwise the count is data (the all-reduced ``n``):
    ``torch._assert_async`` checks it without a host sync: on CPU it raises a RuntimeError at once,
    on CUDA the device assert fires asynchronously (at the next synchronisation).
    """
    if comm.group_size(group) == 1 and mask is None:
        rows = x.numel() // x.shape[channel_dim]
        if rows <= 1:
            raise ValueError(
                f"{where}: expected more than 1 value per channel in training, got input shape "
                f"{tuple(x.shape)} ({rows} value(s) per channel, {_where(group)})"
            )
        return
    torch._assert_async(
        count > 0,
        f"{where}: the global batch is empty in training (input/mask give 0 elements per channel summed "
        f"over all ranks; {_where(group)}); batch statistics need at least one element",
    )


class _SyncBatchNormFn(torch.autograd.Function):
    """Normalise with given global statistics; the backward all-reduces [sum(dy), sum(dy * x_hat)].

    ``mean``, ``var`` [C] and ``count`` [] (global, stats dtype) come from the forward's
    all-reduce and are constants here: the backward adds the statistics' gradient itself.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        count: torch.Tensor,
        eps: float,
        mask: torch.Tensor | None,
        group: Group,
        channel_dim: int,
    ) -> torch.Tensor:
        ndim = x.dim()
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, count, mask)
        ctx.group, ctx.channel_dim = group, channel_dim
        if channel_dim == 1 and (weight is None or weight.dtype == mean.dtype):
            # torch's channel-aware affine kernel, fed the global statistics (eval-mode batch norm)
            return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        offset = -mean * scale if bias is None else bias.to(invstd.dtype) - mean * scale
        y = torch.addcmul(channel_view(offset, ndim, channel_dim), x.to(invstd.dtype), channel_view(scale, ndim, channel_dim))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd, count, mask = ctx.saved_tensors
        ndim, c_dim, group = x.dim(), ctx.channel_dim % x.dim(), ctx.group
        dims = [d for d in range(ndim) if d != c_dim]
        dtype = invstd.dtype
        dy_f = dy.to(dtype)
        xmu = x.to(dtype) - channel_view(mean, ndim, c_dim)  # a fresh buffer: grad_x is built in it
        sum_dy = dy_f.sum(dims)
        sum_dy_xhat = (dy_f * xmu).sum(dims) * invstd
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)  # local: a DP wrapper reduces it, as in torch
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(dy.dtype if weight is None else weight.dtype)
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat])  # an empty rank sends zeros and still joins
            comm.all_reduce_(packed, group)
            c = sum_dy.numel()
            k = invstd if weight is None else invstd * weight.to(dtype)
            # dx = k * (dy - w * mean(dy) - w * x_hat * mean(dy * x_hat)), w = mask (1 if None)
            coef_xmu = -k * invstd * packed[c:] / count
            coef_one = -k * packed[:c] / count
            grad_x = xmu.mul_(channel_view(coef_xmu, ndim, c_dim)).add_(channel_view(coef_one, ndim, c_dim))  # in place
            if mask is not None:
                grad_x.mul_(mask.unsqueeze(c_dim))
            grad_x = grad_x.addcmul_(dy_f, channel_view(k, ndim, c_dim)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    momentum: float | torch.Tensor = 0.1,
    eps: float = 1e-5,
    group: Group = None,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training-mode batch norm over the global batch of ``group``; updates running stats in place.

    ``x [N, C, *]`` (``channel_dim=1``) or ``[B, T, C]`` (``channel_dim=-1``), any float dtype ->
    ``y`` of ``x``'s shape and dtype. ``mask`` (bool, ``x``'s shape without the channel dim, True =
    real element) keeps padded elements out of the statistics. Statistics are float32 (float64
    for float64 inputs). ``running_mean``/``running_var`` [C] (or None) move by ``momentum``
    (a float, or a 0-d tensor for torch's cumulative ``momentum=None``) towards the global mean
    and the global *unbiased* variance, as ``torch.nn.BatchNorm``. ``weight``/``bias`` gradients
    are this rank's share (sum over ranks = the one-process gradient), as in torch.

    Collectives (P > 1): fwd 1 all-reduce of 2C + 1 numbers (``[sum(x - s), sum((x - s)^2), n]``,
    s = running mean), 4(2C + 1) bytes (8(2C + 1) for float64); bwd 1 all-reduce of 2C numbers
    (``[sum(dy), sum(dy * x_hat)]``), 8C bytes (16C for float64), only when ``x`` needs a gradient.
    group None or P == 1: none. No host sync; a rank with an empty batch takes part.
    """
    per_channel = next((t for t in (weight, running_mean) if t is not None), None)
    check_input(x, None if per_channel is None else per_channel.numel(), channel_dim, mask, group, "sync_batch_norm")
    c_dim = channel_dim % x.dim()
    dtype = stats_dtype(x)
    with torch.no_grad():
        shift = None if running_mean is None else running_mean.detach().to(dtype)
        sums = channel_sums(x.detach(), c_dim, mask, shift, dtype)
        comm.all_reduce_(sums, group)
        c = x.shape[c_dim]
        count = sums[2 * c]
        check_batch_not_empty(x, count, c_dim, mask, group, "SyncBatchNorm")
        d = sums[:c] / count
        var = (sums[c:2 * c] / count - d.square()).clamp_min(0)
        mean = d if shift is None else d + shift
        if running_mean is not None and running_var is not None:
            unbiased = var * (count / (count - 1).clamp_min(1))
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype) * momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype) * momentum)
    return _SyncBatchNormFn.apply(x, weight, bias, mean, var, count, eps, mask, group, c_dim)


class SyncBatchNorm(_BatchNorm):
    """Drop-in ``torch.nn.SyncBatchNorm`` with one all-reduce each way, masks and ``[B, T, C]``.

    Same constructor and state dict as ``torch.nn.SyncBatchNorm`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``): either loads the other's. The
    sixth positional argument is the process group, also accepted as ``group=`` (DESIGN's name) or
    ``process_group=`` (torch's). ``channel_dim`` is 1 (``[N, C, *]``) or -1 (``[B, T, C]``).

    ``forward(x, mask=None)``: training uses the statistics of the global batch over ``group``
    (:func:`sync_batch_norm`); eval with running statistics is plain ``F.batch_norm``; eval
    without running statistics uses this rank's batch, like torch (no collectives in eval, so a
    single rank may evaluate alone).

    Collectives (P > 1, training): fwd 1 all-reduce of 2C + 1 float32 (4(2C + 1) bytes); bwd 1
    all-reduce of 2C float32 (8C bytes). float64 inputs: twice the bytes. Eval, group None or
    P == 1: none.

    Non-finite batches: the running statistics are not updated from a batch whose synced statistics
    are NaN/Inf (counted in the non-persistent buffer ``num_nonfinite_skips``, so the state dict keeps
    torch's keys; the output still propagates them) unless ``allow_nonfinite_stats=True``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group: Group = None,
        device: Any = None,
        dtype: Any = None,
        *,
        channel_dim: int = 1,
        process_group: Group = None,
        allow_nonfinite_stats: bool = False,
    ) -> None:
        cls = type(self).__name__
        comm.group_size(group if group is not None else process_group)  # a non-group is a TypeError naming it
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{cls}: num_features must be a positive int, got {num_features!r} ({_where(group)})")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{cls}: eps must be a finite float >= 0, got {eps!r} ({_where(group)})")
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"{cls}: momentum must be None or a float in [0, 1], got {momentum!r} ({_where(group)})")
        if channel_dim not in (1, -1):
            raise ValueError(f"SyncBatchNorm: channel_dim must be 1 or -1, got {channel_dim!r} ({_where(group)})")
        if group is not None and process_group is not None and group is not process_group:
            raise ValueError(
                f"SyncBatchNorm: group and process_group are aliases; got two different groups ({_where(group)})"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.group: Group = group if group is not None else process_group
        self.channel_dim = channel_dim
        init_nonfinite_guard(self, allow_nonfinite_stats, device)

    @property
    def process_group(self) -> Group:
        """torch's name for :attr:`group`."""
        return self.group

    @process_group.setter
    def process_group(self, value: Group) -> None:
        self.group = value

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_input(input, self.num_features, self.channel_dim, None, self.group, type(self).__name__)

    def _momentum(self) -> float | torch.Tensor:
        """This step's averaging factor; counts the step. No host sync for ``momentum=None``."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)  # type: ignore[union-attr]
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.num_features, self.channel_dim, mask, self.group, type(self).__name__)
        state = self.weight if self.weight is not None else self.running_mean
        if state is not None and state.device != x.device:
            raise ValueError(f"{type(self).__name__}: input must be on the module's device {state.device}, got "
                             f"{x.device} ({_where(self.group)})")
        return guard_running_stats(self, lambda: self._forward(x, mask))

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        momentum = self._momentum()
        if not self.training and self.running_mean is not None:
            return self._eval_forward(x)
        track = self.training and self.track_running_stats
        return sync_batch_norm(
            x, self.running_mean if track else None, self.running_var if track else None, self.weight, self.bias,
            momentum=momentum, eps=self.eps, group=self.group if self.training else None,
            channel_dim=self.channel_dim, mask=mask,
        )

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x if self.channel_dim == 1 else x.movedim(-1, 1)
        y = F.batch_norm(x_c, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return y if self.channel_dim == 1 else y.movedim(1, -1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channel_dim={self.channel_dim}, group_size={comm.group_size(self.group)}"

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Group = None) -> nn.Module:
        """torch's class method, same signature: see :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: nn.Module, group: Group = None, *, channel_dim: int = 1) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm*d`` / ``torch.nn.SyncBatchNorm`` in ``module`` by
    :class:`SyncBatchNorm` on ``group``, copying parameters, buffers, ``requires_grad`` and the
    training flag; returns the (possibly new) root. Mirrors ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``;
    modules that already are distnorm norms are left as they are.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: module must be an nn.Module, got {type(module).__name__} "
                        f"({_where(group)})")
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, group,
            channel_dim=channel_dim,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, group, channel_dim=channel_dim))
    return out
