"""EvoNormB0 (batch variance synced over DP) and EvoNormS0 (per sample, no communication)."""

from __future__ import annotations

import torch
from torch import nn

from distnorm import comm
from distnorm.comm import Group
from distnorm.data_parallel._state import SKIPS, advances, init_state, skips_of
from distnorm.functional._norm_utils import check_args, check_input, check_params, check_rows, rank_of
from distnorm.functional.evo_norm import evo_norm_b0, evo_norm_s0

__all__ = ["EvoNormB0", "EvoNormS0"]


class EvoNormB0(nn.Module):
    """EvoNorm-B0 (Liu et al., 2020): ``x / max(sqrt(var_B + eps), v*x + sqrt(var_I + eps)) * weight + bias``.

    ``x [N, C, *]`` (``channel_dim=1``, default) or ``[B, T, C]`` (``channel_dim=-1``) -> same shape
    and dtype; optional bool ``mask`` (True = real position). ``var_B`` is the variance of the
    global batch over ``group`` in training (``running_var`` in eval), ``var_I`` the per-sample,
    per-channel variance over positions.

    Collectives in training (P > 1): fwd 1 all-reduce of ``2C + 1`` fp64 numbers (exact moments
    ``[n·m, M2 + n·m², n]``); bwd 1 all-reduce of ``2C + 1`` fp64 numbers. Eval, ``group`` None or
    P == 1: none.

    Non-finite batches: the running statistics are not updated from a batch whose synced statistics
    are NaN/Inf (counted in the non-persistent buffer ``num_nonfinite_skips``; the output still
    propagates them) unless ``allow_nonfinite_stats=True``.
    """

    running_stat_buffers: tuple[str, ...] = ("running_var",)
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        *,
        group: Group = None,
        channel_dim: int = 1,
        allow_nonfinite_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_args("EvoNormB0", group, num_features, eps)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EvoNormB0: momentum must be in [0, 1], got {momentum} (rank {rank_of(group)})")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum, self.group, self.channel_dim = (
            num_features, eps, momentum, group, channel_dim)
        self.weight = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        self.bias = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        self.v = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=torch.float32))
        self.register_buffer("num_batches_tracked", torch.zeros((), device=device, dtype=torch.long))
        init_state(self, allow_nonfinite_stats, device)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        getattr(self, SKIPS).zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        c_dim = check_input(x, self.num_features, self.channel_dim, mask, "EvoNormB0", self)
        c = (self.num_features,)
        check_params("EvoNormB0", self.group, weight=(self.weight, c), bias=(self.bias, c), v=(self.v, c))
        if self.training:
            check_rows(x, c_dim, mask, "EvoNormB0", self.group)
        return evo_norm_b0(
            x, self.weight, self.bias, self.v, self.running_var, self.num_batches_tracked, training=self.training,
            momentum=self.momentum, eps=self.eps, channel_dim=self.channel_dim, mask=mask, group=self.group,
            update=advances(self), skips=skips_of(self))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, channel_dim={self.channel_dim}, "
                f"group_size={comm.group_size(self.group)}")


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al., 2020): ``x * sigmoid(v*x) / sqrt(var_G + eps) * weight + bias``.

    ``var_G`` is the per-sample variance over each of ``groups`` channel groups and all (real)
    positions. Shapes as :class:`EvoNormB0`. No batch statistics, so no communication ever;
    ``group`` is accepted only so every norm of this package takes the same constructor keywords.
    Collectives: none.
    """

    running_stat_buffers: tuple[str, ...] = ()

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        eps: float = 1e-5,
        *,
        group: Group = None,
        channel_dim: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_args("EvoNormS0", group, num_features, eps)
        if groups < 1 or num_features % groups:
            raise ValueError(f"EvoNormS0: groups must divide num_features={num_features}, got {groups} "
                             f"(rank {rank_of(group)})")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.groups, self.eps, self.group, self.channel_dim = (
            num_features, groups, eps, group, channel_dim)
        self.weight = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        self.bias = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        self.v = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.num_features, self.channel_dim, mask, "EvoNormS0", self)
        c = (self.num_features,)
        check_params("EvoNormS0", self.group, weight=(self.weight, c), bias=(self.bias, c), v=(self.v, c))
        return evo_norm_s0(x, self.weight, self.bias, self.v, groups=self.groups, eps=self.eps,
                           channel_dim=self.channel_dim, mask=mask)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, channel_dim={self.channel_dim}"
