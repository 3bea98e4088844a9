"""Batch-Channel Normalization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization
and Weight Standardization").

BCN = estimated BatchNorm (EstBN) followed by a channel normalization (GroupNorm):

* EstBN normalises with *running estimates* and passes no gradient through them. In training the
  estimates move first, then normalise: ``mu = (1 - r) mu + r mean_B``,
  ``sigma^2 = (1 - r) sigma^2 + r mean_B((x - mu_old)^2)`` (the authors' code: the second moment
  around the previous estimate), ``x_b = gamma_b (x - mu) / sqrt(sigma^2 + estbn_eps) + beta_b``
  with the authors' fixed ``estbn_eps = 1e-5`` (their EstBN hard-codes it; the norm's ``eps``
  is the channel normalization's, as in their ``BCNorm``);
* channel normalization: per sample, ``num_groups`` groups of channels normalised over
  (C / G channels x positions), then a per-channel affine ``gamma_c, beta_c`` (as
  ``torch.nn.GroupNorm``; the authors' code uses one scalar per group).

Data parallel: the estimates are updated from the exact moments of the global batch (1 all-reduce
of ``2C + 1`` float64, :func:`~distnorm.functional.batch_stats.synced_moments`; no gradient, so
nothing in the backward). The channel
normalization is per sample: local. ``mask`` keeps padded positions out of both statistics.
"""

from __future__ import annotations

import torch

from distnorm.comm import Group
from distnorm.functional._norm_utils import (
    check_nonempty,
    commit_,
    group_moments,
    group_moments_ref,
    pack_state,
    read_state_once,
    rows_ref,
    unpack_state,
    vec_shape,
)
from distnorm.functional.batch_stats import stats_dtype, synced_moments

__all__ = ["batch_channel_norm", "batch_channel_norm_ref", "batch_channel_norm_step"]


def batch_channel_norm_step(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    cn_weight: torch.Tensor | None,
    cn_bias: torch.Tensor | None,
    state: torch.Tensor,
    *,
    num_groups: int,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    estbn_eps: float = 1e-5,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
    group: Group = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCN from an explicit state: ``(y, new_state)``; the caller commits ``new_state`` in training.

    ``state`` = float64 :func:`~distnorm.functional._norm_utils.pack_state` of ``(running_mean [C],
    running_var [C], num_batches_tracked [])`` before the step. Collectives in training (P > 1):
    fwd 1 all-reduce of ``2C + 1`` float64; bwd none. Eval: none.
    """
    c_dim = channel_dim % x.dim()
    c = x.shape[c_dim]
    sdt = stats_dtype(x.dtype)
    vs = vec_shape(x, c_dim)
    rm, rv, nbt = state[:c], state[c:2 * c], state[2 * c:2 * c + 1]
    if training:
        mean_b, var_b, n = synced_moments(x, channel_dim=c_dim, mask=mask, group=group)
        check_nonempty(n, "BatchChannelNorm", group)
        rv = (1 - momentum) * rv + momentum * (var_b + (mean_b - rm).square())  # around the old estimate
        rm = rm + momentum * (mean_b - rm)
        nbt = nbt + 1
    xb = (x.to(sdt) - rm.to(sdt).view(vs)) * torch.rsqrt(rv + estbn_eps).to(sdt).view(vs)
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
    return y.to(x.dtype), torch.cat([rm, rv, nbt])


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
    estbn_eps: float = 1e-5,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
    group: Group = None,
) -> torch.Tensor:
    """BCN of ``x [..C..]`` -> ``y`` of ``x``'s shape and dtype (stats fp32, fp64 for fp64 input).

    Training updates ``running_mean``, ``running_var``, ``num_batches_tracked`` in place.
    Collectives in training (P > 1): fwd 1 all-reduce of ``2C + 1`` float64; bwd none. Eval,
    ``group`` None or P == 1: none.
    """
    state = [running_mean, running_var, num_batches_tracked]
    packed = read_state_once(state, "batch_channel_norm") if training else pack_state(state)
    y, new = batch_channel_norm_step(x, weight, bias, cn_weight, cn_bias, packed, num_groups=num_groups,
                                     training=training, momentum=momentum, eps=eps, estbn_eps=estbn_eps,
                                     channel_dim=channel_dim, mask=mask, group=group)
    if training:
        commit_(state, unpack_state(new, state), None)
    return y


def batch_channel_norm_ref(
    x: torch.Tensor, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *, num_groups: int,
    training: bool = True, momentum: float = 0.1, eps: float = 1e-5, estbn_eps: float = 1e-5, channel_dim: int = 1,
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
    xb = (x.double() - rm.view(shape)) / torch.sqrt(rv + estbn_eps).view(shape)
    xb = xb * params["weight"].double().view(shape) + params["bias"].double().view(shape)
    mean, var = group_moments_ref(xb, c_dim, num_groups, mask)
    y = (xb - mean) / torch.sqrt(var + eps)
    y = y * params["cn_weight"].double().view(shape) + params["cn_bias"].double().view(shape)
    return y, {"running_mean": rm, "running_var": rv, "num_batches_tracked": torch.tensor(nbt)}
