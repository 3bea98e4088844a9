"""Autograd-aware collectives on explicit process groups, and the counter that sees them all.

Every collective distnorm issues goes through this module, so that :func:`count_collectives`
(and the consistency checks of :mod:`distnorm.debug`) see each one. Three layers, as in
Megatron's ``mappings.py``:

* plain helpers (``all_reduce_``, ``all_gather_uneven``, ``reduce_scatter_uneven``,
  ``broadcast_``) that talk to ``torch.distributed`` and record what they send;
* tiny ``autograd.Function`` pairs whose backward is the conjugate collective;
* one-line public wrappers (``copy_to_group``, ``reduce_from_group``, ``gather_along``,
  ``scatter_along``, ``reduce_scatter_along``) whose docstrings name both directions.

Rules every function here keeps:

* ``group=None`` or a group of size 1 is the local path: the input comes back, no collective.
  ``None`` never means "the default group".
* Uneven shards follow one rule, :func:`shard_sizes`: the first ``n % world`` ranks hold one
  extra element.
* Bytes are counted per rank as the payload this rank hands to the collective (an all-reduce of
  ``t`` counts ``t.nbytes``; an all-gather counts the local shard; a reduce-scatter the full
  input). Uneven all-gathers and reduce-scatters pad every shard to the largest one (gloo and
  NCCL want equal sizes), and the padded bytes are what is counted.

Under ``torch.compile`` every collective here is one registered custom op
(``torch.ops.distnorm.all_reduce`` / ``all_gather`` / ``reduce_scatter`` / ``broadcast``), so
the autograd pairs, the plain helpers and the async ``start_*`` helpers trace with
``fullgraph=True`` and no graph break, backward included. Like torch's own functional
collectives (``_c10d_functional``) they are functional ops without a registered effect: the
compiler orders them by their data flow and program order, identically on every rank (the graph's
structure does not depend on the uneven shapes), drops one whose result nobody reads (on every rank
alike), and, inside an activation-checkpointed region, re-issues them in the recomputation as eager
checkpointing does. (An *ordered effect* would pin the order further, but torch 2.13 cannot
recompute effectful ops: ``torch.compile`` around ``torch.utils.checkpoint`` then fails with
"expected all tensors_saved_with_vc_check to be Tensors"; see pytorch/pytorch#196956.) The
partitioner never recomputes them outside such a region: custom ops are not on its recompute
allow-list. Each op's kernel is the eager helper itself, run when the compiled graph runs:
:func:`count_collectives`, the bytes and the :mod:`distnorm.debug` consistency checks see exactly
what they see in eager mode, once per call. Inside a compiled graph the ``start_*`` helpers
complete at issue (the compiler owns the schedule), and ``all_gather_object`` (pickled objects)
cannot be traced.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "CollectiveCounts",
    "PendingCollective",
    "all_gather_object",
    "all_gather_uneven",
    "all_reduce_",
    "broadcast_",
    "copy_to_group",
    "count_collectives",
    "gather_along",
    "group_rank",
    "group_size",
    "record_collective",
    "reduce_from_group",
    "reduce_scatter_along",
    "reduce_scatter_uneven",
    "scatter_along",
    "shard_offsets",
    "shard_sizes",
    "start_all_gather_uneven",
    "start_reduce_scatter_uneven",
]

Group = dist.ProcessGroup | None

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "avg": dist.ReduceOp.AVG,
}


# --------------------------------------------------------------------------------------------
# Groups and shard sizes
# --------------------------------------------------------------------------------------------


def _check_group(group: object) -> None:
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__} {group!r} "
            f"(rank {_global_rank()}); for a DeviceMesh pass mesh.get_group(axis)"
        )


def group_size(group: Group) -> int:
    """Number of ranks in ``group``; 1 for ``None``. A non-group is a TypeError."""
    if group is None:
        return 1
    _check_group(group)
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's rank inside ``group``; 0 for ``None``. A non-group is a TypeError."""
    if group is None:
        return 0
    _check_group(group)
    return dist.get_rank(group)


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shard_sizes(n: int, world: int) -> list[int]:
    """Sizes of ``n`` elements split over ``world`` ranks: the first ``n % world`` get one more.

    >>> shard_sizes(10, 4)
    [3, 3, 2, 2]
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"shard_sizes: n must be an int >= 0, got {n!r} (rank {_global_rank()})")
    if not isinstance(world, int) or world < 1:
        raise ValueError(
            f"shard_sizes: world must be a positive int, got {world!r} (rank {_global_rank()})"
        )
    base, extra = divmod(n, world)
    return [base + 1 if r < extra else base for r in range(world)]


def shard_offsets(n: int, world: int) -> list[int]:
    """Start offset of each rank's shard under :func:`shard_sizes` (length ``world``)."""
    offsets, start = [], 0
    for size in shard_sizes(n, world):
        offsets.append(start)
        start += size
    return offsets


def _check_sizes(sizes: Sequence[int], world: int, where: str) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or any(s < 0 for s in sizes):
        raise ValueError(
            f"{where}: sizes must be {world} non-negative ints (one per rank), got {sizes} "
            f"(rank {_global_rank()})"
        )
    return sizes


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@dataclass
class CollectiveCounts:
    """Per-kind number of collectives issued and bytes this rank handed to them.

    ``counts["all_reduce"]`` is the number of all-reduces, ``bytes["all_reduce"]`` their payload.
    Indexing (``c["all_reduce"]``) returns the count; missing kinds are 0.
    """

    counts: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> int:
        return self.counts.get(kind, 0)

    @property
    def total(self) -> int:
        """Collectives of all kinds."""
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of all kinds."""
        return sum(self.bytes.values())

    def add(self, kind: str, nbytes: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{kind: {"count": n, "bytes": b}}``, for JSON."""
        return {k: {"count": self.counts[k], "bytes": self.bytes[k]} for k in sorted(self.counts)}


_local = threading.local()  # per thread: simulated ranks are threads


def _active_counters() -> list[CollectiveCounts]:
    stack = getattr(_local, "counters", None)
    if stack is None:
        stack = _local.counters = []
    return stack


# Hooks run before each collective with (kind, tensor, group); distnorm.debug installs its
# cross-rank consistency check here. Per thread, like the counters.
def _active_hooks() -> list[Callable[[str, torch.Tensor, Group], None]]:
    hooks = getattr(_local, "hooks", None)
    if hooks is None:
        hooks = _local.hooks = []
    return hooks


# Process-wide hooks, run before the per-thread ones: what a config flag installs, seen by every
# thread (autograd's device threads included, which per-thread hooks miss).
_GLOBAL_HOOKS: list[Callable[[str, torch.Tensor, Group], None]] = []


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCounts]:
    """Count the collectives this rank (thread) issues through distnorm inside the block.

    Nested blocks each see everything issued inside them. Collectives on ``group=None`` or a
    group of size 1 are not issued, so not counted.

    >>> with count_collectives() as c:
    ...     y = reduce_from_group(x, group)
    >>> c["all_reduce"], c.bytes["all_reduce"]
    """
    counts = CollectiveCounts()
    stack = _active_counters()
    stack.append(counts)
    try:
        yield counts
    finally:
        stack.remove(counts)


def _record(kind: str, tensor: torch.Tensor, group: Group, nbytes: int | None = None) -> None:
    for hook in [*_GLOBAL_HOOKS, *_active_hooks()]:
        hook(kind, tensor, group)
    size = tensor.numel() * tensor.element_size() if nbytes is None else nbytes
    for counts in _active_counters():
        counts.add(kind, size)


def record_collective(kind: str, tensor: torch.Tensor, group: Group, nbytes: int | None = None) -> None:
    """Record a collective issued outside ``torch.distributed``'s process-group calls.

    For ops that move data by other means (torch symmetric memory's one-shot/two-shot/multimem
    kernels) so that :func:`count_collectives` still sees them. ``nbytes`` defaults to
    ``tensor.nbytes``.
    """
    if group_size(group) > 1:
        _record(kind, tensor, group, nbytes)


# --------------------------------------------------------------------------------------------
# Plain helpers (no autograd)
# --------------------------------------------------------------------------------------------


class _DoneWork:
    """Stand-in for a completed async handle, for the local path."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def all_reduce_(
    tensor: torch.Tensor, group: Group, *, op: str = "sum", async_op: bool = False
) -> Any:
    """In-place all-reduce of ``tensor`` over ``group``; returns ``tensor`` (or a work handle).

    ``op`` is one of ``"sum"``, ``"max"``, ``"min"``, ``"avg"``. With ``async_op=True`` returns
    a handle whose ``wait()`` completes the reduction (a completed stand-in on the local path).
    """
    if op not in _REDUCE_OPS:
        raise ValueError(
            f"all_reduce_: op must be one of {sorted(_REDUCE_OPS)}, got {op!r} "
            f"(rank {_global_rank()})"
        )
    if group_size(group) == 1:
        return _DoneWork() if async_op else tensor
    if torch.compiler.is_compiling():
        assert group is not None
        with torch.no_grad():  # like the in-place c10d op: the values change, autograd's view of tensor does not
            tensor.copy_(_all_reduce_op(tensor.detach(), op, group.group_name))
        return _DoneWork() if async_op else tensor
    _record("all_reduce", tensor, group)
    work = dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group, async_op=async_op)
    return work if async_op else tensor


def broadcast_(tensor: torch.Tensor, src: int, group: Group) -> torch.Tensor:
    """In-place broadcast from ``src`` (a rank *inside* ``group``) to every rank of ``group``."""
    world = group_size(group)
    if not 0 <= src < world:
        raise ValueError(
            f"broadcast_: src must be a rank in [0, {world}) of the group, got {src} "
            f"(rank {_global_rank()})"
        )
    if world == 1:
        return tensor
    assert group is not None
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return tensor.copy_(_broadcast_op(tensor.detach(), src, group.group_name))
    _record("broadcast", tensor, group)
    dist.broadcast(tensor, src=dist.get_global_rank(group, src), group=group)
    return tensor


def all_gather_object(obj: Any, group: Group) -> list[Any]:
    """Every rank's ``obj`` (picklable), in group-rank order. Counted as ``all_gather_object``."""
    world = group_size(group)
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    _record("all_gather_object", torch.empty(0), group, nbytes=0)
    dist.all_gather_object(out, obj, group=group)
    return out


def _pad_along(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class PendingCollective:
    """An issued asynchronous collective; ``wait()`` completes it and returns its result tensor.

    Returned by the ``start_*`` helpers (and usable as a completed stand-in on the local path).
    ``wait()`` may be called more than once; the work handle is waited for the first time only.
    """

    def __init__(self, work: Any, finish: Callable[[], torch.Tensor] | None, result: torch.Tensor | None = None) -> None:
        self._work, self._finish = work, finish
        self._result = result

    def wait(self) -> torch.Tensor:
        if self._result is None:
            assert self._finish is not None
            if self._work is not None:
                self._work.wait()
            self._result = self._finish()
        return self._result

    @classmethod
    def done(cls, result: torch.Tensor) -> PendingCollective:
        """A collective that has already completed with ``result``."""
        return cls(None, None, result)


def all_gather_uneven(
    tensor: torch.Tensor, group: Group, *, dim: int = 0, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` (group-rank order).

    ``sizes[r]`` is rank r's extent along ``dim``; ``None`` means every rank has this rank's
    extent. A local tensor whose extent differs from ``sizes[rank]`` is a ValueError.
    Collective: 1 all-gather of ``max(sizes)`` slices per rank.
    """
    return start_all_gather_uneven(tensor, group, dim=dim, sizes=sizes, async_op=False).wait()


def start_all_gather_uneven(
    tensor: torch.Tensor, group: Group, *, dim: int = 0, sizes: Sequence[int] | None = None,
    async_op: bool = True,
) -> PendingCollective:
    """:func:`all_gather_uneven`, issued asynchronously: ``.wait()`` returns the gathered tensor."""
    world = group_size(group)
    if world == 1:
        return PendingCollective.done(tensor)
    dim = dim % tensor.dim()
    rank = group_rank(group)
    sizes = [tensor.shape[dim]] * world if sizes is None else _check_sizes(sizes, world, "all_gather_uneven")
    if tensor.shape[dim] != sizes[rank]:
        raise ValueError(
            f"all_gather_uneven: tensor must have size {sizes[rank]} along dim {dim} on rank "
            f"{rank} (sizes={sizes}), got shape {tuple(tensor.shape)} (rank {_global_rank()})"
        )
    if torch.compiler.is_compiling():
        assert group is not None
        return PendingCollective.done(_all_gather_op(tensor.detach(), dim, sizes, group.group_name))
    largest = max(sizes)
    padded = _pad_along(tensor, dim, largest)
    parts = [torch.empty_like(padded) for _ in range(world)]
    _record("all_gather", padded, group)
    work = dist.all_gather(parts, padded, group=group, async_op=async_op)

    def finish() -> torch.Tensor:
        kept = parts if all(s == largest for s in sizes) else [p.narrow(dim, 0, s) for p, s in zip(parts, sizes, strict=True)]
        return torch.cat(kept, dim=dim)

    return PendingCollective(work if async_op else None, finish)


def reduce_scatter_uneven(
    tensor: torch.Tensor, group: Group, *, dim: int = 0, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` and return this rank's slice along ``dim``.

    ``sizes`` defaults to ``shard_sizes(tensor.shape[dim], world)``; their sum must equal the
    extent of ``dim``. Collective: 1 reduce-scatter of ``world * max(sizes)`` slices.
    """
    return start_reduce_scatter_uneven(tensor, group, dim=dim, sizes=sizes, async_op=False).wait()


def start_reduce_scatter_uneven(
    tensor: torch.Tensor, group: Group, *, dim: int = 0, sizes: Sequence[int] | None = None,
    async_op: bool = True,
) -> PendingCollective:
    """:func:`reduce_scatter_uneven`, issued asynchronously: ``.wait()`` returns this rank's slice."""
    world = group_size(group)
    if world == 1:
        return PendingCollective.done(tensor)
    dim = dim % tensor.dim()
    n = tensor.shape[dim]
    sizes = shard_sizes(n, world) if sizes is None else _check_sizes(sizes, world, "reduce_scatter_uneven")
    if sum(sizes) != n:
        raise ValueError(
            f"reduce_scatter_uneven: sizes {sizes} must sum to the extent {n} of dim {dim} "
            f"(rank {_global_rank()})"
        )
    if torch.compiler.is_compiling():
        assert group is not None
        return PendingCollective.done(_reduce_scatter_op(tensor.detach(), dim, sizes, group.group_name))
    largest = max(sizes)
    chunks = [_pad_along(c, dim, largest) for c in tensor.split(sizes, dim=dim)]
    out = torch.empty_like(chunks[0])
    _record("reduce_scatter", tensor, group, nbytes=sum(c.numel() for c in chunks) * tensor.element_size())
    work = dist.reduce_scatter(out, chunks, group=group, async_op=async_op)
    mine = sizes[group_rank(group)]
    return PendingCollective(work if async_op else None, lambda: out.narrow(dim, 0, mine))


def _local_slice(tensor: torch.Tensor, group: Group, dim: int, sizes: Sequence[int] | None) -> torch.Tensor:
    world = group_size(group)
    dim = dim % tensor.dim()
    n = tensor.shape[dim]
    sizes = shard_sizes(n, world) if sizes is None else _check_sizes(sizes, world, "scatter_along")
    if sum(sizes) != n:
        raise ValueError(
            f"scatter_along: sizes {sizes} must sum to the extent {n} of dim {dim} "
            f"(rank {_global_rank()})"
        )
    rank = group_rank(group)
    return tensor.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


# --------------------------------------------------------------------------------------------
# torch.compile: each collective is one ordered custom op whose kernel is the eager helper
# --------------------------------------------------------------------------------------------
# A process group cannot be an op argument: the ops take its name and resolve it when they run.
# Their kernels run the eager helpers above, so counting, the debug hooks and the uneven-size
# padding are one code path for eager and compiled callers. The fake kernels give the shapes.
# Like the eager helpers they carry no autograd (inputs are detached); the autograd pairs below
# supply the conjugate backward.


def _resolve(group_name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(group_name)  # type: ignore[arg-type]


@torch.library.custom_op("distnorm::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    return all_reduce_(x.clone(memory_format=torch.contiguous_format), _resolve(group_name), op=op)


@torch.library.custom_op("distnorm::broadcast", mutates_args=())
def _broadcast_op(x: torch.Tensor, src: int, group_name: str) -> torch.Tensor:
    return broadcast_(x.clone(memory_format=torch.contiguous_format), src, _resolve(group_name))


@torch.library.custom_op("distnorm::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, dim: int, sizes: list[int], group_name: str) -> torch.Tensor:
    return start_all_gather_uneven(x, _resolve(group_name), dim=dim, sizes=sizes, async_op=False).wait()


@torch.library.custom_op("distnorm::reduce_scatter", mutates_args=())
def _reduce_scatter_op(x: torch.Tensor, dim: int, sizes: list[int], group_name: str) -> torch.Tensor:
    out = start_reduce_scatter_uneven(x, _resolve(group_name), dim=dim, sizes=sizes, async_op=False).wait()
    return out.contiguous()


def _resized(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = size
    return x.new_empty(shape)


@_all_reduce_op.register_fake
def _(x: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_broadcast_op.register_fake
def _(x: torch.Tensor, src: int, group_name: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_all_gather_op.register_fake
def _(x: torch.Tensor, dim: int, sizes: list[int], group_name: str) -> torch.Tensor:
    return _resized(x, dim, sum(sizes))


@_reduce_scatter_op.register_fake
def _(x: torch.Tensor, dim: int, sizes: list[int], group_name: str) -> torch.Tensor:
    return _resized(x, dim, sizes[dist.get_rank(_resolve(group_name))])


# --------------------------------------------------------------------------------------------
# Autograd functions: conjugate pairs
# --------------------------------------------------------------------------------------------


class _CopyToGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


class _ReduceFromGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherAlongFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int, sizes: list[int] | None) -> torch.Tensor:
        world = group_size(group)
        ctx.group, ctx.dim = group, dim % x.dim()
        ctx.sizes = [x.shape[ctx.dim]] * world if sizes is None else sizes
        return all_gather_uneven(x, group, dim=ctx.dim, sizes=sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return reduce_scatter_uneven(grad.contiguous(), ctx.group, dim=ctx.dim, sizes=ctx.sizes), None, None, None


class _ScatterAlongFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int, sizes: list[int] | None) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim % x.dim()
        ctx.sizes = shard_sizes(x.shape[ctx.dim], group_size(group)) if sizes is None else sizes
        return _local_slice(x, group, ctx.dim, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return all_gather_uneven(grad.contiguous(), ctx.group, dim=ctx.dim, sizes=ctx.sizes), None, None, None


class _ReduceScatterAlongFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int, sizes: list[int] | None) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim % x.dim()
        ctx.sizes = shard_sizes(x.shape[ctx.dim], group_size(group)) if sizes is None else sizes
        return reduce_scatter_uneven(x, group, dim=ctx.dim, sizes=sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return all_gather_uneven(grad.contiguous(), ctx.group, dim=ctx.dim, sizes=ctx.sizes), None, None, None


# --------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------


def _sizes_arg(sizes: Sequence[int] | None, group: Group, where: str) -> list[int] | None:
    return None if sizes is None else _check_sizes(sizes, group_size(group), where)


def copy_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce (sum) of the gradient over ``group``.

    Use where a replicated tensor enters rank-local computation (Megatron's
    ``copy_to_tensor_model_parallel_region``). Collectives: bwd 1 all-reduce of ``x.nbytes``.
    """
    if group_size(group) == 1:
        return x
    return _CopyToGroupFn.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity.

    Collectives: fwd 1 all-reduce of ``x.nbytes``; bwd none.
    """
    if group_size(group) == 1:
        return x
    return _ReduceFromGroupFn.apply(x, group)


def gather_along(
    x: torch.Tensor, group: Group, dim: int = 0, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: reduce-scatter (sum) along ``dim``.

    ``x_shard [..., n_r, ...] -> x [..., sum(sizes), ...]``; ``sizes[r]`` is rank r's extent
    (default: all equal to this rank's). The backward sums because every rank's copy of the full
    tensor feeds a different computation (sequence parallelism before a column-parallel linear).
    Collectives: fwd 1 all-gather; bwd 1 reduce-scatter.
    """
    if group_size(group) == 1:
        return x
    return _GatherAlongFn.apply(x, group, dim, _sizes_arg(sizes, group, "gather_along"))


def scatter_along(
    x: torch.Tensor, group: Group, dim: int = 0, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Forward: keep this rank's slice along ``dim``. Backward: all-gather along ``dim``.

    ``x [..., n, ...] -> x_shard [..., sizes[rank], ...]``, ``sizes`` defaulting to
    ``shard_sizes(n, world)``. Collectives: fwd none; bwd 1 all-gather.
    """
    if group_size(group) == 1:
        return x
    return _ScatterAlongFn.apply(x, group, dim, _sizes_arg(sizes, group, "scatter_along"))


def reduce_scatter_along(
    x: torch.Tensor, group: Group, dim: int = 0, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Forward: reduce-scatter (sum) along ``dim``. Backward: all-gather along ``dim``.

    ``x [..., n, ...] (partial sums) -> x_shard [..., sizes[rank], ...]``, ``sizes`` defaulting
    to ``shard_sizes(n, world)``. Collectives: fwd 1 reduce-scatter; bwd 1 all-gather.
    """
    if group_size(group) == 1:
        return x
    return _ReduceScatterAlongFn.apply(x, group, dim, _sizes_arg(sizes, group, "reduce_scatter_along"))
