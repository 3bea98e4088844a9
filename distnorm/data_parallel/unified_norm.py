"""UnifiedNorm module: windowed, outlier-filtered second-moment normalisation synced over DP."""

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
    check_input,
    check_params,
    check_rows,
    rank_of,
    scale_shift_fold,
    unpack_state,
)
from distnorm.functional.power_norm import power_norm_eval
from distnorm.functional.unified_norm import STATE_NAMES, unified_norm_step

__all__ = ["UnifiedNorm"]


class UnifiedNorm(nn.Module):
    """Unified Normalization (Yang et al., 2022) whose batch statistics span the DP ``group``.

    ``x [B, T, C]`` (``channel_dim=-1``, default) or ``[N, C, *]`` (``channel_dim=1``) -> ``y`` of the
    same shape and dtype; optional bool ``mask`` (``x``'s shape without the channel dim, True = real
    token). Algorithm in :mod:`distnorm.functional.unified_norm`: a window of ``window_size`` batch
    second moments smoothed by their geometric mean, optional adaptive outlier filtration (the
    authors suggest it for vision, not NLP), a gradient-compensation ratio clamped to [0.2, 5] and
    the ``ema_gz`` approximate backward. Eval: ``y = weight * x / sqrt(running_var + eps) + bias``,
    foldable (:meth:`fold_scale_shift`).

    Collectives in training (P > 1): fwd 1 all-reduce of ``C + 1`` fp32 numbers (``[sum x^2, n]``);
    bwd 1 all-reduce of ``C`` fp32 numbers (``sum g*z``); fp64 for fp64 input. Eval, ``group`` None
    or P == 1: none. Every rank takes the same skip decision and ends with identical buffers.

    Non-finite batches: the running statistics are not updated from a batch whose synced statistics
    are NaN/Inf (counted in the non-persistent buffer ``num_nonfinite_skips``; the output still
    propagates them), nor ``ema_gz`` from non-finite gradients (counted in
    ``num_nonfinite_grad_skips``), unless ``allow_nonfinite_stats=True``.
    """

    running_stat_buffers: tuple[str, ...] = ("running_var",)
    running_var: torch.Tensor
    ema_gz: torch.Tensor
    num_batches_tracked: torch.Tensor
    buffer_x2: torch.Tensor
    buffer_gz: torch.Tensor
    skip_counter: torch.Tensor

    def __init__(
        self,
        num_features: int,
        window_size: int = 4,
        warmup_iters: int = 4000,
        outlier_filtration: bool = False,
        eps: float = 1e-5,
        momentum: float = 0.9,
        affine: bool = True,
        ratio_warmup_iters: int = 1000,
        *,
        group: Group = None,
        channel_dim: int = -1,
        allow_nonfinite_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_args("UnifiedNorm", group, num_features, eps)
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"UnifiedNorm: window_size must be an int >= 1, got {window_size!r} (rank {rank_of(group)})")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"UnifiedNorm: momentum must be in [0, 1), got {momentum} (rank {rank_of(group)})")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.window_size, self.warmup_iters = num_features, window_size, warmup_iters
        self.outlier_filtration, self.eps, self.momentum, self.affine = outlier_filtration, eps, momentum, affine
        self.ratio_warmup_iters, self.group, self.channel_dim = ratio_warmup_iters, group, channel_dim
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
            self.bias = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        f32 = {"device": device, "dtype": torch.float32}
        self.register_buffer("running_var", torch.ones(num_features, **f32))  # type: ignore[arg-type]
        self.register_buffer("ema_gz", torch.zeros(num_features, **f32))  # type: ignore[arg-type]
        self.register_buffer("num_batches_tracked", torch.zeros((), device=device, dtype=torch.long))
        self.register_buffer("buffer_x2", torch.zeros(window_size, num_features, **f32))  # type: ignore[arg-type]
        self.register_buffer("buffer_gz", torch.zeros(window_size, num_features, **f32))  # type: ignore[arg-type]
        self.register_buffer("skip_counter", torch.zeros((), device=device, dtype=torch.long))
        init_state(self, allow_nonfinite_stats, device, backward_stats=True)
        init_snapshot(self, STATE_NAMES, device)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1.0)
        for buf in (self.ema_gz, self.num_batches_tracked, self.buffer_x2, self.buffer_gz, self.skip_counter,
                    getattr(self, SKIPS), getattr(self, GRAD_SKIPS)):
            buf.zero_()
        reset_snapshot(self)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        c_dim = check_input(x, self.num_features, self.channel_dim, mask, "UnifiedNorm", self)
        c = (self.num_features,)
        check_params("UnifiedNorm", self.group, weight=(self.weight, c), bias=(self.bias, c))
        if not self.training:
            return power_norm_eval(x, self.weight, self.bias, self.running_var, eps=self.eps,
                                   channel_dim=c_dim).to(x.dtype)
        check_rows(x, c_dim, mask, "UnifiedNorm", self.group)
        state, fresh = read_state(self, STATE_NAMES, x)
        y, new = unified_norm_step(
            x, self.weight, self.bias, state, (self.ema_gz, self.buffer_gz), eps=self.eps, momentum=self.momentum,
            window_size=self.window_size, warmup_iters=self.warmup_iters, outlier_filtration=self.outlier_filtration,
            ratio_warmup_iters=self.ratio_warmup_iters, channel_dim=c_dim, mask=mask, group=self.group,
            skips=skips_of(self, GRAD_SKIPS))
        targets = [getattr(self, name) for name in STATE_NAMES]
        commit_state(targets, unpack_state(new, targets), fresh, skips_of(self))
        return track_backward(self, x, y)

    def fold_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval form as a per-channel affine map: ``y = x * scale + shift`` (fp32 ``[C]`` each)."""
        return scale_shift_fold(self.running_var, self.eps, self.weight if self.affine else None,
                                self.bias if self.affine else None)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window_size={self.window_size}, warmup_iters={self.warmup_iters}, "
                f"outlier_filtration={self.outlier_filtration}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, channel_dim={self.channel_dim}, group_size={comm.group_size(self.group)}")
