"""EvoNorms (Liu et al., 2020, "Evolving Normalization-Activation Layers"): B0 and S0.

* EvoNorm-B0: ``y = x / max(sqrt(var_B(x) + eps), v * x + sqrt(var_I(x) + eps)) * gamma + beta``
  with ``var_B`` the batch variance per channel (over samples and positions; the running
  average in eval, updated with the unbiased global-batch variance) and ``var_I`` the instance
  variance per (sample, channel) over positions.
* EvoNorm-S0: ``y = x * sigmoid(v * x) / sqrt(var_G(x) + eps) * gamma + beta`` with ``var_G`` the
  per-sample variance over a group of ``C / G`` channels and all positions. No batch statistics.

Data parallel: B0's batch variance comes from the exact per-rank moments ``[n·m, M2 + n·m², n]``
all-reduced in float64 (:func:`~distnorm.functional.batch_stats.synced_moments`), with an
all-reduce of their gradient in the backward. Instance and group variances are per sample: local. ``mask`` keeps
padded positions out of every statistic.
"""

from __future__ import annotations

import torch

from distnorm.comm import Group
from distnorm.functional._norm_utils import (
    check_nonempty,
    commit_,
    group_moments,
    group_moments_ref,
    rows_ref,
    vec_shape,
)
from distnorm.functional.batch_stats import stats_dtype, synced_moments

__all__ = ["evo_norm_b0", "evo_norm_b0_ref", "evo_norm_s0", "evo_norm_s0_ref"]


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, vs: list[int]) -> torch.Tensor:
    if weight is not None:
        y = y * weight.to(y.dtype).view(vs)
    if bias is not None:
        y = y + bias.to(y.dtype).view(vs)
    return y


def evo_norm_b0(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
    group: Group = None,
    update: bool | torch.Tensor = True,
    skips: torch.Tensor | None = None,
) -> torch.Tensor:
    """EvoNorm-B0 of ``x [..C..]`` -> ``y`` of ``x``'s shape and dtype.

    Training with ``update`` moves ``running_var`` towards the unbiased global-batch variance and
    counts the step (guarded by ``skips`` when given; a checkpoint recomputation passes
    ``update=False``, a compiled forward a 0-d bool tensor decided at run time). Collectives in training (P > 1): fwd 1 all-reduce of ``2C + 1`` fp64
    numbers; bwd 1 all-reduce of ``2C + 1`` fp64 numbers (the gradient of the batch moments).
    Eval, ``group`` None or P == 1: none.
    """
    c_dim = channel_dim % x.dim()
    sdt = stats_dtype(x.dtype)
    vs = vec_shape(x, c_dim)
    xs = x.to(sdt)  # one cast: every path's gradient meets in the stats dtype
    if training:
        _, var_b64, n = synced_moments(xs, channel_dim=c_dim, mask=mask, group=group, differentiable=True)
        check_nonempty(n.detach(), "EvoNormB0", group)
        if update is not False:
            with torch.no_grad():
                unbiased = var_b64 * n / (n - 1).clamp_min(1)
                new_var = (1 - momentum) * running_var.double() + momentum * unbiased
                commit_([running_var, num_batches_tracked], [new_var, num_batches_tracked + 1], skips,
                        gate=None if update is True else update)
        var_b = var_b64.to(sdt)
    else:
        var_b = running_var.to(sdt)
    _, var_i = group_moments(xs, c_dim, x.shape[c_dim], mask, sdt)
    den = torch.maximum(torch.sqrt(var_b + eps).view(vs), v.to(sdt).view(vs) * xs + torch.sqrt(var_i + eps))
    return _affine(xs / den, weight, bias, vs).to(x.dtype)


def evo_norm_s0(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor,
    *,
    groups: int,
    eps: float = 1e-5,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """EvoNorm-S0 of ``x [..C..]`` -> ``y`` of ``x``'s shape and dtype. Collectives: none."""
    c_dim = channel_dim % x.dim()
    sdt = stats_dtype(x.dtype)
    vs = vec_shape(x, c_dim)
    xs = x.to(sdt)
    _, var_g = group_moments(xs, c_dim, groups, mask, sdt)
    y = xs * torch.sigmoid(v.to(sdt).view(vs) * xs) * torch.rsqrt(var_g + eps)
    return _affine(y, weight, bias, vs).to(x.dtype)


def evo_norm_b0_ref(
    x: torch.Tensor, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *, training: bool = True,
    momentum: float = 0.1, eps: float = 1e-5, channel_dim: int = 1, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 EvoNorm-B0 on the whole batch, differentiable -> ``(y, new_state)``.

    ``params``: ``weight, bias, v``; ``state``: ``running_var, num_batches_tracked``.
    """
    c_dim = channel_dim % x.dim()
    shape = [1] * x.dim()
    shape[c_dim] = -1
    x64 = x.double()
    rv, nbt = state["running_var"].double(), int(state["num_batches_tracked"])
    if training:
        rows = rows_ref(x64, c_dim, mask)
        var_b = rows.var(0, unbiased=False)
        n = rows.shape[0]
        rv, nbt = (1 - momentum) * rv + momentum * var_b.detach() * n / max(n - 1, 1), nbt + 1
    else:
        var_b = rv
    _, var_i = group_moments_ref(x64, c_dim, x.shape[c_dim], mask)
    den = torch.maximum(torch.sqrt(var_b + eps).view(shape), params["v"].double().view(shape) * x64 + torch.sqrt(var_i + eps))
    y = x64 / den * params["weight"].double().view(shape) + params["bias"].double().view(shape)
    return y, {"running_var": rv, "num_batches_tracked": torch.tensor(nbt)}


def evo_norm_s0_ref(
    x: torch.Tensor, params: dict[str, torch.Tensor], *, groups: int, eps: float = 1e-5, channel_dim: int = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 EvoNorm-S0, differentiable. ``params``: ``weight, bias, v``."""
    c_dim = channel_dim % x.dim()
    shape = [1] * x.dim()
    shape[c_dim] = -1
    x64 = x.double()
    _, var_g = group_moments_ref(x64, c_dim, groups, mask)
    y = x64 * torch.sigmoid(params["v"].double().view(shape) * x64) / torch.sqrt(var_g + eps)
    return y * params["weight"].double().view(shape) + params["bias"].double().view(shape)
