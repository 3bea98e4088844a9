"""PowerNorm module: running quadratic-mean normalisation synced over the data-parallel group."""

from __future__ import annotations

import torch
from torch import nn

from distnorm import comm
from distnorm.comm import Group
from distnorm.data_parallel._state import (
    GRAD_SKIPS,
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
    rank_of,
    scale_shift_fold,
    unpack_state,
)
from distnorm.functional.power_norm import group_scaling, power_norm_eval, power_norm_step

__all__ = ["PowerNorm"]


class PowerNorm(nn.Module):
    """PowerNorm (Shen et al., 2020) whose batch statistics span the data-parallel ``group``.

    ``x [B, T, C]`` (``channel_dim=-1``, default) or ``[N, C, *]`` (``channel_dim=1``) -> ``y`` of the
    same shape and dtype; optional bool ``mask`` of ``x``'s shape without the channel dim (True =
    real token) keeps padding out of every statistic. See :mod:`distnorm.functional.power_norm`
    for the algorithm (running ``psi^2``: cumulative average for ``warmup_iters`` steps then EMA
    ``alpha_fwd``; approximate backward with the running ``ema_gz``, rate ``alpha_bkw``).
    ``group_num`` turns on GroupScaling1D (per-token RMS over ``C / group_num`` channel groups),
    whose own ``group_scaling_eps`` is the authors' fixed 1e-5 by default (not ``eps``).

    Collectives in training (P > 1): fwd 1 all-reduce of ``C + 1`` fp32 numbers
    (``[sum x^2, n]``); bwd 1 all-reduce of ``C`` fp32 numbers (``sum g*z``). fp64 for fp64 input.
    Eval, ``group`` None or P == 1: none. Every rank ends each step with identical buffers.

    One forward/backward per optimizer step: the step counter and ``ema_gz`` advance per call
    (once per step under activation checkpointing and torch.compile too).

    Non-finite batches: the running statistics are not updated from a batch whose synced statistics
    are NaN/Inf (counted in the non-persistent buffer ``num_nonfinite_skips``; the output still
    propagates them), nor ``ema_gz`` from non-finite gradients (counted in
    ``num_nonfinite_grad_skips``), unless ``allow_nonfinite_stats=True``.
    """

    running_stat_buffers: tuple[str, ...] = ("running_phi",)
    _state_names = ("running_phi", "num_batches_tracked")  # what the training forward reads
    running_phi: torch.Tensor
    ema_gz: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        warmup_iters: int = 10000,
        affine: bool = True,
        group_num: int | None = None,
        *,
        group_scaling_eps: float = 1e-5,
        group: Group = None,
        channel_dim: int = -1,
        allow_nonfinite_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_args("PowerNorm", group, num_features, eps)
        for name, value in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"PowerNorm: {name} must be in [0, 1), got {value} (rank {rank_of(group)})")
        if warmup_iters < 0:
            raise ValueError(f"PowerNorm: warmup_iters must be >= 0, got {warmup_iters} (rank {rank_of(group)})")
        if group_num is not None and (group_num < 1 or num_features % group_num):
            raise ValueError(f"PowerNorm: group_num must divide num_features={num_features}, got {group_num} "
                             f"(rank {rank_of(group)})")
        check_eps("PowerNorm", "group_scaling_eps", group_scaling_eps, group)
        factory = {"device": device, "dtype": dtype}
        self.group_scaling_eps = float(group_scaling_eps)
        self.num_features, self.eps, self.alpha_fwd, self.alpha_bkw = num_features, eps, alpha_fwd, alpha_bkw
        self.warmup_iters, self.affine, self.group_num = warmup_iters, affine, group_num
        self.group, self.channel_dim = group, channel_dim
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
            self.bias = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_phi", torch.ones(num_features, device=device, dtype=torch.float32))
        self.register_buffer("ema_gz", torch.zeros(num_features, device=device, dtype=torch.float32))
        self.register_buffer("num_batches_tracked", torch.zeros((), device=device, dtype=torch.long))
        init_state(self, allow_nonfinite_stats, device, backward_stats=True)
        init_snapshot(self, self._state_names, device)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1.0)
        self.ema_gz.zero_()
        self.num_batches_tracked.zero_()
        getattr(self, SKIPS).zero_()
        getattr(self, GRAD_SKIPS).zero_()
        reset_snapshot(self)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        c_dim = check_input(x, self.num_features, self.channel_dim, mask, "PowerNorm", self)
        c = (self.num_features,)
        check_params("PowerNorm", self.group, weight=(self.weight, c), bias=(self.bias, c))
        x_in = x if self.group_num is None else group_scaling(x, self.group_num, self.group_scaling_eps, c_dim)
        if not self.training:
            return power_norm_eval(x_in, self.weight, self.bias, self.running_phi, eps=self.eps,
                                   channel_dim=c_dim).to(x.dtype)
        check_rows(x, c_dim, mask, "PowerNorm", self.group)
        state, fresh = read_state(self, self._state_names, x)
        y, new = power_norm_step(x_in, self.weight, self.bias, state, self.ema_gz, eps=self.eps,
                                 alpha_fwd=self.alpha_fwd, alpha_bkw=self.alpha_bkw, warmup_iters=self.warmup_iters,
                                 channel_dim=c_dim, mask=mask, group=self.group, skips=skips_of(self, GRAD_SKIPS))
        targets = [self.running_phi, self.num_batches_tracked]
        commit_state(targets, unpack_state(new, targets), fresh, skips_of(self))
        return track_backward(self, x, y.to(x.dtype))

    def fold_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval form as a per-channel affine map: ``y = x * scale + shift`` (fp32 ``[C]`` each).

        Not available with GroupScaling1D (a per-token, non-linear scaling).
        """
        if self.group_num is not None:
            raise ValueError(f"PowerNorm.fold_scale_shift: group_num={self.group_num} makes the eval form "
                             f"non-affine; expected group_num=None (rank {rank_of(self.group)})")
        return scale_shift_fold(self.running_phi, self.eps, self.weight if self.affine else None,
                                self.bias if self.affine else None)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"warmup_iters={self.warmup_iters}, affine={self.affine}, group_num={self.group_num}, "
                f"group_scaling_eps={self.group_scaling_eps}, "
                f"channel_dim={self.channel_dim}, group_size={comm.group_size(self.group)}")
