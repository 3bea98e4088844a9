"""RepBatchNorm and ProgressiveRepBN (SLAB) with batch statistics synced over the DP group."""

from __future__ import annotations

import torch
from torch import nn

from distnorm import comm
from distnorm.comm import Group
from distnorm.data_parallel._state import (
    SKIPS,
    advances,
    commit_state,
    init_snapshot,
    init_state,
    read_state,
    reset_snapshot,
    skips_of,
    track_backward,
)
from distnorm.functional._norm_utils import check_args, check_input, check_params, check_rows, rank_of
from distnorm.functional.rep_batch_norm import layer_norm_channels, progressive_lambda, rep_batch_norm

__all__ = ["ProgressiveRepBN", "RepBatchNorm"]


class RepBatchNorm(nn.Module):
    """RepBN (Guo et al., 2024): ``y = BatchNorm(x) + alpha * x``, ``alpha`` a learnable scalar (init 1).

    ``x [B, T, C]`` (``channel_dim=-1``, default) or ``[N, C, *]`` (``channel_dim=1``) -> same shape
    and dtype; optional bool ``mask`` (True = real token) keeps padding out of the statistics. The
    BatchNorm statistics are those of the global batch over ``group`` (exactly one process on the
    concatenated batch; ranks with an empty batch take part). Eval is one per-channel affine map,
    :meth:`fold_scale_shift`.

    Collectives in training (P > 1): fwd 1 all-reduce of ``2C + 1`` float64 numbers (exact
    moments ``[n·m, M2 + n·m², n]``); bwd 1 all-reduce of ``2C`` fp32 numbers (``[Σdy, Σdy·x̂]``;
    fp64 for fp64 input). Eval, ``group`` None or P == 1: none; ``group`` None or P == 1 without a
    mask runs torch's native batch-norm kernels. A checkpoint recomputation updates nothing.

    Non-finite batches: the running statistics are not updated from a batch whose synced statistics
    are NaN/Inf (counted in the non-persistent buffer ``num_nonfinite_skips``; the output still
    propagates them) unless ``allow_nonfinite_stats=True``.
    """

    running_stat_buffers: tuple[str, ...] = ("running_mean", "running_var")
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        *,
        group: Group = None,
        channel_dim: int = -1,
        allow_nonfinite_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_args("RepBatchNorm", group, num_features, eps)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"RepBatchNorm: momentum must be None or in [0, 1], got {momentum} (rank {rank_of(group)})")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.group, self.channel_dim = group, channel_dim
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
            self.bias = nn.Parameter(torch.empty(num_features, **factory))  # type: ignore[arg-type]
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.alpha = nn.Parameter(torch.empty(1, **factory))  # type: ignore[arg-type]
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=torch.float32))
        self.register_buffer("num_batches_tracked", torch.zeros((), device=device, dtype=torch.long))
        init_state(self, allow_nonfinite_stats, device)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        getattr(self, SKIPS).zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.alpha)
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        c_dim = check_input(x, self.num_features, self.channel_dim, mask, "RepBatchNorm", self)
        c = (self.num_features,)
        check_params("RepBatchNorm", self.group, weight=(self.weight, c), bias=(self.bias, c), alpha=(self.alpha, (1,)))
        if self.training:
            check_rows(x, c_dim, mask, "RepBatchNorm", self.group)
        return rep_batch_norm(
            x, self.weight, self.bias, self.alpha, self.running_mean, self.running_var, self.num_batches_tracked,
            training=self.training, momentum=self.momentum, eps=self.eps, channel_dim=self.channel_dim, mask=mask,
            group=self.group, update=advances(self), skips=skips_of(self))

    def fold_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval form as a per-channel affine map ``y = x * scale + shift`` (fp32 ``[C]`` each)."""
        rstd = torch.rsqrt(self.running_var.float() + self.eps)
        w = self.weight.detach().float() if self.affine else torch.ones_like(rstd)
        b = self.bias.detach().float() if self.affine else torch.zeros_like(rstd)
        return w * rstd + self.alpha.detach().float(), b - w * rstd * self.running_mean.float()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"channel_dim={self.channel_dim}, group_size={comm.group_size(self.group)}")


class ProgressiveRepBN(nn.Module):
    """PRepBN (SLAB): ``y = lam * LayerNorm(x) + (1 - lam) * RepBN(x)`` while training; RepBN in eval.

    ``lam = clamp((warmup_steps + decay_steps - step) / decay_steps, 0, 1)``: pure LayerNorm for
    ``warmup_steps`` training forwards, then a linear decay to pure RepBN over ``decay_steps``.
    ``step`` is a buffer (saved and restored with the state dict, so a resumed run continues the
    schedule) and advances once per training forward. The schedule must finish inside training:
    ``warmup_steps + decay_steps > total_steps`` is a ValueError (SLAB issue #6: a model evaluated
    as RepBN that never trained as one). Both branches are computed at every step (``lam`` is a
    tensor: no host sync), so RepBN's running statistics are warm when the decay starts.

    Shapes, ``mask`` and collectives: those of :class:`RepBatchNorm` (the LayerNorm is per token,
    local); eval, ``group`` None or P == 1: none.

    Non-finite batches: the running statistics are not updated from a batch whose synced statistics
    are NaN/Inf (counted in the non-persistent buffer ``num_nonfinite_skips``; the output still
    propagates them) unless ``allow_nonfinite_stats=True``.
    """

    running_stat_buffers: tuple[str, ...] = ()  # the statistics live in the RepBatchNorm child
    step: torch.Tensor

    def __init__(
        self,
        num_features: int,
        *,
        decay_steps: int,
        total_steps: int,
        warmup_steps: int = 0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        group: Group = None,
        channel_dim: int = -1,
        allow_nonfinite_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        rank = rank_of(group)
        if decay_steps < 1 or warmup_steps < 0:
            raise ValueError(f"ProgressiveRepBN: decay_steps must be >= 1 and warmup_steps >= 0, got "
                             f"decay_steps={decay_steps}, warmup_steps={warmup_steps} (rank {rank})")
        if warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"ProgressiveRepBN: the LayerNorm->RepBN schedule ends at step warmup_steps + decay_steps = "
                f"{warmup_steps + decay_steps}, after training ends at total_steps = {total_steps}; the model "
                f"would be evaluated as RepBN without having trained as one. Expected warmup_steps + "
                f"decay_steps <= total_steps (rank {rank})"
            )
        self.num_features, self.warmup_steps, self.decay_steps, self.total_steps = (
            num_features, warmup_steps, decay_steps, total_steps)
        self.channel_dim = channel_dim
        self.layer_norm = nn.LayerNorm(num_features, eps=eps, device=device, dtype=dtype)
        self.rep_bn = RepBatchNorm(num_features, eps, momentum, group=group, channel_dim=channel_dim,
                                   allow_nonfinite_stats=allow_nonfinite_stats, device=device, dtype=dtype)
        self.register_buffer("step", torch.zeros((), device=device, dtype=torch.long))
        init_snapshot(self, ("step",), device)

    def reset_running_stats(self) -> None:
        """Fresh statistics (the RepBatchNorm branch's) and a schedule back at step 0."""
        self.rep_bn.reset_running_stats()
        self.step.zero_()
        reset_snapshot(self)

    def reset_parameters(self) -> None:
        """A freshly constructed module's parameters and buffers (after ``to_empty()`` from meta too)."""
        self.layer_norm.reset_parameters()
        self.rep_bn.reset_parameters()
        self.step.zero_()
        reset_snapshot(self)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.num_features, self.channel_dim, mask, "ProgressiveRepBN", self)
        c = (self.num_features,)
        check_params("ProgressiveRepBN", self.rep_bn.group, **{"layer_norm.weight": (self.layer_norm.weight, c),
                                                               "layer_norm.bias": (self.layer_norm.bias, c)})
        if not self.training:
            return self.rep_bn(x, mask)
        # the schedule's clock, as this step's first forward read it (checkpoint recomputation, compile)
        step, fresh = read_state(self, ("step",), x)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # one cast for both branches' grads
        lam = progressive_lambda(step[0], self.warmup_steps, self.decay_steps).to(xs.dtype)
        y_ln = layer_norm_channels(xs, self.layer_norm.weight, self.layer_norm.bias, self.layer_norm.eps, self.channel_dim)
        y_bn = self.rep_bn(xs, mask)
        commit_state([self.step], [step[0] + 1], fresh, None)  # a clock: it advances even past a skipped batch
        return track_backward(self, x, (lam * y_ln + (1 - lam) * y_bn).to(x.dtype))

    def fold_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval form (pure RepBN) as a per-channel affine map; see :meth:`RepBatchNorm.fold_scale_shift`."""
        return self.rep_bn.fold_scale_shift()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, warmup_steps={self.warmup_steps}, decay_steps={self.decay_steps}, "
                f"total_steps={self.total_steps}, channel_dim={self.channel_dim}")
