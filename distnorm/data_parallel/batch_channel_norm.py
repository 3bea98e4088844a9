"""BatchChannelNorm module: estimated BatchNorm (synced over DP) followed by GroupNorm."""

from __future__ import annotations

import torch
from torch import nn

from distnorm import comm
from distnorm.comm import Group
from distnorm.data_parallel._nonfinite import guard_running_stats, init_nonfinite_guard
from distnorm.functional._norm_utils import check_args, check_input, rank_of
from distnorm.functional.batch_channel_norm import batch_channel_norm

__all__ = ["BatchChannelNorm"]


class BatchChannelNorm(nn.Module):
    """Batch-Channel Normalization (Qiao et al.): EstBN with global-batch estimates, then GroupNorm.

    ``x [N, C, *]`` (``channel_dim=1``, default) or ``[B, T, C]`` (``channel_dim=-1``) -> same shape
    and dtype; optional bool ``mask`` (True = real position) keeps padding out of both the batch
    estimates and the per-sample group statistics. See
    :mod:`distnorm.functional.batch_channel_norm`. Parameters: ``weight``/``bias`` (EstBN, per
    channel), ``cn_weight``/``cn_bias`` (channel normalization, per channel).

    Collectives in training (P > 1): fwd 1 all-reduce of ``2C + 1`` fp32 numbers (fp64 for fp64
    input); bwd none (no gradient flows through the estimates). Eval, ``group`` None or P == 1:
    none.

    Non-finite batches: the running statistics are not updated from a batch whose synced statistics
    are NaN/Inf (counted in the non-persistent buffer ``num_nonfinite_skips``; the output still
    propagates them) unless ``allow_nonfinite_stats=True``.
    """

    running_stat_buffers: tuple[str, ...] = ("running_mean", "running_var")
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    cn_weight: nn.Parameter | None
    cn_bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        *,
        group: Group = None,
        channel_dim: int = 1,
        allow_nonfinite_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_args("BatchChannelNorm", group, num_features, eps)
        if num_groups < 1 or num_features % num_groups:
            raise ValueError(f"BatchChannelNorm: num_groups must divide num_features={num_features}, got "
                             f"{num_groups} (rank {rank_of(group)})")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchChannelNorm: momentum must be in [0, 1], got {momentum} (rank {rank_of(group)})")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.num_groups, self.eps, self.momentum = num_features, num_groups, eps, momentum
        self.affine, self.group, self.channel_dim = affine, group, channel_dim
        for name in ("weight", "bias", "cn_weight", "cn_bias"):
            if affine:
                setattr(self, name, nn.Parameter(torch.empty(num_features, **factory)))  # type: ignore[arg-type]
            else:
                self.register_parameter(name, None)
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=torch.float32))
        self.register_buffer("num_batches_tracked", torch.zeros((), device=device, dtype=torch.long))
        init_nonfinite_guard(self, allow_nonfinite_stats, device)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        for p, value in ((self.weight, 1.0), (self.bias, 0.0), (self.cn_weight, 1.0), (self.cn_bias, 0.0)):
            if p is not None:
                nn.init.constant_(p, value)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.num_features, self.channel_dim, mask, "BatchChannelNorm", self)
        return guard_running_stats(self, lambda: batch_channel_norm(
            x, self.weight, self.bias, self.cn_weight, self.cn_bias, self.running_mean, self.running_var,
            self.num_batches_tracked, num_groups=self.num_groups, training=self.training, momentum=self.momentum,
            eps=self.eps, channel_dim=self.channel_dim, mask=mask, group=self.group,
        ))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, channel_dim={self.channel_dim}, group_size={comm.group_size(self.group)}")
