"""Fused all-reduce (or reduce-scatter) + residual add + RMSNorm (+ all-gather).

Every tensor-parallel block ends with the row-parallel linear's partial sums, which are summed
over the TP group, added to the residual stream and normalised for the next block. This module
does those three steps as one op, in two modes:

* ``"allreduce"``: ``h = sum_r partial_r + residual``, ``normed = RMSNorm(h)``; every rank gets the
  full ``normed`` and ``residual_out = h``. Collectives: 1 all-reduce.
* ``"reduce_scatter"`` (TokenWeave): reduce-scatter ``partial`` along tokens, add this rank's
  residual shard, RMSNorm the shard (1/P of the work), all-gather ``normed``. ``residual_out``
  stays token-sharded (1/P of the bytes). Collectives: 1 reduce-scatter + 1 all-gather.

Tokens are dim 0 of ``[tokens, hidden]``; shards follow ``shard_sizes(tokens, P)`` (a rank with 0
tokens still joins every collective).

Gradient semantics: ``partial`` is a partial sum (its gradient is the gradient of the sum, the
same on every rank), ``weight`` is replicated, and ``normed`` -- every rank holds the same full
tensor -- gets back from its consumer, by ``normed_grad``:

* ``"replicated"`` (default): the full gradient, the same on every rank (the consumer reduced it
  already, e.g. a ``ColumnParallelLinear`` whose ``copy_to_group`` all-reduces its input's
  gradient). Backward: allreduce mode none; reduce_scatter mode this rank's rows of it, the norm
  backward, 1 all-gather.
* ``"partial"``: this rank's partial gradient, the true one being the sum over ranks (the consumer
  did not reduce, e.g. a column-parallel linear without ``copy_to_group``: Megatron's sequence
  parallelism, all-gather forward <-> reduce-scatter backward). Backward: allreduce mode 1
  all-reduce of it (the consumer's all-reduce, moved here); reduce_scatter mode 1 reduce-scatter
  of it, the norm backward on this rank's tokens, 1 all-gather: the forward's bytes, the minimum.

Either way the two modes are interchangeable in front of the same blocks.

Backends: ``"torch"`` (reference: blocking collectives, unfused torch ops), ``"gloo"`` /
``"nccl"`` (the group's own backend: collectives through :mod:`distnorm.comm`, fused local
add+RMSNorm), ``"symm_mem"`` (CUDA + torch symmetric memory: one-shot/two-shot or multimem
all-reduce, reduce-scatter and peer-read all-gather, issued on one dedicated comm stream) and
``"auto"`` (``symm_mem`` where the caller enabled symmetric memory for the group with
``torch.distributed._symmetric_memory.enable_symm_mem_for_group`` and it is usable, else the
group's backend).

The local add+RMSNorm is ``distnorm.kernels.add_rms_norm`` (the one add+RMSNorm of distnorm: its
torch path on the CPU, the fused Triton kernel on CUDA).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from distnorm import comm, kernels
from distnorm.comm import Group, PendingCollective, group_rank, group_size, shard_sizes

__all__ = [
    "BACKENDS",
    "MODES",
    "NORMED_GRADS",
    "CollectiveLauncher",
    "FusedNormCall",
    "add_rms_norm",
    "check_norm_weight",
    "fused_allreduce_rms_norm",
    "symm_mem_unavailable_reason",
]

Mode = Literal["allreduce", "reduce_scatter"]
Backend = Literal["auto", "torch", "gloo", "nccl", "symm_mem"]
NormedGrad = Literal["replicated", "partial"]
MODES: tuple[str, ...] = ("allreduce", "reduce_scatter")
BACKENDS: tuple[str, ...] = ("auto", "torch", "gloo", "nccl", "symm_mem")
NORMED_GRADS: tuple[str, ...] = ("replicated", "partial")


# --------------------------------------------------------------------------------------------
# Local fused add + RMSNorm
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(RMSNorm(h) * weight, h)``, no collectives.

    ``x, residual [T, H]`` (same dtype), ``weight [H]`` or None -> ``y [T, H]`` and
    ``residual_out = h [T, H]``, both in ``x.dtype``. The add and the statistics run in float32
    (float64 for float64 input); ``h`` is rounded to ``x.dtype`` *before* it is normalised, so the
    norm sees exactly the residual the next block adds to (as vLLM's/TokenWeave's kernels do).
    Differentiable in all three tensors. The op is :func:`distnorm.kernels.add_rms_norm`.
    """
    return kernels.add_rms_norm(x, residual, weight, eps)


def _add_rms_norm_local(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused local op of the gloo/nccl/symm_mem backends: the Triton kernel on CUDA, torch elsewhere."""
    return kernels.add_rms_norm(x, residual, weight, eps)


def _add_rms_norm_unfused(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"torch"`` backend's local op: the same add+RMSNorm on its torch path (no Triton)."""
    return kernels.add_rms_norm(x, residual, weight, eps, backend="torch")


# --------------------------------------------------------------------------------------------
# Launchers: who issues the collectives
# --------------------------------------------------------------------------------------------


class CollectiveLauncher(Protocol):
    """Issues one collective asynchronously and returns its :class:`PendingCollective`.

    ``all_reduce(x)`` -> pending sum over the group (``x``'s shape); ``reduce_scatter(x, sizes)``
    -> pending ``[sizes[rank], H]`` slice of the sum; ``all_gather(x_shard, sizes)`` -> pending
    ``[sum(sizes), H]``. Inputs are detached; autograd is handled by the caller.
    ``world`` is the group size the launcher serves (sizes have that many entries).
    """

    world: int

    def all_reduce(self, x: torch.Tensor) -> PendingCollective: ...

    def reduce_scatter(self, x: torch.Tensor, sizes: list[int]) -> PendingCollective: ...

    def all_gather(self, x_shard: torch.Tensor, sizes: list[int]) -> PendingCollective: ...


class _ProcessGroupLauncher:
    """Collectives on the group's own backend (gloo/NCCL/threaded) via :mod:`distnorm.comm`."""

    def __init__(self, group: Group, *, async_op: bool) -> None:
        self.group, self.async_op, self.world = group, async_op, group_size(group)

    def all_reduce(self, x: torch.Tensor) -> PendingCollective:
        buf = x.contiguous().clone()
        work = comm.all_reduce_(buf, self.group, async_op=self.async_op)
        return PendingCollective(work if self.async_op else None, lambda: buf)

    def reduce_scatter(self, x: torch.Tensor, sizes: list[int]) -> PendingCollective:
        return comm.start_reduce_scatter_uneven(x.contiguous(), self.group, sizes=sizes, async_op=self.async_op)

    def all_gather(self, x_shard: torch.Tensor, sizes: list[int]) -> PendingCollective:
        return comm.start_all_gather_uneven(x_shard.contiguous(), self.group, sizes=sizes, async_op=self.async_op)


def symm_mem_unavailable_reason(group: Group, device: torch.device) -> str | None:
    """Why the ``"symm_mem"`` backend cannot serve ``group`` on ``device``; None when it can."""
    if device.type != "cuda":
        return f"tensors are on {device.type!r}, symmetric memory needs CUDA tensors"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if group is None or group_size(group) == 1:
        return "the group has a single rank (nothing to communicate)"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        return f"torch.distributed._symmetric_memory cannot be imported ({exc})"
    if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce"):
        return "this torch build has no symm_mem ops"  # pragma: no cover
    backend = dist.get_backend(group)
    if backend != "nccl":
        return f"the group's backend is {backend!r}, symmetric memory needs an NCCL group"
    if group_size(group) > torch.cuda.device_count():
        return (f"the group spans {group_size(group)} ranks but this host has {torch.cuda.device_count()} "
                "GPUs; symmetric memory needs every rank on one NVLink domain")
    return None


@functools.cache
def _symm_comm_stream(device: torch.device) -> torch.cuda.Stream:
    # One stream for every symmetric-memory op on a device: symm_mem kernels spin on peer
    # signals, and issuing them from two streams can deadlock.
    return torch.cuda.Stream(device=device)


class _SymmMemLauncher:  # pragma: no cover - needs >= 2 GPUs with NVLink
    """Torch symmetric-memory collectives on one comm stream (CUDA only).

    all-reduce: ``multimem_all_reduce_`` where the hardware has multicast (NVLS), one-shot below
    ``one_shot_max_bytes``, two-shot above. reduce-scatter: ``reduce_scatter_out`` on a buffer
    padded to ``P * max(sizes)`` rows. all-gather: each rank writes its padded shard into its
    symmetric buffer, a barrier, then reads every peer's buffer.
    """

    one_shot_max_bytes = 256 * 1024

    def __init__(self, group: Group) -> None:
        assert group is not None
        self.group, self.world, self.rank = group, group_size(group), group_rank(group)
        self.group_name = group.group_name

    def _buffer(self, numel: int, dtype: torch.dtype, device: torch.device, rank: int | None = None) -> Any:
        from torch.distributed import _symmetric_memory as symm_mem

        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        workspace = symm_mem.get_symm_mem_workspace(self.group_name, min_size=max(nbytes, 1))
        return workspace, workspace.get_buffer(self.rank if rank is None else rank, (numel,), dtype)

    def _issue(self, device: torch.device, fn: Any, *inputs: torch.Tensor) -> PendingCollective:
        current, stream = torch.cuda.current_stream(device), _symm_comm_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            result = fn()
        for t in inputs:
            t.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)

        def finish() -> torch.Tensor:
            torch.cuda.current_stream(device).wait_event(done)
            result.record_stream(torch.cuda.current_stream(device))
            return result

        return PendingCollective(None, finish)

    def all_reduce(self, x: torch.Tensor) -> PendingCollective:
        ops = torch.ops.symm_mem
        comm.record_collective("all_reduce", x, self.group)

        def run() -> torch.Tensor:
            workspace, buf = self._buffer(x.numel(), x.dtype, x.device)
            buf.copy_(x.reshape(-1))
            if getattr(workspace, "multicast_ptr", 0) and x.dtype in (torch.bfloat16, torch.float32):
                return ops.multimem_all_reduce_(buf, "sum", self.group_name).view_as(x).clone()
            if x.nbytes <= self.one_shot_max_bytes:
                return ops.one_shot_all_reduce(buf, "sum", self.group_name).view_as(x)
            return ops.two_shot_all_reduce_(buf, "sum", self.group_name).view_as(x).clone()

        return self._issue(x.device, run, x)

    def reduce_scatter(self, x: torch.Tensor, sizes: list[int]) -> PendingCollective:
        largest, hidden = max(sizes), x.shape[-1]
        comm.record_collective("reduce_scatter", x, self.group,
                               nbytes=self.world * largest * hidden * x.element_size())

        def run() -> torch.Tensor:
            _, buf = self._buffer(self.world * largest * hidden, x.dtype, x.device)
            padded = buf.view(self.world, largest, hidden)
            padded.zero_()
            for r, chunk in enumerate(x.split(sizes, dim=0)):
                padded[r, : sizes[r]].copy_(chunk)
            out = x.new_empty(largest, hidden)
            torch.ops.symm_mem.reduce_scatter_out(padded.view(-1, hidden), self.group_name, False, out)
            return out[: sizes[self.rank]]

        return self._issue(x.device, run, x)

    def all_gather(self, x_shard: torch.Tensor, sizes: list[int]) -> PendingCollective:
        largest, hidden = max(sizes), x_shard.shape[-1]
        comm.record_collective("all_gather", x_shard, self.group, nbytes=largest * hidden * x_shard.element_size())

        def run() -> torch.Tensor:
            workspace, buf = self._buffer(largest * hidden, x_shard.dtype, x_shard.device)
            buf.view(largest, hidden)[: x_shard.shape[0]].copy_(x_shard)
            workspace.barrier(channel=0)
            parts = [workspace.get_buffer(r, (largest, hidden), x_shard.dtype)[: sizes[r]] for r in range(self.world)]
            out = torch.cat(parts, dim=0)
            workspace.barrier(channel=0)  # nobody overwrites its buffer before every peer has read it
            return out

        return self._issue(x_shard.device, run, x_shard)


def _symm_mem_enabled(group: Group) -> bool:
    if group is None:
        return False
    try:
        from torch.distributed import _symmetric_memory as symm_mem
    except ImportError:  # pragma: no cover
        return False
    return bool(symm_mem.is_symm_mem_enabled_for_group(group.group_name))


# --------------------------------------------------------------------------------------------
# Autograd: finishing an issued collective
# --------------------------------------------------------------------------------------------

GradRule = Literal["identity", "all_gather", "narrow", "reduce_scatter"]


class _FinishCollectiveFn(torch.autograd.Function):
    """Forward: wait for the collective issued on ``x`` and return its result.

    Backward: ``grad_rule`` names what the incoming gradient needs, run blocking:
    ``"identity"`` (all-reduce of a partial sum: the replicated result's gradient is every
    summand's); ``"all_gather"`` (the conjugate of a reduce-scatter); ``"narrow"`` (all-gather of a
    replicated result: this rank's rows of the full gradient, no collective); ``"reduce_scatter"``
    (all-gather whose consumers hand back partial gradients: sum them, keep this rank's rows).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pending: PendingCollective, grad_rule: GradRule, group: Group,
                sizes: list[int] | None) -> torch.Tensor:
        ctx.grad_rule, ctx.group, ctx.sizes = grad_rule, group, sizes
        result = pending.wait()
        return x.view_as(x) if result is x else result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if ctx.grad_rule == "identity":
            dx = grad
        elif ctx.grad_rule == "all_gather":
            dx = comm.all_gather_uneven(grad.contiguous(), ctx.group, sizes=ctx.sizes)
        elif ctx.grad_rule == "reduce_scatter":
            dx = comm.reduce_scatter_uneven(grad.contiguous(), ctx.group, sizes=ctx.sizes)
        else:
            rank = group_rank(ctx.group) if len(ctx.sizes) > 1 else 0
            dx = grad.narrow(0, sum(ctx.sizes[:rank]), ctx.sizes[rank]).contiguous()
        return dx, None, None, None, None


def _finish(x: torch.Tensor, pending: PendingCollective, grad_rule: GradRule, group: Group,
            sizes: list[int] | None) -> torch.Tensor:
    return _FinishCollectiveFn.apply(x, pending, grad_rule, group, sizes)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh autograd leaf holding ``t``'s values: where a recorded piece of graph starts."""
    return t.detach().requires_grad_(t.is_floating_point())


def norm_weight(weight: torch.Tensor | None, group: Group, mode: str, *, record: bool = False) -> torch.Tensor | None:
    """The norm weight as the fused op uses it: upcast to float32 (float64 for float64) once, so
    every token's gradient contribution adds up in that precision and is rounded to the weight's
    dtype once. In reduce_scatter mode each rank normalises 1/P of the tokens, so the replicated
    weight's gradient is summed over ``group`` (``copy_to_group``: bwd 1 all-reduce of ``H``
    numbers). ``record``: a leaf instead (TokenWeaver's woven backward reduces it itself)."""
    if weight is None:
        return None
    if record:
        return weight.detach().to(_compute_dtype(weight.dtype)).requires_grad_(weight.requires_grad)
    weight = weight.to(_compute_dtype(weight.dtype))
    return comm.copy_to_group(weight, group) if mode == "reduce_scatter" else weight


# --------------------------------------------------------------------------------------------
# One fused call, in stages, so that TokenWeaver can interleave several
# --------------------------------------------------------------------------------------------


class FusedNormCall:
    """One ``fused_allreduce_rms_norm`` in stages (inputs validated by the caller):

    ``issue()`` starts the all-reduce / reduce-scatter of ``partial``; ``wait()`` waits for it;
    ``norm()`` runs the local add + RMSNorm and returns ``residual_out``; ``issue_gather()``
    starts the all-gather of the normed shard (reduce_scatter mode); ``finish()`` returns
    ``normed``. ``launcher`` None: the local op, every collective stage a no-op.

    ``sizes``: the per-rank token counts of the reduce-scatter / all-gather (default
    ``shard_sizes(tokens, P)``). ``normed_grad``: what ``normed``'s consumer hands back (see
    :func:`fused_allreduce_rms_norm`). ``weight``: as :func:`norm_weight` prepared it.

    ``record=True`` (TokenWeaver's woven backward): no autograd edge crosses a collective. The
    summed ``partial`` (``self.h``) and ``residual`` are fresh leaves, ``normed`` comes back
    detached, and the caller takes the gradients of ``(self.y, self.residual_out)`` piece by
    piece, issuing the backward collectives itself.
    """

    def __init__(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 *, group: Group, mode: str, launcher: CollectiveLauncher | None, normed_grad: str = "replicated",
                 sizes: list[int] | None = None, unfused: bool = False, record: bool = False) -> None:
        self.partial, self.weight, self.eps, self.group, self.mode = partial, weight, eps, group, mode
        self.residual = leaf(residual) if record else residual
        self.launcher, self.normed_grad, self.record = launcher, normed_grad, record
        self.local_op = _add_rms_norm_unfused if unfused else _add_rms_norm_local
        self.sizes = sizes if sizes is not None or launcher is None else shard_sizes(partial.shape[0], launcher.world)
        self.pending: PendingCollective | None = None
        self.gathered: PendingCollective | None = None
        self.normed: torch.Tensor | None = None

    @property
    def scattered(self) -> bool:
        """True when the norm runs on this rank's token shard (reduce_scatter mode with a launcher)."""
        return self.mode == "reduce_scatter" and self.launcher is not None

    def issue(self) -> None:
        if self.launcher is None:
            return
        if self.mode == "allreduce":
            self.pending = self.launcher.all_reduce(self.partial.detach())
        else:
            self.pending = self.launcher.reduce_scatter(self.partial.detach(), self.sizes)  # type: ignore[arg-type]

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()

    def norm(self) -> torch.Tensor:
        # the handle is dropped once received (a recorded call lives until the backward)
        pending, self.pending = self.pending, None
        if pending is None:  # local path
            h = leaf(self.partial) if self.record else self.partial
        elif self.record:
            h = leaf(pending.wait())
        else:
            h = _finish(self.partial, pending, "identity" if self.mode == "allreduce" else "all_gather",
                        self.group, self.sizes)
        self.h = h
        self.y, self.residual_out = self.local_op(h, self.residual, self.weight, self.eps)
        return self.residual_out

    def issue_gather(self) -> None:
        if self.scattered:
            self.gathered = self.launcher.all_gather(self.y.detach(), self.sizes)  # type: ignore[union-attr, arg-type]

    def finish(self) -> torch.Tensor:
        if self.normed is None:
            self.normed = self._finish()
        return self.normed

    def _finish(self) -> torch.Tensor:
        gathered, self.gathered = self.gathered, None  # its receive buffers go with it
        if gathered is not None:
            if self.record:
                return gathered.wait()
            rule: GradRule = "reduce_scatter" if self.normed_grad == "partial" else "narrow"
            return _finish(self.y, gathered, rule, self.group, self.sizes)
        if self.record:
            return self.y.detach()
        return comm.copy_to_group(self.y, self.group) if self.normed_grad == "partial" else self.y


# --------------------------------------------------------------------------------------------
# Validation and backend choice
# --------------------------------------------------------------------------------------------


def _where(group: Group) -> str:
    return f"rank {group_rank(group)} of {group_size(group)}"


def check_options(mode: str, backend: str, normed_grad: str, *, group: Group, fn: str) -> None:
    """ValueError naming the first of ``mode``, ``backend``, ``normed_grad`` that is not a choice."""
    where = _where(group)
    for name, value, choices in (("mode", mode, MODES), ("backend", backend, BACKENDS),
                                 ("normed_grad", normed_grad, NORMED_GRADS)):
        if value not in choices:
            raise ValueError(f"{fn}: {name} must be one of {choices}, got {value!r} ({where})")


def check_fused_inputs(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                       *, group: Group, mode: str, backend: str, normed_grad: str = "replicated",
                       fn: str = "fused_allreduce_rms_norm") -> None:
    """Raise ValueError/TypeError naming the argument, value, expectation and rank."""
    where = _where(group)
    check_options(mode, backend, normed_grad, group=group, fn=fn)
    if not isinstance(partial, torch.Tensor) or partial.dim() != 2:
        shape = tuple(partial.shape) if isinstance(partial, torch.Tensor) else type(partial).__name__
        raise ValueError(f"{fn}: partial must be a 2-D [tokens, hidden] tensor, got {shape} ({where})")
    if not partial.is_floating_point():
        raise TypeError(f"{fn}: partial must be a floating-point tensor, got {partial.dtype} ({where})")
    tokens, hidden = partial.shape
    if mode == "allreduce":
        expected, why = (tokens, hidden), "allreduce mode: the residual holds every token"
    else:
        rows = shard_sizes(tokens, group_size(group))[group_rank(group)]
        expected = (rows, hidden)
        why = f"reduce_scatter mode: the residual is this rank's token shard, shard_sizes({tokens}, {group_size(group)})"
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != expected:
        shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"{fn}: residual must have shape {expected} ({why}), got {shape} ({where})")
    if residual.dtype != partial.dtype:
        raise TypeError(f"{fn}: residual dtype must equal partial's {partial.dtype}, got {residual.dtype} ({where})")
    if residual.device != partial.device:
        raise ValueError(f"{fn}: residual must be on partial's device {partial.device}, got {residual.device} ({where})")
    check_norm_weight(weight, hidden, partial.device, name="weight", like="partial", fn=fn, where=where)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{fn}: eps must be a float >= 0, got {eps!r} ({where})")


def check_norm_weight(weight: object, hidden: int, device: torch.device, *, name: str, like: str, fn: str,
                      where: str) -> None:
    """``weight`` (called ``name`` in the error) is None or a floating ``[hidden]`` tensor on
    ``device``, the device of the argument ``like``. Shape, dtype and device metadata only: no host
    sync, and inside a ``torch.compile`` graph a guard, not a break. A ``[1]`` weight would
    broadcast over the hidden dim, a silently wrong answer: ValueError."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (hidden,):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{fn}: {name} must have shape ({hidden},), got {shape} ({where})")
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: {name} must be floating point, got {weight.dtype} ({where})")
    if weight.device != device:
        raise ValueError(f"{fn}: {name} must be on {like}'s device {device}, got {weight.device} ({where})")


def make_launcher(group: Group, backend: str, device: torch.device, *, async_op: bool,
                  fn: str = "fused_allreduce_rms_norm") -> CollectiveLauncher | None:
    """The launcher for ``backend`` on ``group`` (None: a group of one, no collectives).

    ``"gloo"``/``"nccl"`` must name the group's backend (ValueError otherwise); ``"symm_mem"``
    raises RuntimeError saying why it is unavailable; ``"auto"`` takes ``symm_mem`` only where
    it is enabled for the group and usable, else the group's backend.
    """
    if backend == "symm_mem":
        reason = symm_mem_unavailable_reason(group, device)
        if reason is not None:
            raise RuntimeError(f"{fn}: backend='symm_mem' is unavailable: {reason} ({_where(group)})")
        return _SymmMemLauncher(group)
    if group_size(group) == 1:
        return None
    if backend in ("gloo", "nccl"):
        actual = dist.get_backend(group)
        if actual != backend:
            raise ValueError(f"{fn}: backend={backend!r} does not match the group's backend {actual!r} "
                             f"(use backend='auto' or {actual!r}) ({_where(group)})")
    if backend == "auto" and _symm_mem_enabled(group) and symm_mem_unavailable_reason(group, device) is None:
        return _SymmMemLauncher(group)  # pragma: no cover - needs GPUs
    return _ProcessGroupLauncher(group, async_op=async_op and backend != "torch")


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------


def fused_allreduce_rms_norm(
    partial: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    group: Group,
    mode: Mode = "allreduce",
    backend: Backend = "auto",
    normed_grad: NormedGrad = "replicated",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the row-parallel ``partial`` over ``group``, add ``residual``, RMSNorm.

    Shapes (T tokens, H hidden, P ranks, ``T_r = shard_sizes(T, P)[rank]``, b = itemsize):

    * ``mode="allreduce"``: ``partial [T, H]``, ``residual [T, H]`` -> ``normed [T, H]``,
      ``residual_out [T, H]``. Collectives (P > 1): fwd 1 all-reduce of ``T*H`` elements
      (``H*b`` bytes/token). bwd: ``normed_grad="replicated"`` none; ``"partial"`` 1 all-reduce
      of ``normed``'s gradient (``H*b`` bytes/token, the forward's).
    * ``mode="reduce_scatter"``: ``partial [T, H]``, ``residual [T_r, H]`` -> ``normed [T, H]``,
      ``residual_out [T_r, H]``. Collectives (P > 1): fwd 1 reduce-scatter + 1 all-gather
      (each ``H*b`` bytes/token, padded to ``max(T_r)`` rows per rank). bwd:
      ``"replicated"`` 1 all-gather (grad of ``partial``); ``"partial"`` 1 reduce-scatter
      (``normed``'s gradient) + 1 all-gather (grad of ``partial``): the forward's bytes. Both add
      1 all-reduce of ``H`` float32 (float64 for float64 weights) numbers for the weight's
      gradient (the norm saw 1/P of the tokens).

    ``normed_grad``: what ``normed``'s consumer hands back -- ``"replicated"`` (the full gradient,
    the same on every rank: the consumer all-reduced it) or ``"partial"`` (this rank's partial
    gradient; the true one is the sum over ranks). ``"partial"`` with a consumer that all-reduces
    counts the gradient P times; ``"replicated"`` with one that does not drops the other ranks'
    parts: match the consumer (module docstring).

    ``group`` None or P == 1: no collectives, both modes are the local add+RMSNorm.
    ``weight [H]`` may be None (no affine). Statistics in float32 (float64 for float64 input);
    outputs in ``partial.dtype``; the collectives move ``partial.dtype``. ``partial``'s gradient
    is the same on every rank (that of the sum); ``weight`` is replicated.
    Backends: ``"auto"``, ``"torch"``, ``"gloo"``, ``"nccl"``, ``"symm_mem"`` (module docstring).
    """
    check_fused_inputs(partial, residual, weight, eps, group=group, mode=mode, backend=backend,
                       normed_grad=normed_grad)
    launcher = make_launcher(group, backend, partial.device, async_op=False)
    # allreduce mode: the weight as given (every token is normalised here, its gradient complete)
    w = norm_weight(weight, group, mode) if mode == "reduce_scatter" and launcher is not None else weight
    call = FusedNormCall(partial, residual, w, float(eps), group=group, mode=mode, launcher=launcher,
                         normed_grad=normed_grad, unfused=backend == "torch")
    call.issue()
    residual_out = call.norm()
    call.issue_gather()
    return call.finish(), residual_out
