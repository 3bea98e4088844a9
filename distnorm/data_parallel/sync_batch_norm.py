"""SyncBatchNorm: batch statistics of the whole data-parallel batch with one all-reduce each way.

The op is :mod:`distnorm.functional.batch_norm` (exact float64 moments ``[n·m, M2 + n·m², n]``, one
all-reduce of ``2C + 1`` forward, one of ``[Σdy, Σdy·x̂]`` backward; torch's native kernels when no
statistic crosses ranks). This module holds the drop-in ``nn.Module`` (:class:`SyncBatchNorm`),
torch's conversion helper (:func:`convert_sync_batchnorm`), the legacy functional form
(:func:`sync_batch_norm`) and the input checks the batch-norm family shares.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distnorm import comm
from distnorm.comm import Group
from distnorm.data_parallel._state import SKIPS, advances, first_run, init_state, skips_of
from distnorm.functional._norm_utils import check_params
from distnorm.functional.batch_norm import batch_norm_eval, batch_norm_train
from distnorm.functional.batch_stats import stats_dtype as _stats_dtype

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm"]


def _where(group: Group) -> str:
    return f"rank {comm.group_rank(group)} of {comm.group_size(group)}"


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (bf16/fp16 statistics are never kept)."""
    return _stats_dtype(x.dtype)


def check_input(
    x: torch.Tensor, num_features: int | None, channel_dim: int, mask: torch.Tensor | None, group: Group, where: str
) -> None:
    """Shape checks shared by the data-parallel batch norms (no host sync: shapes only).

    ``num_features=None`` skips the channel-count check.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{where}: input must be a floating-point tensor, got {got} ({_where(group)})")
    if x.dim() < 2:
        raise ValueError(
            f"{where}: input must have at least 2 dims (batch and channel), got shape {tuple(x.shape)} "
            f"({_where(group)})"
        )
    if num_features is not None and x.shape[channel_dim] != num_features:
        raise ValueError(
            f"{where}: input must have num_features = {num_features} channels on channel_dim={channel_dim}, "
            f"got shape {tuple(x.shape)} ({_where(group)})"
        )
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"{where}: mask must be a bool tensor (True = real element), got {mask.dtype} ({_where(group)})")
        c_dim = channel_dim % x.dim()
        expected = tuple(s for i, s in enumerate(x.shape) if i != c_dim)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"{where}: mask must have the input's shape without the channel dim {expected}, got "
                f"{tuple(mask.shape)} ({_where(group)})"
            )


def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    momentum: float | torch.Tensor = 0.1,
    eps: float = 1e-5,
    group: Group = None,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training-mode batch norm over the global batch of ``group``; updates running stats in place.

    ``x [N, C, *]`` (``channel_dim=1``) or ``[B, T, C]`` (``channel_dim=-1``), any float dtype ->
    ``y`` of ``x``'s shape and dtype. ``mask`` (bool, ``x``'s shape without the channel dim, True =
    real element) keeps padded elements out of the statistics. Statistics are float32 (float64
    for float64 inputs), merged exactly across ranks. ``running_mean``/``running_var`` [C] (or
    None) move by ``momentum`` (a float, or a 0-d tensor for torch's cumulative ``momentum=None``)
    towards the global mean and the global *unbiased* variance, as ``torch.nn.BatchNorm``.
    ``weight``/``bias`` gradients are this rank's share (sum over ranks = the one-process
    gradient), as in torch. See :func:`distnorm.functional.batch_norm.batch_norm_train`.
    ``weight``, ``bias`` and the running statistics must have shape ``[C]`` (a ValueError naming
    the one that does not). An activation checkpoint's recomputation (a call inside a backward,
    eager or compiled) leaves the running statistics alone: they advance once per step.

    Collectives (P > 1): fwd 1 all-reduce of 2C + 1 float64 (``[n·m, M2 + n·m², n]``, 8(2C + 1)
    bytes); bwd 1 all-reduce of 2C numbers (``[Σdy, Σdy·x̂]``, 8C bytes, 16C for float64), only when
    ``x`` needs a gradient. group None or P == 1: none. No host sync; a rank with an empty batch
    takes part.
    """
    check_input(x, None, channel_dim, mask, group, "sync_batch_norm")
    c = (x.shape[channel_dim],)
    check_params("sync_batch_norm", group, weight=(weight, c), bias=(bias, c), running_mean=(running_mean, c),
                 running_var=(running_var, c))
    update = True if running_mean is None else first_run(running_mean)
    return batch_norm_train(x, weight, bias, running_mean, running_var, momentum=momentum, eps=eps, group=group,
                            channel_dim=channel_dim, mask=mask, update=update, where="SyncBatchNorm")


class SyncBatchNorm(_BatchNorm):
    """Drop-in ``torch.nn.SyncBatchNorm`` with one all-reduce each way, masks and ``[B, T, C]``.

    Same constructor and state dict as ``torch.nn.SyncBatchNorm`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``): either loads the other's. The
    sixth positional argument is the process group, also accepted as ``group=`` (DESIGN's name) or
    ``process_group=`` (torch's). ``channel_dim`` is 1 (``[N, C, *]``) or -1 (``[B, T, C]``).

    ``forward(x, mask=None)``: training uses the exact statistics of the global batch over
    ``group`` (:func:`~distnorm.functional.batch_norm.batch_norm_train`; with ``group`` None or of
    size 1 and no mask, torch's own ``torch.batch_norm`` kernels); eval with running statistics is
    torch's eval kernel; eval without running statistics uses this rank's batch, like torch (no
    collectives in eval, so a single rank may evaluate alone).

    Collectives (P > 1, training): fwd 1 all-reduce of 2C + 1 float64 (8(2C + 1) bytes); bwd 1
    all-reduce of 2C float32 (8C bytes; 16C for float64 input). Eval, group None or P == 1: none.

    Composes like ``nn.BatchNorm`` and better: ``torch.compile(fullgraph=True)``; activation
    checkpointing (the recomputed forward does not update the running statistics again);
    ``reset_parameters()`` after meta-device init restores every buffer. Non-finite batches: the
    running statistics are not updated from a batch whose synced statistics are NaN/Inf (counted
    in the non-persistent buffer ``num_nonfinite_skips``, so the state dict keeps torch's keys;
    the output still propagates them) unless ``allow_nonfinite_stats=True``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group: Group = None,
        device: Any = None,
        dtype: Any = None,
        *,
        channel_dim: int = 1,
        process_group: Group = None,
        allow_nonfinite_stats: bool = False,
    ) -> None:
        cls = type(self).__name__
        comm.group_size(group if group is not None else process_group)  # a non-group is a TypeError naming it
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{cls}: num_features must be a positive int, got {num_features!r} ({_where(group)})")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{cls}: eps must be a finite float >= 0, got {eps!r} ({_where(group)})")
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"{cls}: momentum must be None or a float in [0, 1], got {momentum!r} ({_where(group)})")
        if channel_dim not in (1, -1):
            raise ValueError(f"SyncBatchNorm: channel_dim must be 1 or -1, got {channel_dim!r} ({_where(group)})")
        if group is not None and process_group is not None and group is not process_group:
            raise ValueError(
                f"SyncBatchNorm: group and process_group are aliases; got two different groups ({_where(group)})"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.group: Group = group if group is not None else process_group
        self.channel_dim = channel_dim
        init_state(self, allow_nonfinite_stats, device)

    @property
    def process_group(self) -> Group:
        """torch's name for :attr:`group`."""
        return self.group

    @process_group.setter
    def process_group(self, value: Group) -> None:
        self.group = value

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_input(input, self.num_features, self.channel_dim, None, self.group, type(self).__name__)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        skips = getattr(self, SKIPS, None)  # absent while _BatchNorm.__init__ runs
        if skips is not None:
            skips.zero_()

    def _check_params(self, x: torch.Tensor) -> None:
        c = (self.num_features,)
        check_params(type(self).__name__, self.group, weight=(self.weight, c), bias=(self.bias, c),
                     running_mean=(self.running_mean, c), running_var=(self.running_var, c))
        state = self.weight if self.weight is not None else self.running_mean
        if state is not None and state.device != x.device:
            raise ValueError(f"{type(self).__name__}: input must be on the module's device {state.device}, got "
                             f"{x.device} ({_where(self.group)})")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.num_features, self.channel_dim, mask, self.group, type(self).__name__)
        self._check_params(x)
        if not self.training and self.running_mean is not None and self.running_var is not None:
            return batch_norm_eval(x, self.weight, self.bias, self.running_mean, self.running_var, eps=self.eps,
                                   channel_dim=self.channel_dim)
        if not self.training:  # no running statistics: this rank's batch, as torch
            return batch_norm_train(x, self.weight, self.bias, eps=self.eps, channel_dim=self.channel_dim, mask=mask,
                                    where=type(self).__name__)
        track = self.track_running_stats and self.running_mean is not None
        momentum: float | torch.Tensor = 0.0 if self.momentum is None else self.momentum
        if track and self.momentum is None:  # torch's cumulative average, on the device
            assert self.num_batches_tracked is not None
            momentum = 1.0 / (self.num_batches_tracked + 1).to(torch.float64)
        return batch_norm_train(
            x, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            self.num_batches_tracked if track else None, momentum=momentum, eps=self.eps, group=self.group,
            channel_dim=self.channel_dim, mask=mask, skips=skips_of(self),
            update=advances(self),  # a checkpoint recomputation updates nothing
            where=type(self).__name__,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channel_dim={self.channel_dim}, group_size={comm.group_size(self.group)}"

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Group = None) -> nn.Module:
        """torch's class method, same signature: see :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: nn.Module, group: Group = None, *, channel_dim: int = 1) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm*d`` / ``torch.nn.SyncBatchNorm`` in ``module`` by
    :class:`SyncBatchNorm` on ``group``, copying parameters, buffers, ``requires_grad`` and the
    training flag; returns the (possibly new) root. Mirrors ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``;
    modules that already are distnorm norms are left as they are.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: module must be an nn.Module, got {type(module).__name__} "
                        f"({_where(group)})")
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, group,
            channel_dim=channel_dim,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, group, channel_dim=channel_dim))
    return out
