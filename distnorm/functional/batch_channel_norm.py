"""Batch-Channel Normalization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization
and Weight Standardization").

BCN = estimated BatchNorm (EstBN) followed by a channel normalization (GroupNorm):

* EstBN normalises with *running estimates* and passes no gradient through them. In training the
  estimates move first, then normalise: ``mu = (1 - r) mu + r mean_B``,
  ``sigma^2 = (1 - r) sigma^2 + r mean_B((x - mu_old)^2)`` (the authors' code: the second moment
  around the previous estimate), ``x_b = gamma_b (x - mu) / sqrt(sigma^2 + eps) + beta_b``;
* channel normalization: per sample, ``num_groups`` groups of channels normalised over
  (C / G channels x positions), then a per-channel affine ``gamma_c, beta_c`` (as
  ``torch.nn.GroupNorm``; the authors' code uses one scalar per group).

Data parallel: the estimates are updated from the global batch (1 all-reduce of ``2C + 1``
numbers, shifted by ``mu_old``; no gradient, so nothing in the backward). The channel
normalization is per sample: local. ``mask`` keeps padded positions out of both statistics.
"""

from __future__ import annotations

import torch

from distnorm import comm
from distnorm.comm import Group
from distnorm.functional._norm_utils import check_nonempty, group_moments, group_moments_ref, rows_ref, vec_shape
from distnorm.functional.batch_stats import channel_sums

__all__ = ["batch_channel_norm", "batch_channel_norm_ref"]


def batch_channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    cn_weight: torch.Tensor | None,
    cn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    *,
    num_groups: int,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
    group: Group = None,
) -> torch.Tensor:
    """BCN of ``x [..C..]`` -> ``y`` of ``x``'s shape and dtype (stats fp32, fp64 for fp64 input).

    Training updates ``running_mean``, ``running_var``, ``num_batches_tracked`` in place.
    Collectives in training (P > 1): fwd 1 all-reduce of ``2C + 1`` numbers; bwd none. Eval,
    ``group`` None or P == 1: none.
    """
    c_dim = channel_dim % x.dim()
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    vs = vec_shape(x, c_dim)
    if training:
        with torch.no_grad():
            c = x.shape[c_dim]
            shift = running_mean.to(sdt)
            sums = comm.all_reduce_(channel_sums(x.detach(), c_dim, mask, shift, sdt), group)
            n = sums[2 * c]
            check_nonempty(n, "BatchChannelNorm", group)
            running_mean.copy_(shift + momentum * sums[:c] / n)
            running_var.copy_((1 - momentum) * running_var.to(sdt) + momentum * sums[c:2 * c] / n)
            num_batches_tracked.add_(1)
    xb = (x.to(sdt) - running_mean.to(sdt).view(vs)) * torch.rsqrt(running_var.to(sdt) + eps).view(vs)
    if weight is not None:
        xb = xb * weight.to(sdt).view(vs)
    if bias is not None:
        xb = xb + bias.to(sdt).view(vs)
    mean, var = group_moments(xb, c_dim, num_groups, mask, sdt)
    y = (xb - mean) * torch.rsqrt(var + eps)
    if cn_weight is not None:
        y = y * cn_weight.to(sdt).view(vs)
    if cn_bias is not None:
        y = y + cn_bias.to(sdt).view(vs)
    return y.to(x.dtype)


def batch_channel_norm_ref(
    x: torch.Tensor, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *, num_groups: int,
    training: bool = True, momentum: float = 0.1, eps: float = 1e-5, channel_dim: int = 1,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 BCN on the whole batch, differentiable in ``x`` and ``params`` -> ``(y, new_state)``.

    ``params``: ``weight, bias, cn_weight, cn_bias``; ``state``: ``running_mean, running_var,
    num_batches_tracked`` (not modified).
    """
    c_dim = channel_dim % x.dim()
    shape = [1] * x.dim()
    shape[c_dim] = -1
    rm, rv = state["running_mean"].double(), state["running_var"].double()
    nbt = int(state["num_batches_tracked"])
    if training:
        rows = rows_ref(x.detach(), c_dim, mask)
        rm, rv = (1 - momentum) * rm + momentum * rows.mean(0), (1 - momentum) * rv + momentum * (rows - rm).square().mean(0)
        nbt += 1
    xb = (x.double() - rm.view(shape)) / torch.sqrt(rv + eps).view(shape)
    xb = xb * params["weight"].double().view(shape) + params["bias"].double().view(shape)
    mean, var = group_moments_ref(xb, c_dim, num_groups, mask)
    y = (xb - mean) / torch.sqrt(var + eps)
    y = y * params["cn_weight"].double().view(shape) + params["cn_bias"].double().view(shape)
    return y, {"running_mean": rm, "running_var": rv, "num_batches_tracked": torch.tensor(nbt)}
