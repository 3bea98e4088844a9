"""Token-split overlap: a planner that says where to split a batch, and the runner that weaves.

A tensor-parallel block ends with a collective over the TP group (the all-reduce, or
reduce-scatter + all-gather, of the row-parallel output) that leaves the compute engine idle.
Split the batch's tokens into halves A and B and the collective of one half runs while the other
half computes (TokenWeave, Gond et al. 2025)::

    compute  | A0 | B0 |    | A1 | B1 |    | A2 | B2 | ...
    comm          | A0 | B0 | A1 | B1 |  ...

:func:`plan_token_split` picks the split with an analytic model of that two-engine schedule
(:class:`DeviceProfile` holds the costs, measured numbers calibrate it) instead of TokenWeave's
offline grid search; :class:`TokenWeaver` runs a stack of blocks on the two halves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from distnorm import comm
from distnorm.comm import Group, PendingCollective, group_rank, group_size, shard_sizes
from distnorm.overlap.fused import (
    BACKENDS,
    Backend,
    FusedNormCall,
    Mode,
    _finish,
    fused_allreduce_rms_norm,
    make_launcher,
)
from distnorm.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["DeviceProfile", "ParallelMLPBlock", "TokenSplitPlan", "TokenWeaver", "plan_token_split"]


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceProfile:
    """Costs of one device in one TP group, for :func:`plan_token_split`.

    The defaults describe an H100 in an 8-GPU NVLink group running bf16 (dense matmul at about
    600 TFLOP/s achieved; NCCL all-reduce at about 250 GB/s algorithmic bandwidth, ~12 us small-
    message latency, as reported for 8xH100 by nccl-tests and the TokenWeave paper). Use
    :meth:`calibrate` to fit the four numbers to your own measurements.
    """

    flops_per_s: float = 600e12
    """Achieved matmul throughput of one rank (FLOP/s)."""
    compute_latency_s: float = 10e-6
    """Fixed cost of running one block on any number of tokens (kernel launches, small ops)."""
    tile_tokens: int = 128
    """Matmul tile along tokens: compute is paid for whole tiles."""
    comm_latency_s: float = 12e-6
    """Fixed cost of one collective (alpha)."""
    comm_bytes_per_s: float = 250e9
    """All-reduce algorithmic bandwidth: payload bytes (tokens x hidden x itemsize) per second
    (beta). Reduce-scatter + all-gather move the same bytes at the same rate, with two latencies."""
    overlap_slowdown: float = 0.0
    """Fraction by which compute slows while a collective runs beside it (SM or core contention)."""

    def compute_s(self, tokens: int, flops_per_token: float) -> float:
        """Time to run one block on ``tokens`` tokens (0 for 0 tokens)."""
        if tokens <= 0:
            return 0.0
        tiles = math.ceil(tokens / self.tile_tokens)
        return self.compute_latency_s + tiles * self.tile_tokens * flops_per_token / self.flops_per_s

    def comm_s(self, payload_bytes: float, *, collectives: int = 1) -> float:
        """Time of ``collectives`` back-to-back collectives moving ``payload_bytes`` in all."""
        return collectives * self.comm_latency_s + payload_bytes / self.comm_bytes_per_s

    @classmethod
    def calibrate(
        cls,
        *,
        compute: Sequence[tuple[float, float]],
        comm: Sequence[tuple[float, float]],
        flops_per_token: float,
        tile_tokens: int = 128,
        overlap_slowdown: float = 0.0,
    ) -> DeviceProfile:
        """Fit a profile to measurements.

        ``compute``: ``(tokens, seconds)`` of one block; fits ``seconds = latency +
        tiles(tokens) * tile * flops_per_token / flops_per_s``. ``comm``: ``(payload_bytes,
        seconds)`` of one all-reduce on the group; fits ``seconds = alpha + bytes / beta``.
        Least squares on each, with latencies clamped to >= 0; each needs >= 2 distinct sizes.
        """
        work = [(math.ceil(t / tile_tokens) * tile_tokens * flops_per_token, s) for t, s in compute]
        c_lat, c_slope = _fit_line(work, "compute")
        m_lat, m_slope = _fit_line(list(comm), "comm")
        return cls(flops_per_s=1.0 / c_slope, compute_latency_s=c_lat, tile_tokens=tile_tokens,
                   comm_latency_s=m_lat, comm_bytes_per_s=1.0 / m_slope, overlap_slowdown=overlap_slowdown)


def _fit_line(points: list[tuple[float, float]], name: str) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` with ``a >= 0``, ``b > 0`` (refit through 0 if a < 0)."""
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    if len(set(xs)) < 2:
        raise ValueError(f"DeviceProfile.calibrate: {name} needs >= 2 distinct sizes, got {sorted(set(xs))}")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    if a < 0 or b <= 0:
        a, b = 0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    if b <= 0:
        raise ValueError(f"DeviceProfile.calibrate: {name} times do not grow with size: {points}")
    return a, b


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenSplitPlan:
    """Where to split ``num_tokens`` tokens: half A = the first ``first`` tokens, half B the rest.

    ``first == num_tokens`` means no split. ``predicted_*_s`` are the cost model's step times for
    the whole stack (0.0 when the plan was written by hand), ``reason`` says why.
    """

    num_tokens: int
    first: int
    reason: str = "given"
    predicted_unsplit_s: float = 0.0
    predicted_split_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.num_tokens:
            raise ValueError(f"TokenSplitPlan: first must be in [1, num_tokens={self.num_tokens}], got {self.first}")

    @property
    def split(self) -> bool:
        return self.first < self.num_tokens

    @property
    def second(self) -> int:
        return self.num_tokens - self.first

    @property
    def halves(self) -> tuple[int, ...]:
        return (self.first, self.second) if self.split else (self.num_tokens,)

    @classmethod
    def unsplit(cls, num_tokens: int) -> TokenSplitPlan:
        return cls(num_tokens=num_tokens, first=num_tokens, reason="unsplit")


def predict_step_s(
    halves: Sequence[int], hidden: int, world: int, *, device_profile: DeviceProfile,
    flops_per_token: float, num_layers: int, itemsize: int, mode: str,
) -> float:
    """Model step time of ``num_layers`` blocks run on ``halves`` (one or two token counts).

    Two engines, each serial: compute runs ``C(n)`` per block and half, in program order
    (A_i, B_i, A_{i+1}, ...); comm runs ``M(n)`` per block and half in issue order; a half's
    compute waits for its previous collective, its collective for its compute. ``M(n)`` is 0
    for ``world == 1``. With two halves compute is slowed by ``overlap_slowdown``.
    """
    prof = device_profile
    slow = 1.0 + (prof.overlap_slowdown if len(halves) > 1 else 0.0)
    n_coll = 1 if mode == "allreduce" else 2
    comp = [prof.compute_s(n, flops_per_token) * slow for n in halves]
    comm_t = [0.0 if world == 1 else prof.comm_s(n * hidden * itemsize, collectives=n_coll) for n in halves]
    compute_free = comm_free = 0.0
    ready = [0.0] * len(halves)
    for _ in range(num_layers):
        for h in range(len(halves)):
            compute_free = max(compute_free, ready[h]) + comp[h]
            comm_free = max(comm_free, compute_free) + comm_t[h]
            ready[h] = comm_free
    return max(ready)


def plan_token_split(
    num_tokens: int,
    hidden: int,
    world: int,
    *,
    device_profile: DeviceProfile | None = None,
    flops_per_token: float | None = None,
    num_layers: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    mode: Mode = "allreduce",
    min_gain: float = 0.01,
) -> TokenSplitPlan:
    """Split ``num_tokens`` into two halves that balance compute against communication.

    Cost model (per block, per half of ``n`` tokens; see ``docs/overlap.md``):

    * compute ``C(n) = compute_latency + ceil(n / tile) * tile * flops_per_token / flops_per_s``
      (``flops_per_token`` defaults to a 4x MLP sharded over ``world``: ``16 * hidden**2 / world``);
    * communication ``M(n) = k * comm_latency + n * hidden * itemsize / comm_bytes_per_s``
      with ``k = 1`` (allreduce) or 2 (reduce_scatter + all-gather), 0 when ``world == 1``;
    * the unsplit step is ``num_layers * (C(n) + M(n))``; a split step is the makespan of the
      two-engine schedule A_i, B_i (:func:`predict_step_s`) whose steady state per block is
      ``max(C(a) + C(b), M(a) + M(b), C(a) + M(a), C(b) + M(b))``: each half's critical path
      and each engine's load.

    Candidates for the first half are multiples of ``lcm(tile, world)`` (whole tiles, equal
    shards in reduce_scatter mode) with at least that many tokens left for the second half; the
    fastest wins if it beats the unsplit step by ``min_gain`` (relative), else no split. Batches
    shorter than two aligned halves, and ``world == 1``, never split.

    Returns a :class:`TokenSplitPlan` with the predicted times and the reason.
    """
    for name, value in (("num_tokens", num_tokens), ("hidden", hidden), ("world", world), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"plan_token_split: {name} must be a positive int, got {value!r} (rank {comm._global_rank()})")
    if mode not in ("allreduce", "reduce_scatter"):
        raise ValueError(f"plan_token_split: mode must be 'allreduce' or 'reduce_scatter', got {mode!r} "
                         f"(rank {comm._global_rank()})")
    prof = DeviceProfile() if device_profile is None else device_profile
    fpt = 16.0 * hidden * hidden / world if flops_per_token is None else float(flops_per_token)
    model = dict(device_profile=prof, flops_per_token=fpt, num_layers=num_layers,
                 itemsize=torch.empty((), dtype=dtype).element_size(), mode=mode)
    unsplit = predict_step_s([num_tokens], hidden, world, **model)  # type: ignore[arg-type]
    plan = TokenSplitPlan(num_tokens=num_tokens, first=num_tokens, predicted_unsplit_s=unsplit,
                          predicted_split_s=unsplit, reason="")
    align = math.lcm(prof.tile_tokens, world)
    if world == 1:
        return replace(plan, reason="world == 1: nothing to overlap")
    if num_tokens < 2 * align:
        return replace(plan, reason=f"{num_tokens} tokens < two aligned halves of lcm(tile, world) = {align}")
    best_first, best = num_tokens, unsplit
    for first in range(align, num_tokens - align + 1, align):
        t = predict_step_s([first, num_tokens - first], hidden, world, **model)  # type: ignore[arg-type]
        if t < best:
            best_first, best = first, t
    if best > unsplit * (1.0 - min_gain):
        return replace(plan, reason=f"best split saves {1 - best / unsplit:.1%} < min_gain {min_gain:.1%}")
    return replace(plan, first=best_first, predicted_split_s=best,
                   reason=f"split {best_first}+{num_tokens - best_first} saves {1 - best / unsplit:.1%}")


# --------------------------------------------------------------------------------------------
# A tensor-parallel block, and the weaver
# --------------------------------------------------------------------------------------------


class WeaveBlock(Protocol):
    """What :class:`TokenWeaver` needs of a block: ``partial(x) -> [T, H]`` row-parallel partial
    sums (no collective in forward), and the RMSNorm that follows it (``norm_weight [H]``, ``eps``)."""

    norm_weight: torch.Tensor | None
    eps: float

    def partial(self, x: torch.Tensor) -> torch.Tensor: ...


class ParallelMLPBlock(nn.Module):
    """``ColumnParallelLinear -> GELU -> RowParallelLinear(reduce_output=False)``, then the fused
    all-reduce + residual + RMSNorm that ends every TP block.

    ``forward(x, residual)``: ``x [T, H]`` (normed, replicated), ``residual`` as
    :func:`fused_allreduce_rms_norm` wants it for ``mode`` -> ``(normed [T, H], residual_out)``.
    Collectives (P > 1): those of the fused op, plus the column linear's bwd all-reduce of the
    input gradient (``T*H`` elements). P == 1: none.
    """

    def __init__(self, hidden: int, ffn_hidden: int, *, group: Group = None, eps: float = 1e-6, bias: bool = True,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.group, self.eps = group, eps
        self.fc1 = ColumnParallelLinear(hidden, ffn_hidden, bias, group=group, generator=generator, dtype=dtype,
                                        device=device)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, bias, group=group, reduce_output=False, generator=generator,
                                     dtype=dtype, device=device)
        self.norm_weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm_weight)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x: torch.Tensor, residual: torch.Tensor, *, mode: Mode = "allreduce",
                backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        return fused_allreduce_rms_norm(self.partial(x), residual, self.norm_weight, self.eps, group=self.group,
                                        mode=mode, backend=backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, group_size={group_size(self.group)}"


class _StandInLauncher:
    """Benchmark stand-in for a collective on one device: ``stand_in(x)`` (work of known duration)
    runs on a side stream (CUDA) or inline (CPU); the result is the input (a world of one)."""

    world = 1

    def __init__(self, stand_in: Callable[[torch.Tensor], None]) -> None:
        self.stand_in = stand_in
        self._streams: dict[torch.device, Any] = {}

    def _run(self, x: torch.Tensor) -> PendingCollective:
        if x.device.type != "cuda":
            self.stand_in(x)
            return PendingCollective.done(x)
        stream = self._streams.setdefault(x.device, torch.cuda.Stream(device=x.device))
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            self.stand_in(x)
        x.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)

        def finish() -> torch.Tensor:
            torch.cuda.current_stream(x.device).wait_event(done)
            return x

        return PendingCollective(None, finish)

    def all_reduce(self, x: torch.Tensor) -> PendingCollective:
        return self._run(x)

    def reduce_scatter(self, x: torch.Tensor, sizes: list[int]) -> PendingCollective:
        return self._run(x)

    def all_gather(self, x_shard: torch.Tensor, sizes: list[int]) -> PendingCollective:
        return self._run(x_shard)


PlanArg = TokenSplitPlan | Callable[[int], TokenSplitPlan] | None


class TokenWeaver(nn.Module):
    """Run a stack of TP blocks on two token halves, overlapping one half's collective with the
    other half's compute.

    ``forward(x, residual)``: ``x [T, H]`` (the first block's normed input) and ``residual
    [T, H]``, both replicated over ``group`` -> ``(normed [T, H], residual_out [T, H])``, equal to
    running the blocks one after another on all tokens (``plan=None``) up to round-off.

    Schedule per block i (halves A, B; each ``finish`` waits for that half's collective and
    applies the fused residual + RMSNorm)::

        compute A_i | issue A_i | finish B_{i-1} | compute B_i | issue B_i | finish A_i

    so B_i's compute runs while A_i's collective is in flight, and A_{i+1}'s while B_i's is. On
    gloo/NCCL "issue" returns a work handle (NCCL runs on its own stream); the ``symm_mem``
    backend and the benchmark ``stand_in`` use one side stream. No host syncs: capturable in a
    CUDA graph on NCCL/symm_mem. Backward is the autograd of the same graph (correct, not
    overlapped).

    ``plan``: a :class:`TokenSplitPlan` for ``T`` tokens, a callable ``T -> plan`` (e.g. a
    ``functools.partial`` of :func:`plan_token_split`), or None (no split).
    ``mode``/``backend``: as :func:`fused_allreduce_rms_norm`. In ``"reduce_scatter"`` mode the
    residual stays token-sharded between blocks; it is sliced on entry (bwd: 1 all-gather per
    half) and all-gathered on exit (fwd: 1 all-gather per half).

    Collectives per forward (P > 1, h = number of halves, L blocks): allreduce mode ``h*L``
    all-reduces; reduce_scatter mode ``h*L`` reduce-scatters and ``h*(L+1)`` all-gathers.
    ``stand_in``: benchmarks only, with a group of one — every collective becomes ``stand_in(x)``
    on a side stream (e.g. a sleep kernel sized like the real all-reduce).
    """

    def __init__(self, blocks: Sequence[nn.Module], group: Group, plan: PlanArg = None, *,
                 mode: Mode = "allreduce", backend: Backend = "auto",
                 stand_in: Callable[[torch.Tensor], None] | None = None) -> None:
        super().__init__()
        where = f"rank {group_rank(group)} of {group_size(group)}"
        if len(blocks) == 0:
            raise ValueError(f"TokenWeaver: blocks must be a non-empty sequence, got {len(blocks)} blocks ({where})")
        for i, block in enumerate(blocks):
            if not callable(getattr(block, "partial", None)) or not hasattr(block, "norm_weight"):
                raise TypeError(f"TokenWeaver: blocks[{i}] ({type(block).__name__}) must have partial(x) and "
                                f"norm_weight, eps (see WeaveBlock) ({where})")
        if mode not in ("allreduce", "reduce_scatter"):
            raise ValueError(f"TokenWeaver: mode must be 'allreduce' or 'reduce_scatter', got {mode!r} ({where})")
        if backend not in BACKENDS:
            raise ValueError(f"TokenWeaver: backend must be one of {BACKENDS}, got {backend!r} ({where})")
        if stand_in is not None and group_size(group) > 1:
            raise ValueError(f"TokenWeaver: stand_in replaces the collective of a one-device benchmark; "
                             f"got a group of {group_size(group)} ranks ({where})")
        self.blocks = nn.ModuleList(blocks)
        self.group, self.plan, self.mode, self.backend, self.stand_in = group, plan, mode, backend, stand_in

    def _plan_for(self, num_tokens: int) -> TokenSplitPlan:
        plan = self.plan(num_tokens) if callable(self.plan) else self.plan
        if plan is None:
            return TokenSplitPlan.unsplit(num_tokens)
        if plan.num_tokens != num_tokens:
            raise ValueError(f"TokenWeaver: plan is for num_tokens={plan.num_tokens}, got an input of {num_tokens} "
                             f"tokens (pass a callable plan for varying batches) (rank {group_rank(self.group)})")
        return plan

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"rank {group_rank(self.group)} of {group_size(self.group)}"
        if x.dim() != 2 or residual.shape != x.shape:
            raise ValueError(f"TokenWeaver: x and residual must both be [tokens, hidden] with the same shape (every "
                             f"token, replicated), got {tuple(x.shape)} and {tuple(residual.shape)} ({where})")
        if residual.dtype != x.dtype:
            raise TypeError(f"TokenWeaver: residual dtype must equal x's {x.dtype}, got {residual.dtype} ({where})")
        plan = self._plan_for(x.shape[0])
        launcher = (_StandInLauncher(self.stand_in) if self.stand_in is not None
                    else make_launcher(self.group, self.backend, x.device, async_op=True, fn="TokenWeaver"))
        world = 1 if launcher is None else launcher.world
        rs = self.mode == "reduce_scatter"
        xs = list(x.split(list(plan.halves), dim=0))
        res = list(residual.split(list(plan.halves), dim=0))
        if rs:  # keep this rank's token shard of each half's residual
            res = [comm.scatter_along(r, self.group, sizes=shard_sizes(r.shape[0], world)) for r in res]
        unfused = self.backend == "torch"
        in_flight: list[FusedNormCall | None] = [None] * len(xs)
        for block in cast(list[WeaveBlock], list(self.blocks)):
            # upcast once per block: both halves' weight gradients then add up in float32 and are
            # rounded to the weight's dtype once, as in the unsplit run
            weight = block.norm_weight
            weight = weight if weight is None else weight.to(torch.promote_types(weight.dtype, torch.float32))
            for h in range(len(xs)):
                call = FusedNormCall(block.partial(xs[h]), res[h], weight, block.eps, group=self.group,
                                     mode=self.mode, launcher=launcher, unfused=unfused)
                prev = (h - 1) % len(xs)
                if in_flight[prev] is not None and prev != h:
                    xs[prev], res[prev] = in_flight[prev].finish()  # type: ignore[union-attr]
                    in_flight[prev] = None
                in_flight[h] = call
                if len(xs) == 1:
                    xs[h], res[h] = call.finish()
                    in_flight[h] = None
        for h, pending in enumerate(in_flight):
            if pending is not None:
                xs[h], res[h] = pending.finish()
        if rs and launcher is not None:
            res = [_finish(r, launcher.all_gather(r.detach(), shard_sizes(n, world)), "all_gather", self.group,
                           shard_sizes(n, world)) for r, n in zip(res, plan.halves, strict=True)]
        if len(xs) == 1:
            return xs[0], res[0]
        return torch.cat(xs, dim=0), torch.cat(res, dim=0)

    def extra_repr(self) -> str:
        plan = self.plan if isinstance(self.plan, TokenSplitPlan) else ("callable" if self.plan else None)
        return f"mode={self.mode!r}, backend={self.backend!r}, plan={plan}, group_size={group_size(self.group)}"
