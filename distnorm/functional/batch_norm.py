"""Batch normalization over the global data-parallel batch: the one op behind SyncBatchNorm,
AlphaBatchNorm and RepBatchNorm.

* Local path (``group`` None or of size 1, no ``mask``, a float momentum, ``[N, C, *]`` layout):
  ``torch.batch_norm``, torch's fused native kernels forward and backward, running statistics
  included. (``[B, T, C]`` takes the synced path at any world size: see :func:`_native_train_ok`.)
* Synced path: exact global moments from :func:`~distnorm.functional.batch_stats.synced_moments`
  (one all-reduce of ``2C + 1`` float64: ``[n·m, M2 + n·m², n]`` per rank, accurate from the first
  step at any ``|mean|/std``), then :class:`_BatchNormFn`, which normalises with them and whose
  backward all-reduces ``[Σdy, Σdy·x̂]`` (``2C`` numbers, stats dtype) once — torch's backward.

``torch.nn.SyncBatchNorm`` all-gathers ``world × [mean, invstd, count]`` instead and drops empty
ranks by boolean indexing (a host sync); here an empty rank adds zeros.

The backward, with ``g = dy·γ``, ``r = 1/√(var + ε)``, ``w`` the mask (1 without), means over the
``N`` real elements of the global batch, and ``f = 1`` in training::

    dx = r·(g − f·w·(mean(g) + r·(x − m_B)·mean(g·x̂)))

``f = 1 − α`` covers α-BN's calibrated statistics ``μ = α·μ_run + (1 − α)·m_B``,
``σ² = α·σ²_run + (1 − α)·v_B`` (``m_B``, ``v_B`` the batch's). Padded elements (``w = 0``) are
normalised like the others; their ``dy`` still reaches the statistics' gradient.

Precision: statistics float32 (float64 for float64 input), ``weight``/``bias`` gradients summed in
float32 and cast to the parameter dtype once, output in the input dtype. Path: ``batch_norm_ref``
(float64, :mod:`distnorm.functional.reference`) -> :func:`batch_norm_stats` -> :class:`_BatchNormFn`
-> :func:`batch_norm_train` / :func:`batch_norm_eval` / :func:`alpha_batch_norm` -> modules.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distnorm import comm
from distnorm.comm import Group
from distnorm.functional._norm_utils import check_nonempty, commit_
from distnorm.functional.batch_stats import channel_view, stats_dtype, synced_moments

__all__ = ["alpha_batch_norm", "batch_norm_eval", "batch_norm_stats", "batch_norm_train"]


def _where(group: Group) -> str:
    return f"rank {comm.group_rank(group)} of {comm.group_size(group)}"


def _native_ok(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether torch's batch-norm kernel takes ``x`` with these per-channel tensors as they are:
    all of one dtype, which is ``x``'s or float32 for a half-precision ``x``."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        return False
    if not dtypes:
        return True
    (p,) = dtypes
    return p == x.dtype or (p == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))


def _as_channels_1(x: torch.Tensor, c_dim: int) -> torch.Tensor | None:
    """``x`` as torch's ``[N, C, *]`` without a copy: itself, or ``[rows, C]`` for channels last."""
    if c_dim == 1:
        return x
    if c_dim == x.dim() - 1:
        return x.reshape(-1, x.shape[c_dim])
    return None


def _native_train_ok(x: torch.Tensor, c_dim: int) -> bool:
    """Whether torch's training kernel takes ``x`` as it is and keeps its statistics exact.

    ``[N, C, *]`` (``c_dim == 1``): yes, torch's own layout (statistics accumulated in double on
    CPU). ``[B, T, C]`` viewed as ``[rows, C]``: torch's channels-last CPU statistics lose digits
    when ``|mean| >> std`` (5x nn.BatchNorm1d's error at |mean|/std = 1e4), and the transposed
    ``[B, C, T]`` is 10x slower than the exact synced path, which therefore runs there too.
    """
    return c_dim == 1


def _check_more_than_one_value(x: torch.Tensor, c_dim: int, group: Group, where: str) -> None:
    """torch's rule for one process: training needs more than 1 value per channel (a shape check)."""
    rows = x.numel() // x.shape[c_dim]
    if rows <= 1:
        raise ValueError(f"{where}: expected more than 1 value per channel in training, got input shape "
                         f"{tuple(x.shape)} ({rows} value(s) per channel, {_where(group)})")


def batch_norm_stats(
    x: torch.Tensor, c_dim: int, mask: torch.Tensor | None, group: Group, where: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global ``(mean [C], biased var [C], n [])`` in float64, no autograd; an empty global batch fails.

    One process, no mask: ``≤ 1`` value per channel is a ValueError before any work (torch's rule).
    Otherwise the count is data: a device-side assert (no host sync).
    Collectives (P > 1): 1 all-reduce of ``2C + 1`` float64.
    """
    if comm.group_size(group) == 1 and mask is None:
        _check_more_than_one_value(x, c_dim, group, where)
    mean, var, n = synced_moments(x, channel_dim=c_dim, mask=mask, group=group)
    if comm.group_size(group) > 1 or mask is not None:
        check_nonempty(n, where, group)
    return mean, var, n


class _BatchNormFn(torch.autograd.Function):
    """Normalise with given statistics; the backward all-reduces ``[Σdy, Σdy·x̂]`` once.

    ``mean``, ``var`` [C] (stats dtype) normalise; ``count`` [] is the global number of real
    elements; ``batch_frac`` (``f`` in the module doc) and ``batch_mean`` [C] (``m_B``, None when
    ``f = 1``) say how the normalising statistics depend on the batch.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
        var: torch.Tensor, eps: float, count: torch.Tensor, batch_mean: torch.Tensor | None, batch_frac: float,
        mask: torch.Tensor | None, group: Group, c_dim: int,
    ) -> torch.Tensor:
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, count, batch_mean, mask)
        ctx.group, ctx.c_dim, ctx.batch_frac = group, c_dim, batch_frac
        ctx.bias_dtype = None if bias is None else bias.dtype
        x_c = _as_channels_1(x, c_dim)
        if x_c is not None and _native_ok(x, weight, bias, mean):  # torch's per-channel affine kernel
            y = torch.batch_norm(x_c, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
            return y.view(x.shape)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        offset = -mean * scale if bias is None else bias.to(invstd.dtype) - mean * scale
        ndim = x.dim()
        y = torch.addcmul(channel_view(offset, ndim, c_dim), x.to(invstd.dtype), channel_view(scale, ndim, c_dim))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd, count, batch_mean, mask = ctx.saved_tensors
        ndim, c_dim, dtype = x.dim(), ctx.c_dim, invstd.dtype
        dims = [d for d in range(ndim) if d != c_dim]
        dy_f = dy.to(dtype)
        xmu = x.to(dtype) - channel_view(mean, ndim, c_dim)  # a fresh buffer: grad_x is built in it
        sum_dy = dy_f.sum(dims)
        sum_dy_xhat = (dy_f * xmu).sum(dims) * invstd
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)  # this rank's share: a DP wrapper sums them, as in torch
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat])  # an empty rank sends zeros and still joins
            comm.all_reduce_(packed, ctx.group)
            c = sum_dy.numel()
            k = invstd if weight is None else invstd * weight.to(dtype)
            coef_xmu = -ctx.batch_frac * k * invstd * packed[c:] / count
            coef_one = -ctx.batch_frac * k * packed[:c] / count
            if batch_mean is not None:  # x - m_B = (x - mean) + (mean - m_B)
                coef_one = coef_one + coef_xmu * (mean - batch_mean)
            grad_x = xmu.mul_(channel_view(coef_xmu, ndim, c_dim)).add_(channel_view(coef_one, ndim, c_dim))
            if mask is not None:
                grad_x.mul_(mask.unsqueeze(c_dim))
            grad_x = grad_x.addcmul_(dy_f, channel_view(k, ndim, c_dim)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    *,
    momentum: float | torch.Tensor = 0.1,
    eps: float = 1e-5,
    group: Group = None,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
    skips: torch.Tensor | None = None,
    update: bool | torch.Tensor = True,
    where: str = "batch_norm",
) -> torch.Tensor:
    """Training-mode batch norm over the global batch of ``group``; running statistics advance in place.

    ``x [..C..]`` (channels on ``channel_dim``) -> ``y`` of ``x``'s shape and dtype. ``mask`` (bool,
    ``x``'s shape without the channel dim, True = real element) keeps padding out of the
    statistics. ``running_mean``/``running_var`` [C] (None: no update) move by ``momentum`` (a
    float, or a 0-d tensor such as torch's cumulative ``1/(num_batches_tracked + 1)``) towards the
    global mean and *unbiased* variance; ``num_batches_tracked`` (if given) counts the step. With
    ``skips`` (a 0-d int tensor) a non-finite batch leaves every statistic as it was and counts one
    skip (:func:`~distnorm.functional._norm_utils.commit_`). ``update=False`` (an activation
    checkpoint's recomputation) leaves them all as they are but takes the same path, so the
    recomputation saves the same tensors; a 0-d bool tensor decides at run time (a compiled
    forward, which may be re-run by an eager checkpoint). ``weight``/``bias`` gradients are this rank's share
    (their sum over ranks is the one-process gradient), as in torch.

    Collectives (P > 1): fwd 1 all-reduce of ``2C + 1`` float64 (``8(2C + 1)`` bytes); bwd 1
    all-reduce of ``2C`` numbers in the stats dtype (``8C`` bytes; ``16C`` for float64 input), only
    when ``x`` needs a gradient. group None or P == 1: none (torch's kernels when unmasked).
    """
    c_dim = channel_dim % x.dim()
    tracked = running_mean is not None and running_var is not None
    native = (comm.group_size(group) == 1 and mask is None and _native_train_ok(x, c_dim)
              and not isinstance(momentum, torch.Tensor) and _native_ok(x, weight, bias, running_mean, running_var))
    if native:
        _check_more_than_one_value(x, c_dim, group, where)
        if not tracked:
            return torch.batch_norm(x, weight, bias, None, None, True, float(momentum), eps, torch.backends.cudnn.enabled)
        assert running_mean is not None and running_var is not None
        # torch updates copies (it saves them for backward); they replace the buffers unless this
        # is a recomputation or, with the guard, the batch was not finite. A non-finite batch makes
        # the new running variance NaN/Inf (its mean enters the variance), so checking that one
        # suffices (statistics that are already NaN/Inf stay so either way: they only count skips
        # then). Copies always, so a recomputation issues the first run's ops (selective
        # checkpointing matches them one by one).
        new = torch.stack([running_mean.detach(), running_var.detach()])
        y = torch.batch_norm(x, weight, bias, new[0], new[1], True, float(momentum), eps, torch.backends.cudnn.enabled)
        if update is True and skips is None:
            with torch.no_grad():
                running_mean.copy_(new[0])
                running_var.copy_(new[1])
                if num_batches_tracked is not None:
                    num_batches_tracked.add_(1)
        elif update is not False:
            with torch.no_grad():
                kept = torch.isfinite(new[1].sum(dtype=torch.float64))
                if skips is None:
                    kept = torch.ones_like(kept)
                if update is not True:
                    kept = kept & update
                    if skips is not None:
                        skips.add_(update & ~kept)
                elif skips is not None:
                    skips.add_(~kept)
                running_mean.copy_(torch.where(kept, new[0], running_mean))
                running_var.copy_(torch.where(kept, new[1], running_var))
                if num_batches_tracked is not None:
                    num_batches_tracked.add_(kept)
        return y
    mean64, var64, n = batch_norm_stats(x, c_dim, mask, group, where)
    sdt = stats_dtype(x.dtype)
    if tracked and update is not False:
        assert running_mean is not None and running_var is not None
        with torch.no_grad():
            unbiased = var64 * (n / (n - 1).clamp_min(1))
            new_mean = running_mean.double() + momentum * (mean64 - running_mean.double())
            new_var = running_var.double() + momentum * (unbiased - running_var.double())
            _commit_step(running_mean, running_var, num_batches_tracked, new_mean, new_var, skips,
                         None if update is True else update)
    return _BatchNormFn.apply(x, weight, bias, mean64.to(sdt), var64.to(sdt), eps, n.to(sdt), None, 1.0, mask, group,
                              c_dim)


def _commit_step(running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked: torch.Tensor | None,
                 new_mean: torch.Tensor, new_var: torch.Tensor, skips: torch.Tensor | None,
                 gate: torch.Tensor | None) -> None:
    targets, new = [running_mean, running_var], [new_mean, new_var]
    if num_batches_tracked is not None:
        targets.append(num_batches_tracked)
        new.append(num_batches_tracked + 1)
    commit_(targets, new, skips, gate)


def batch_norm_eval(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor,
    running_var: torch.Tensor, *, eps: float = 1e-5, channel_dim: int = 1,
) -> torch.Tensor:
    """Eval-mode batch norm with the running statistics (torch's kernel): ``x [..C..]`` -> same shape and dtype.

    Collectives: none.
    """
    c_dim = channel_dim % x.dim()
    x_c = _as_channels_1(x, c_dim)
    if x_c is not None and _native_ok(x, weight, bias, running_mean, running_var):
        return F.batch_norm(x_c, running_mean, running_var, weight, bias, False, 0.0, eps).view(x.shape)
    sdt = stats_dtype(x.dtype)
    scale = torch.rsqrt(running_var.to(sdt) + eps)
    if weight is not None:
        scale = scale * weight.to(sdt)
    offset = -running_mean.to(sdt) * scale
    if bias is not None:
        offset = offset + bias.to(sdt)
    ndim = x.dim()
    return torch.addcmul(channel_view(offset, ndim, c_dim), x.to(sdt), channel_view(scale, ndim, c_dim)).to(x.dtype)


def alpha_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    alpha: float,
    eps: float = 1e-5,
    group: Group = None,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise ``x`` with ``alpha``-mixed running and global test-batch statistics (α-BN).

    ``mu = alpha·running_mean + (1 - alpha)·mean_B``, ``var = alpha·running_var + (1 - alpha)·var_B``
    (biased batch variance of the global batch of ``group``; ``mask`` as in
    :func:`batch_norm_train`). ``x [..C..]`` -> ``y`` of the same shape and dtype; differentiable
    through the batch statistics (TENT-style adaptation). Running statistics never move.
    Collectives (P > 1, alpha < 1): fwd 1 all-reduce of ``2C + 1`` float64; bwd 1 all-reduce of
    ``2C`` numbers (stats dtype) when ``x`` needs a gradient. alpha == 1, group None or P == 1: none.
    """
    c_dim = channel_dim % x.dim()
    if alpha == 1.0:
        return batch_norm_eval(x, weight, bias, running_mean, running_var, eps=eps, channel_dim=c_dim)
    mean_b, var_b, n = batch_norm_stats(x, c_dim, mask, group, "AlphaBatchNorm")
    sdt = stats_dtype(x.dtype)
    mean = alpha * running_mean.detach().double() + (1 - alpha) * mean_b
    var = alpha * running_var.detach().double() + (1 - alpha) * var_b
    return _BatchNormFn.apply(x, weight, bias, mean.to(sdt), var.to(sdt), eps, n.to(sdt), mean_b.to(sdt), 1.0 - alpha,
                              mask, group, c_dim)
