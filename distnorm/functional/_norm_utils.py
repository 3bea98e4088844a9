"""Shared pieces of the running-statistics norms: argument checks, masked reductions, synced sums.

Private: the public functional APIs live in ``power_norm.py``, ``unified_norm.py``,
``rep_batch_norm.py``, ``batch_channel_norm.py`` and ``evo_norm.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from distnorm import comm
from distnorm.comm import Group


def rank_of(group: Group) -> int:
    """Global rank for error messages (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else comm.group_rank(group)


def check_args(where: str, group: Group, num_features: object, eps: object) -> None:
    """Constructor checks shared by the running-statistics norms: group type, ``num_features``, ``eps``."""
    comm.group_size(group)  # a non-group is a TypeError naming it
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"{where}: num_features must be an int >= 1, got {num_features!r} (rank {rank_of(group)})")
    check_eps(where, "eps", eps, group)


def check_eps(where: str, name: str, value: object, group: Group) -> None:
    """An epsilon argument must be a finite float >= 0: a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {name} must be a finite float >= 0, got {value!r} (rank {rank_of(group)})")


def check_input(x: torch.Tensor, num_features: int, channel_dim: int, mask: torch.Tensor | None, where: str,
                module: nn.Module | None = None) -> int:
    """Validate ``x`` (and that it sits on ``module``'s device) and ``mask``; return the non-negative channel dim."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{where}: input must be a floating-point tensor, got {got} (rank {rank_of(None)})")
    state = None if module is None else next(iter((*module.parameters(), *module.buffers())), None)
    if state is not None and state.device != x.device:
        raise ValueError(f"{where}: input must be on the module's device {state.device}, got {x.device} "
                         f"(rank {rank_of(None)})")
    if x.dim() < 2:
        raise ValueError(f"{where}: input must have at least 2 dims [N, C, *] or [B, T, C], got shape "
                         f"{tuple(x.shape)} (rank {rank_of(None)})")
    c_dim = channel_dim % x.dim()
    if x.shape[c_dim] != num_features:
        raise ValueError(f"{where}: input has {x.shape[c_dim]} channels on channel_dim={channel_dim}, expected "
                         f"num_features={num_features} (shape {tuple(x.shape)}, rank {rank_of(None)})")
    if mask is not None:
        expected = tuple(s for i, s in enumerate(x.shape) if i != c_dim)
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(f"{where}: mask must be a bool tensor of the input's shape without the channel dim "
                             f"{expected}, got {mask.dtype} {tuple(mask.shape)} (rank {rank_of(None)})")
    return c_dim


def check_nonempty(n: torch.Tensor, where: str, group: Group) -> None:
    """Fail when the global batch (count ``n``, already all-reduced) has no real element.

    The count is data, so a host check would be the very sync the algorithms avoid:
    ``torch._assert_async`` checks it on the device (on CPU a RuntimeError at once, on CUDA a device
    assert at the next synchronisation; traceable by torch.compile). Every rank holds the same
    count, so all fail together and nobody hangs in the next collective.
    """
    torch._assert_async(
        n > 0,
        f"{where}: the global batch has no real elements (every rank's input is empty or fully masked) "
        f"in training mode (rank {comm.group_rank(group)} of {comm.group_size(group)})",
    )


def check_rows(x: torch.Tensor, c_dim: int, mask: torch.Tensor | None, where: str, group: Group) -> None:
    """Shape-only emptiness check: one rank, no mask and no element is a ValueError before any work."""
    if mask is None and comm.group_size(group) == 1 and x.numel() == 0:
        raise ValueError(f"{where}: the global batch has no real elements (input shape {tuple(x.shape)}) in "
                         f"training mode (rank {rank_of(group)})")


def check_params(where: str, group: Group, **params: tuple[torch.Tensor | None, tuple[int, ...]]) -> None:
    """Each ``name=(tensor, expected_shape)`` must have exactly that shape, as torch's own norms insist.

    A parameter of the wrong shape (assigned, loaded with ``strict=False``, or passed through
    ``torch.func.functional_call``) would otherwise broadcast silently. Shapes only: no host sync.
    """
    for name, (t, shape) in params.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{where}: parameter {name} must have shape {shape}, got {tuple(t.shape)} "
                             f"(rank {rank_of(group)})")


def commit_(targets: Sequence[torch.Tensor], new: Sequence[torch.Tensor], skips: torch.Tensor | None,
            gate: torch.Tensor | None = None) -> None:
    """Write ``new`` into the state tensors ``targets`` in place (no autograd), as one step.

    ``skips`` given (the non-finite guard): if every floating target is finite now and the update
    would make one NaN/Inf, nothing changes (every target keeps its value, counters included) and
    ``skips`` counts one. ``gate`` (a 0-d bool tensor) False: nothing changes, nothing is counted
    (a compiled forward that finds at run time that it is a recomputation). The decisions are
    device tensors (``torch.where``): no host sync, traceable; the guard costs two float64 sums.
    """
    with torch.no_grad():
        if skips is None and gate is None:
            for t, v in zip(targets, new, strict=True):
                t.copy_(v)
            return
        keep = None if gate is None else ~gate
        if skips is not None:
            floats = [i for i, t in enumerate(targets) if t.is_floating_point()]
            old_total = torch.cat([targets[i].reshape(-1) for i in floats]).sum(dtype=torch.float64)
            new_total = torch.cat([new[i].reshape(-1).to(targets[i].dtype) for i in floats]).sum(dtype=torch.float64)
            spoiled = torch.isfinite(old_total) & ~torch.isfinite(new_total)  # a NaN/Inf anywhere makes the sum one
            skips.add_((spoiled if gate is None else spoiled & gate).to(skips.dtype))
            keep = spoiled if keep is None else keep | spoiled
        assert keep is not None
        for t, v in zip(targets, new, strict=True):
            t.copy_(torch.where(keep, t, v.to(t.dtype)))


def pack_state(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The values of ``tensors`` (running statistics, counters) as one float64 vector (plus one 0).

    The one layout in which a norm's step function receives its state (the trailing 0 included:
    :func:`~distnorm.functional.unified_norm.unified_norm_step` indexes from the end). Eagerly, and
    compiled without gradients, the state is read this way; a compiled training forward with
    gradients reads it through ``distnorm::read_snapshot``
    (:mod:`distnorm.data_parallel._state`), because the AOT partitioner may recompute the read in
    the backward after the forward updated the buffers (pytorch/pytorch#197039).
    """
    parts = [t.detach().reshape(-1).double() for t in tensors]
    return torch.cat([*parts, parts[0].new_zeros(1)])


def inside_backward() -> bool:
    """Whether this runs inside a backward (activation checkpointing's recomputation runs there)."""
    return torch._C._current_graph_task_id() != -1


@torch.library.custom_op("distnorm::read_state_once", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _read_state_once(state: list[torch.Tensor], message: str) -> torch.Tensor:
    if inside_backward():
        raise RuntimeError(message)
    return pack_state(state)


@_read_state_once.register_fake
def _(state: list[torch.Tensor], message: str) -> torch.Tensor:
    return state[0].new_empty(sum(t.numel() for t in state) + 1, dtype=torch.float64)


def read_state_once(state: Sequence[torch.Tensor], where: str) -> torch.Tensor:
    """:func:`pack_state` for a functional op that advances ``state`` in place: a RuntimeError when
    it runs inside a backward, where a recomputation (activation checkpointing) would read the
    state already advanced. Compiled, a custom op asks at run time (the partitioner's
    recomputation of a checkpointed region, or under an activation memory budget, runs it there).
    """
    message = (f"{where}: activation checkpointing recomputes this functional call, which reads and advances the "
               f"state tensors it is given, so the recomputation would read them already advanced and not be "
               f"exact. Use the module (it keeps the state its forward read) or keep the call out of the "
               f"checkpointed region (rank {rank_of(None)})")
    if torch.compiler.is_compiling():
        return torch.ops.distnorm.read_state_once(list(state), message)
    if inside_backward():
        raise RuntimeError(message)
    return pack_state(state)


def unpack_state(packed: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_state` (trailing elements ignored): float64 views shaped like ``like``."""
    sizes = [t.numel() for t in like]
    parts = packed.split([*sizes, packed.numel() - sum(sizes)])
    return [p.view(t.shape) for p, t in zip(parts, like, strict=False)]


def vec_shape(x: torch.Tensor, c_dim: int) -> list[int]:
    """Shape that broadcasts a per-channel ``[C]`` vector against ``x``."""
    shape = [1] * x.dim()
    shape[c_dim] = x.shape[c_dim]
    return shape


def mask_weight(x: torch.Tensor, c_dim: int, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``mask`` as a ``dtype`` tensor broadcastable against ``x`` (None when no mask)."""
    return None if mask is None else mask.to(dtype).unsqueeze(c_dim)


def channel_sum(t: torch.Tensor, c_dim: int, w: torch.Tensor | None) -> torch.Tensor:
    """``sum(t * w)`` over every dim but ``c_dim`` -> ``[C]``."""
    dims = [d for d in range(t.dim()) if d != c_dim]
    return (t if w is None else t * w).sum(dims)


def real_count(x: torch.Tensor, c_dim: int, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Number of real elements per channel on this rank, shape ``[1]``."""
    if mask is None:
        return torch.full((1,), x.numel() // max(x.shape[c_dim], 1), dtype=dtype, device=x.device)
    return mask.to(dtype).sum().reshape(1)


def synced_second_moment(
    x: torch.Tensor, c_dim: int, mask: torch.Tensor | None, group: Group, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean of ``x²`` over the real elements of the global batch: ``(x2 [C] float64, n [])``.

    No mean subtraction, so no cancellation: the raw sums ``[Σx², n]`` (stats dtype) travel as they
    are. No autograd. An empty global batch fails (:func:`check_nonempty`).
    Collectives (P > 1): 1 all-reduce of ``C + 1`` numbers in the stats dtype.
    """
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        sums = torch.cat([channel_sum(x.to(sdt).square(), c_dim, mask_weight(x, c_dim, mask, sdt)),
                          real_count(x, c_dim, mask, sdt)])
        comm.all_reduce_(sums, group)
        n = sums[-1]
        check_nonempty(n, where, group)
        return sums[:-1].double() / n.double(), n


def group_moments(
    x: torch.Tensor, c_dim: int, groups: int, mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel-group mean and biased variance over (C/G channels x real positions).

    ``x [N, ..C.., *]`` -> ``(mean, var)`` each shaped to broadcast against ``x`` (dim 0 is the
    sample). Masked positions are excluded; a sample with no real position gets mean 0, var 0.
    Local: no collectives. Differentiable.
    """
    xc = x.to(dtype).movedim(c_dim, 1)
    n, c = xc.shape[0], xc.shape[1]
    rest = xc.shape[2:]
    xg = xc.reshape(n, groups, c // groups, rest.numel())  # explicit: an empty rank has n == 0
    if mask is None:
        cnt = torch.full((), float(xg.shape[2] * xg.shape[3]), dtype=dtype, device=x.device)
        mean = xg.mean((2, 3), keepdim=True)
        var = (xg - mean).square().mean((2, 3), keepdim=True)
    else:
        w = mask.to(dtype).reshape(n, 1, 1, rest.numel())
        cnt = (w.sum((2, 3), keepdim=True) * (c // groups)).clamp_min(1)
        mean = (xg * w).sum((2, 3), keepdim=True) / cnt
        var = ((xg - mean).square() * w).sum((2, 3), keepdim=True) / cnt

    def back(s: torch.Tensor) -> torch.Tensor:
        full = s.expand(n, groups, c // groups, 1).reshape(n, c, *([1] * len(rest)))
        return full.movedim(1, c_dim)

    return back(mean), back(var)


def group_moments_ref(x: torch.Tensor, c_dim: int, groups: int, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference of :func:`group_moments`: boolean indexing, one sample and group at a time."""
    xc = x.double().movedim(c_dim, -1)  # [N, *S, C]
    n, c = xc.shape[0], xc.shape[-1]
    mean = torch.zeros(n, c, dtype=torch.float64)
    var = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        rows = xc[i].reshape(-1, c)
        if mask is not None:
            rows = rows[mask[i].reshape(-1)]
        if rows.shape[0] == 0:
            continue
        for g in range(groups):
            sl = slice(g * (c // groups), (g + 1) * (c // groups))
            vals = rows[:, sl]
            mean[i, sl] = vals.mean()
            var[i, sl] = vals.var(unbiased=False)
    shape = [n] + [1] * (x.dim() - 2) + [c]
    return mean.reshape(shape).movedim(-1, c_dim), var.reshape(shape).movedim(-1, c_dim)


def rows_ref(x: torch.Tensor, c_dim: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Float64 ``[real rows, C]`` of ``x`` (boolean indexing: a reference-only helper)."""
    rows = x.double().movedim(c_dim, -1)
    return rows.reshape(-1, x.shape[c_dim]) if mask is None else rows[mask]


def scale_shift_fold(
    second_moment: torch.Tensor, eps: float, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval form ``y = x / sqrt(m + eps) * weight + bias`` as ``(scale, shift)`` (fp32 ``[C]`` each).

    The running-second-moment norms (PowerNorm, UnifiedNorm) normalise without centring, so their
    eval form is this per-channel affine map, foldable into a neighbouring Linear.
    """
    scale = torch.rsqrt(second_moment.float() + eps)
    shift = torch.zeros_like(scale)
    if weight is not None:
        scale = scale * weight.detach().float()
    if bias is not None:
        shift = bias.detach().float().clone()
    return scale, shift

