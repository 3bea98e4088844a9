"""Training state that advances exactly once per step: under activation checkpointing, torch.compile
(and both together) and non-finite batches.

Running statistics, step counters and windows advance in the training forward, as in
``nn.BatchNorm``. A checkpoint's recomputation runs the forward again, inside the backward: it
must neither advance the state a second time (``nn.BatchNorm`` does) nor read the state the first
forward already advanced (PowerNorm, UnifiedNorm, ProgressiveRepBN and BatchChannelNorm read it).
This module is the one place that handles it for every norm of :mod:`distnorm.data_parallel`:

* **Eager checkpointing** (non-reentrant, reentrant, selective). A forward that runs inside a
  backward (``torch._C._current_graph_task_id() != -1``) is a recomputation: it advances nothing,
  and a norm whose output depends on its state uses the values its first forward read, stashed by
  that forward when it could be recomputed later (it ran under saved-tensor hooks — non-reentrant
  or selective checkpoint — or inside an autograd.Function's forward, gradients and forward-mode
  AD off — reentrant checkpoint; a forward under ``torch.no_grad()`` or inference mode is neither
  and leaves pending stashes alone). If a recomputation finds no stashed state or more than one
  (several forwards of the module await their backward: pipeline schedules, a module used twice
  in one checkpointed region) it raises a RuntimeError: an exact answer is impossible, a wrong
  one is never given.
* **torch.compile** traces the forward once, so the compiled graph learns at run time whether it
  is a recomputation, from two custom ops that ask the autograd engine when they run
  (:func:`~distnorm.functional._norm_utils.inside_backward`). ``distnorm::first_run`` gates every
  in-place update: an eager checkpoint around a compiled module re-runs the compiled forward in
  the backward, which then advances nothing. A training forward that will have a backward reads
  its state through ``distnorm::read_snapshot``: in a forward it returns the buffers' values and
  a ticket, which the forward also writes into ``_recompute_snapshot`` / ``_recompute_counters``
  (:func:`init_snapshot`); inside a backward it returns that snapshot instead. That is where the min-cut partitioner recomputes
  every op of a checkpointed region (and any op under an activation memory budget), after the
  forward has advanced the buffers: so torch.compile around ``checkpoint`` (non-reentrant,
  selective; dynamo traces reentrant as non-reentrant), an eager non-reentrant checkpoint around a
  compiled module, and a memory budget are exact. A snapshot holds only the last forward's state:
  the recomputation checks on the device (``torch._assert_async``, no host sync) that exactly one
  training forward ran since the last backward through this module (``_recompute_backwards``,
  counted by :func:`track_backward`'s backward), and otherwise fails with a message naming the
  module, the causes (several forwards before one backward; a training-mode forward with
  gradients whose backward never ran; a reentrant checkpoint around the compiled module, whose
  first forward runs without gradients and writes no snapshot) and the fixes. Without a
  recomputation nothing is checked: several compiled forwards before one backward are fine. (On
  CUDA a failed check is a device-side assert, which ends the process's CUDA context.) No state
  value the backward needs is read from a buffer after the forward updated it
  (pytorch/pytorch#197039).
* **Non-finite batches**: the update goes through :func:`~distnorm.functional._norm_utils.commit_`,
  which keeps every buffer as it was when a finite one would turn NaN/Inf and counts the skip in
  ``num_nonfinite_skips`` (non-persistent, so state dicts keep torch's keys), unless
  ``allow_nonfinite_stats=True``. No host sync.

The snapshot buffers are non-persistent (not in state dicts), eager forwards keep them as compiled
ones do (eager and compiled modules hold the same buffers), and ``reset_running_stats()`` zeroes
them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from distnorm.functional._norm_utils import commit_, inside_backward, pack_state, rank_of

__all__ = [
    "GRAD_SKIPS",
    "SKIPS",
    "advances",
    "commit_state",
    "first_run",
    "init_snapshot",
    "init_state",
    "read_state",
    "recomputing",
    "reset_snapshot",
    "skips_of",
    "track_backward",
]

SKIPS = "num_nonfinite_skips"
GRAD_SKIPS = "num_nonfinite_grad_skips"  # backward-updated statistics (PowerNorm's, UnifiedNorm's ema_gz)
SNAPSHOT = "_recompute_snapshot"  # floating state the last training forward read
COUNTERS = "_recompute_counters"  # its integer state, then its ticket (training forwards so far)
BACKWARDS = "_recompute_backwards"  # backwards run through those forwards
_STASH = "_distnorm_recompute_stash"
_STASH_LIMIT = 8  # forwards that were never recomputed (e.g. under CPU offload hooks) age out


def init_state(module: nn.Module, allow_nonfinite_stats: bool, device: torch.device | str | None,
               backward_stats: bool = False) -> None:
    """Set ``module.allow_nonfinite_stats`` and register the skip counters (not persistent).

    ``num_nonfinite_skips`` counts skipped forward updates; with ``backward_stats`` (statistics of
    the gradients, updated in the backward) ``num_nonfinite_grad_skips`` counts skipped backward
    updates. Two counters, because a buffer updated in both the forward and the backward graph
    trips torch.compile's partitioner.
    """
    module.allow_nonfinite_stats = bool(allow_nonfinite_stats)  # type: ignore[assignment]
    for name in (SKIPS, GRAD_SKIPS) if backward_stats else (SKIPS,):
        module.register_buffer(name, torch.zeros((), dtype=torch.long, device=device), persistent=False)


def init_snapshot(module: nn.Module, names: Sequence[str], device: torch.device | str | None) -> None:
    """Register the non-persistent buffers of the snapshot the named state is recomputed from.

    ``_recompute_snapshot`` (``[floating numel]``, the floating state's dtype) and
    ``_recompute_counters`` (int64 ``[integer numel + 1]``): the named buffers as the last training
    forward that may have a backward read them, then a ticket (how many such forwards ran);
    ``_recompute_backwards`` (int64 ``[]``): how many backwards ran through them. The snapshot
    holds the floating state exactly because ``module.to(dtype)`` / ``.half()`` convert it with
    the state; integers apart, so no conversion rounds a step counter. Eager forwards keep them
    as compiled ones do (only compiled recomputations read them), so eager and compiled modules
    hold the same buffers.
    """
    state = [getattr(module, n) for n in names]
    floating = [t for t in state if t.is_floating_point()]
    dtypes = {t.dtype for t in floating}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    integer = sum(t.numel() for t in state if not t.is_floating_point())
    module.register_buffer(SNAPSHOT, torch.zeros(sum(t.numel() for t in floating), dtype=dtype, device=device),
                           persistent=False)
    module.register_buffer(COUNTERS, torch.zeros(integer + 1, dtype=torch.long, device=device), persistent=False)
    module.register_buffer(BACKWARDS, torch.zeros((), dtype=torch.long, device=device), persistent=False)


def reset_snapshot(module: nn.Module) -> None:
    """Zero the snapshot and its counters (part of ``reset_running_stats``)."""
    for name in (SNAPSHOT, COUNTERS, BACKWARDS):
        getattr(module, name).zero_()


def skips_of(module: nn.Module, name: str = SKIPS) -> torch.Tensor | None:
    """The skip counter ``name`` when the non-finite guard is on, else None (updates go through unguarded)."""
    return None if getattr(module, "allow_nonfinite_stats", True) else getattr(module, name)


def recomputing() -> bool:
    """Whether this eager forward runs inside a backward: activation checkpointing's recomputation.

    Always False while torch.compile traces: a compiled forward learns it at run time
    (:func:`advances`, :func:`read_state`).
    """
    if torch.compiler.is_compiling():
        return False
    return inside_backward()


@torch.library.custom_op("distnorm::first_run", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _first_run(anchor: torch.Tensor) -> torch.Tensor:
    """``True`` (0-d bool on ``anchor``'s device) unless this runs inside a backward, i.e. is a
    recomputation. A custom op, so a compiled graph asks at run time; ``anchor`` (any state tensor)
    keeps it from being constant-folded and gives the device."""
    return torch.full((), not inside_backward(), dtype=torch.bool, device=anchor.device)


@_first_run.register_fake
def _(anchor: torch.Tensor) -> torch.Tensor:
    return anchor.new_empty((), dtype=torch.bool)


@torch.library.custom_op("distnorm::read_snapshot", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _read_snapshot(state: list[torch.Tensor], snapshot: torch.Tensor, counters: torch.Tensor, backwards: torch.Tensor,
                   message: str) -> torch.Tensor:
    """The state a compiled training forward reads: float64 ``[pack_state(state), ticket, first]``.

    A forward (not inside a backward): :func:`pack_state` of ``state``, ticket = the last one + 1,
    first = 1 (the caller writes them into ``snapshot``/``counters`` and advances the state). A
    recomputation (inside a backward): the snapshot in the same layout, its ticket, first = 0,
    after a device-side check that the snapshot is the one of the forward being recomputed:
    exactly one training forward since the last backward (ticket == backwards + 1), else
    ``message``.
    """
    if not inside_backward():
        ticket = counters[-1:].double() + 1
        return torch.cat([pack_state(state), ticket, ticket.new_ones(1)])
    torch._assert_async(counters[-1] == backwards + 1, message)
    floating, integer = iter(snapshot.double().split(_sizes(state, True))), iter(counters.double().split(_sizes(state, False)))
    parts = [next(floating) if t.is_floating_point() else next(integer) for t in state]
    return torch.cat([*parts, parts[0].new_zeros(1), counters[-1:].double(), parts[0].new_zeros(1)])


@_read_snapshot.register_fake
def _(state: list[torch.Tensor], snapshot: torch.Tensor, counters: torch.Tensor, backwards: torch.Tensor,
      message: str) -> torch.Tensor:
    return snapshot.new_empty(snapshot.numel() + counters.numel() + 2, dtype=torch.float64)


def _sizes(state: Sequence[torch.Tensor], floating: bool) -> list[int]:
    """numel of each floating (or integer) tensor of ``state``, in order; the counters' ticket last."""
    sizes = [t.numel() for t in state if t.is_floating_point() == floating]
    return sizes if floating else [*sizes, 1]


def _write_snapshot(module: nn.Module, state: Sequence[torch.Tensor], packed: torch.Tensor,
                    ticket: torch.Tensor) -> None:
    """Store ``packed`` (:func:`pack_state` of ``state``) and ``ticket`` ``[1]`` in the snapshot buffers."""
    parts = packed.split([*(t.numel() for t in state), packed.numel() - sum(t.numel() for t in state)])
    floating = [p for p, t in zip(parts, state, strict=False) if t.is_floating_point()]
    integer = [p for p, t in zip(parts, state, strict=False) if not t.is_floating_point()]
    with torch.no_grad():
        if floating:
            getattr(module, SNAPSHOT).copy_(torch.cat(floating))
        getattr(module, COUNTERS).copy_(torch.cat([*integer, ticket.to(packed.dtype)]))


def advances(module: nn.Module) -> bool | torch.Tensor:
    """Whether this forward advances ``module``'s state: training, and not a recomputation.

    Eager: a bool. Compiled: a 0-d bool tensor decided at run time (an eager checkpoint around a
    compiled module re-runs its compiled forward inside the backward).
    """
    return module.training and first_run(getattr(module, SKIPS))


def first_run(anchor: torch.Tensor) -> bool | torch.Tensor:
    """Whether this forward is a first run, not a recomputation inside a backward.

    Eager: a bool. Compiled: a 0-d bool tensor on ``anchor``'s device (``anchor``: any state
    tensor), decided at run time by ``distnorm::first_run``.
    """
    if torch.compiler.is_compiling():
        return torch.ops.distnorm.first_run(anchor)
    return not inside_backward()


def _may_be_recomputed() -> bool:
    """Whether an eager checkpoint may recompute this forward later.

    Non-reentrant (and selective) checkpoint runs the first forward under its saved-tensor hooks;
    reentrant checkpoint runs it inside an autograd.Function's forward, where forward-mode AD is
    off as well as gradients (under ``torch.no_grad()`` alone it is on; inference mode is not a
    checkpoint either).
    """
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return True
    return not (torch.is_grad_enabled() or torch._C._is_fwd_grad_enabled() or torch.is_inference_mode_enabled())


def _tracks_backward(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a backward will run through this forward (compiled path: decided at trace time)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def read_state(module: nn.Module, names: Sequence[str], x: torch.Tensor) -> tuple[torch.Tensor, bool | torch.Tensor]:
    """The state ``module``'s training forward reads, as one float64 vector, and whether to advance it.

    Returns ``(packed, fresh)``: ``packed`` = :func:`pack_state` of the named buffers as this step's
    first forward saw them; ``fresh`` is False for a recomputation, which must not advance anything
    (a bool eagerly, a 0-d bool tensor under torch.compile). Commit with :func:`commit_state`, and
    pass the output through :func:`track_backward`.
    """
    buffers = [getattr(module, n) for n in names]
    if torch.compiler.is_compiling():
        if not _tracks_backward(module, x):  # nothing can recompute this forward's graph
            return pack_state(buffers), torch.ops.distnorm.first_run(buffers[0])
        out = torch.ops.distnorm.read_snapshot(buffers, getattr(module, SNAPSHOT), getattr(module, COUNTERS),
                                               getattr(module, BACKWARDS), _stale_snapshot(module))
        packed = out[:-2]
        _write_snapshot(module, buffers, packed, out[-2:-1])  # a recomputation writes back what it read
        return packed, out[-1] > 0
    stash: list[torch.Tensor] = module.__dict__.setdefault(_STASH, [])
    if recomputing():
        if len(stash) != 1:
            raise RuntimeError(_ambiguous(module, len(stash)))
        return stash.pop(), False
    packed = pack_state(buffers)
    may_be_recomputed = _may_be_recomputed()
    if may_be_recomputed:
        stash.append(packed)
        del stash[:-_STASH_LIMIT]
    elif torch.is_grad_enabled():
        stash.clear()  # a plain forward with gradients: nothing earlier will be recomputed now
    # (a forward without gradients leaves pending recomputations alone)
    if may_be_recomputed or _tracks_backward(module, x):  # the snapshot buffers as compiled code keeps them
        _write_snapshot(module, buffers, packed, getattr(module, COUNTERS)[-1:] + 1)
    return packed, True


def commit_state(targets: Sequence[torch.Tensor], new: Sequence[torch.Tensor], fresh: bool | torch.Tensor,
                 skips: torch.Tensor | None) -> None:
    """:func:`commit_` ``new`` into ``targets`` when ``fresh`` (from :func:`read_state` / :func:`advances`)."""
    if fresh is False:
        return
    commit_(targets, new, skips, gate=None if fresh is True else fresh)


class _CountBackward(torch.autograd.Function):
    """Identity (a copy) whose backward counts one backward in ``backwards`` (a ctx attribute)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, backwards: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.backwards = backwards
        return y.clone()

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        with torch.no_grad():
            ctx.backwards.add_(1)
        return dy, None


def track_backward(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``, whose backward counts one in ``_recompute_backwards`` (training forwards that read a
    snapshot, see :func:`read_state`).

    Compiled: through an autograd.Function (a copy, which inductor fuses away). Eager: a hook on
    ``y`` (on a recomputed ``y`` too: reentrant checkpoint backpropagates through that one; the
    non-reentrant recomputation's graph is never backpropagated), so the counters match the
    compiled ones and eager and compiled modules hold the same buffers.
    """
    if not module.training:
        return y
    backwards = getattr(module, BACKWARDS)
    if torch.compiler.is_compiling():
        return _CountBackward.apply(y, backwards) if _tracks_backward(module, x) else y
    if y.requires_grad:
        y.register_hook(functools.partial(_count_backward, backwards))
    return y


def _count_backward(backwards: torch.Tensor, grad: torch.Tensor) -> None:
    with torch.no_grad():
        backwards.add_(1)


def _stale_snapshot(module: nn.Module) -> str:
    cls = type(module).__name__
    return (f"{cls}: activation checkpointing recomputes this module's compiled training forward, but another "
            f"training forward of it ran between that forward and its backward (several forwards before one "
            f"backward: a pipeline schedule, the module used twice in one checkpointed region; a training-mode "
            f"forward whose backward never ran; or a reentrant checkpoint around the compiled module), so the "
            f"state it read is gone and the recomputation would not be exact. Run backward after each forward, "
            f"keep this module out of the checkpointed region, or use use_reentrant=False (rank {rank_of(None)})")


def _ambiguous(module: nn.Module, pending: int) -> str:
    cls = type(module).__name__
    if pending == 0:
        why = ("no state of its first forward is stashed (a later training forward of it with gradients ran outside "
               "torch.utils.checkpoint before this backward)")
    else:
        why = (f"{pending} forwards of it await their backward (several forwards before one backward, the module "
               f"used twice in one checkpointed region, or training-mode forwards without backward), so the "
               f"state the recomputed one read cannot be told apart")
    return (f"{cls}: activation checkpointing recomputes this module's training forward, but {why}; the "
            f"recomputation would not be exact. Run backward after each forward, or keep this module out of the "
            f"checkpointed region (rank {rank_of(None)})")
