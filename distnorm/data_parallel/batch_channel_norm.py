"""BatchChannelNorm module: estimated BatchNorm (synced over DP) followed by GroupNorm."""

from __future__ import annotations

import torch
from torch import nn

from distnorm import comm
from distnorm.comm import Group
from distnorm.data_parallel._state import (
    SKIPS,
    commit_state,
    init_snapshot,
    init_state,
    read_state,
    reset_snapshot,
    skips_of,
    track_backward,
)
from distnorm.functional._norm_utils import (
    check_args,
    check_eps,
    check_input,
    check_params,
    check_rows,
    pack_state,
    rank_of,
    unpack_state,
)
from distnorm.functional.batch_channel_norm import batch_channel_norm_step

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
    _state_names = ("running_mean", "running_var", "num_batches_tracked")  # what the training forward reads
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
        estbn_eps: float = 1e-5,
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
        check_eps("BatchChannelNorm", "estbn_eps", estbn_eps, group)
        factory = {"device": device, "dtype": dtype}
        self.estbn_eps = float(estbn_eps)
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
        init_state(self, allow_nonfinite_stats, device)
        init_snapshot(self, self._state_names, device)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        getattr(self, SKIPS).zero_()
        reset_snapshot(self)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        for p, value in ((self.weight, 1.0), (self.bias, 0.0), (self.cn_weight, 1.0), (self.cn_bias, 0.0)):
            if p is not None:
                nn.init.constant_(p, value)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        c_dim = check_input(x, self.num_features, self.channel_dim, mask, "BatchChannelNorm", self)
        c = (self.num_features,)
        check_params("BatchChannelNorm", self.group, weight=(self.weight, c), bias=(self.bias, c),
                     cn_weight=(self.cn_weight, c), cn_bias=(self.cn_bias, c))
        names = self._state_names
        state: torch.Tensor
        fresh: bool | torch.Tensor = False
        if self.training:
            check_rows(x, c_dim, mask, "BatchChannelNorm", self.group)
            state, fresh = read_state(self, names, x)
        else:
            state = pack_state([getattr(self, n) for n in names])
        y, new = batch_channel_norm_step(
            x, self.weight, self.bias, self.cn_weight, self.cn_bias, state, num_groups=self.num_groups,
            training=self.training, momentum=self.momentum, eps=self.eps, estbn_eps=self.estbn_eps, channel_dim=c_dim,
            mask=mask, group=self.group)
        targets = [getattr(self, n) for n in names]
        commit_state(targets, unpack_state(new, targets), fresh, skips_of(self))
        return track_backward(self, x, y)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, estbn_eps={self.estbn_eps}, "
                f"momentum={self.momentum}, "
                f"affine={self.affine}, channel_dim={self.channel_dim}, group_size={comm.group_size(self.group)}")
