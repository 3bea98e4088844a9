"""Running statistics across data-parallel ranks: sync, broadcast, exact recalibration.

Which buffers are statistics is decided by module *type*, never by buffer name:

* ``torch.nn.modules.batchnorm._NormBase`` subclasses (``BatchNorm*d``, ``SyncBatchNorm``,
  ``InstanceNorm*d``, distnorm's :class:`SyncBatchNorm` and :class:`AlphaBatchNorm`) that track
  running stats: ``running_mean``, ``running_var``, ``num_batches_tracked``;
* any class with a class attribute ``running_stat_buffers: tuple[str, ...]`` naming its
  statistics buffers (distnorm's PowerNorm, UnifiedNorm, ... declare it; so can user classes).

A user buffer that happens to be called ``running_var`` in any other module is never touched.
Floating buffers are averaged / broadcast; integer counters (``num_batches_tracked``) are only
broadcast (ranks stepping in lockstep already agree on them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from distnorm import comm
from distnorm.comm import Group
from distnorm.functional.batch_stats import local_moments, merge_moments

__all__ = ["broadcast_running_stats", "recalibrate", "running_stat_buffers", "sync_running_stats"]

_NORM_BASE_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def running_stat_buffers(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s own statistics buffers (empty for modules that keep none)."""
    declared = getattr(type(module), "running_stat_buffers", None)
    if declared is not None:
        return tuple(declared)
    if isinstance(module, _NormBase) and module.track_running_stats:
        return _NORM_BASE_BUFFERS
    return ()


def _stat_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, module in model.named_modules():
        for name in running_stat_buffers(module):
            buf = module._buffers.get(name)
            if buf is not None:
                yield (f"{prefix}.{name}" if prefix else name), buf


def _coalesced(tensors: list[torch.Tensor], op: Callable[[torch.Tensor], object]) -> None:
    """Run ``op`` once per (dtype, device) on a flat copy of ``tensors``, then copy back."""
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        op(flat)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            t.copy_(part.view_as(t))


def _check_model(model: object, where: str, group: Group) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__} "
                        f"(rank {comm.group_rank(group)} of {comm.group_size(group)})")


@torch.no_grad()
def sync_running_stats(model: nn.Module, group: Group, op: str = "mean") -> nn.Module:
    """Reduce every floating statistics buffer of ``model`` over ``group`` in place.

    ``op``: ``"mean"`` (average over ranks, e.g. before evaluating or checkpointing a model
    trained with local BatchNorm), ``"sum"``, ``"max"``, ``"min"``. Note that the mean of running
    variances is not the variance of the pooled data; :func:`recalibrate` computes that.
    Collectives (P > 1): 1 all-reduce per buffer dtype (one for a float32 model), payload = the
    total bytes of the floating statistics buffers. group None or P == 1: none.
    """
    _check_model(model, "sync_running_stats", group)
    if op not in ("mean", "sum", "max", "min"):
        raise ValueError(
            f"sync_running_stats: op must be 'mean', 'sum', 'max' or 'min', got {op!r} "
            f"(rank {comm.group_rank(group)} of {comm.group_size(group)})"
        )
    world = comm.group_size(group)
    if world == 1:
        return model
    floating = [t for _, t in _stat_tensors(model) if t.is_floating_point()]

    def reduce(flat: torch.Tensor) -> None:
        comm.all_reduce_(flat, group, op="sum" if op == "mean" else op)
        if op == "mean":
            flat.div_(world)

    _coalesced(floating, reduce)
    return model


@torch.no_grad()
def broadcast_running_stats(model: nn.Module, src: int, group: Group) -> nn.Module:
    """Copy every statistics buffer (counters too) of rank ``src`` of ``group`` to all ranks.

    Collectives (P > 1): 1 broadcast per buffer dtype (typically float32 + int64: 2).
    group None or P == 1: none.
    """
    _check_model(model, "broadcast_running_stats", group)
    world = comm.group_size(group)
    if not isinstance(src, int) or not 0 <= src < world:
        raise ValueError(
            f"broadcast_running_stats: src must be a rank in [0, {world}) of the group, got {src!r} "
            f"(rank {comm.group_rank(group)} of {world})"
        )
    if world == 1:
        return model
    _coalesced([t for _, t in _stat_tensors(model)], lambda flat: comm.broadcast_(flat, src, group))
    return model


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any], group: Group = None) -> nn.Module:
    """Set every batch norm's running stats to the exact population statistics of its input.

    What it computes. Every ``_BatchNorm`` in ``model`` that tracks running stats (torch's
    ``BatchNorm*d``/``SyncBatchNorm``, distnorm's :class:`SyncBatchNorm`/:class:`AlphaBatchNorm`)
    is put in training mode, every other module in eval mode (dropout off), and ``model`` runs on
    each local batch (a tensor, a tuple of args or a dict of kwargs) without gradients. So each
    norm normalises with its batch statistics exactly as in training, and sees the input training
    would give it. A forward pre-hook accumulates, in float64, the exact per-channel moments
    ``[n·(m - s), M2 + n·(m - s)², n]`` (per batch two-pass, :func:`local_moments`) of every element the norm sees (``mask=`` keyword
    respected; ``s`` = the old running mean). After the last batch, one all-reduce over ``group``
    of all norms' sums together gives the population over every batch of every rank, and

        running_mean = population mean,  running_var = population unbiased variance,

    the same numbers one process would get running all ranks' batches (each rank's batches
    through a local norm; through a synced norm, the batches that ran together concatenated).
    A norm that saw no element keeps its statistics; training flags are restored;
    ``num_batches_tracked`` is left as it was.

    Ranks may run different numbers of batches if the norms are local; synced norms communicate
    in every forward, so then every rank must run the same number. Other statistics-bearing
    modules (``running_stat_buffers``) run in eval mode and are not changed.
    Collectives (P > 1): those of the forwards, plus 1 all-reduce of sum over norms of
    (2C + 1) float64. group None or P == 1: only those of the forwards.
    """
    _check_model(model, "recalibrate", group)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]
    modes = {m: m.training for m in model.modules()}
    # shift = the running mean before the passes (identical on every rank, close to the data)
    shifts: dict[nn.Module, torch.Tensor] = {m: m.running_mean.detach().double().clone() for m in norms}  # type: ignore[union-attr]
    sums: dict[nn.Module, torch.Tensor] = {m: shifts[m].new_zeros(2 * m.num_features + 1) for m in norms}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        sums[module] += local_moments(args[0], getattr(module, "channel_dim", 1), mask, shifts[module])

    saved = {m: [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None] for m in norms}
    handles = []
    try:
        model.eval()
        for m in norms:
            m.train()
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        for batch in batches:
            _call(model, batch)
        if norms:
            flat = torch.cat([sums[m] for m in norms])
            comm.all_reduce_(flat, group)
            for m, part in zip(norms, flat.split([2 * m.num_features + 1 for m in norms]), strict=True):
                mean, var, n = merge_moments(part, shifts[m])
                var = var * (n / (n - 1).clamp_min(1))
                seen = n > 0
                m.running_mean.copy_(torch.where(seen, mean, shifts[m]))  # type: ignore[union-attr]
                m.running_var.copy_(torch.where(seen, var, saved[m][1].double()))  # type: ignore[union-attr]
        for m in norms:  # the training-mode forwards counted steps: undo that
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(saved[m][2])
    except BaseException:
        for m in norms:  # leave the model as it was
            for t, old in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved[m]):
                t.copy_(old)  # type: ignore[union-attr]
        raise
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes.items():
            module.training = mode
    return model

