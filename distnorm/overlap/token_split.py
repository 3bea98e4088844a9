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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distnorm import comm
from distnorm.comm import Group, PendingCollective, group_rank, group_size, shard_sizes
from distnorm.overlap.fused import (
    NORMED_GRADS,
    Backend,
    CollectiveLauncher,
    Mode,
    NormedGrad,
    check_norm_weight,
    check_options,
    fused_allreduce_rms_norm,
    make_launcher,
)
from distnorm.overlap.schedule import Step, chain, replay
from distnorm.overlap.weave import ChunkLayout, WeaveBlock, WeaveRun, can_weave, woven
from distnorm.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["DeviceProfile", "ParallelMLPBlock", "TokenSplitPlan", "TokenWeaver", "WeaveBlock", "plan_token_split"]


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
    backward_compute_ratio: float = 2.0
    """Backward compute of a block / its forward compute (a matmul's backward is two matmuls)."""

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
        backward_compute_ratio: float = 2.0,
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
                   comm_latency_s=m_lat, comm_bytes_per_s=1.0 / m_slope, overlap_slowdown=overlap_slowdown,
                   backward_compute_ratio=backward_compute_ratio)


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
    """Where to split ``num_tokens`` tokens: half A = the first ``first`` tokens, half B the rest;
    or, with ``chunks``, that many chunks of those token counts (``chunks[0] == first``).

    ``first == num_tokens`` means no split. ``predicted_*_s`` are the cost model's step times for
    the whole stack (0.0 when the plan was written by hand), ``reason`` says why.
    """

    num_tokens: int
    first: int
    reason: str = "given"
    predicted_unsplit_s: float = 0.0
    predicted_split_s: float = 0.0
    chunks: tuple[int, ...] = ()
    """Token counts of every chunk when there are three or more (empty: the halves ``first`` and
    ``num_tokens - first``). Three let reduce_scatter mode hide both of a chunk's collectives."""

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.num_tokens:
            raise ValueError(f"TokenSplitPlan: first must be in [1, num_tokens={self.num_tokens}], got {self.first}")
        if self.chunks and (sum(self.chunks) != self.num_tokens or min(self.chunks) < 1
                            or self.chunks[0] != self.first or len(self.chunks) < 2):
            raise ValueError(f"TokenSplitPlan: chunks must be >= 2 positive token counts summing to num_tokens="
                             f"{self.num_tokens}, the first equal to first={self.first}, got {self.chunks}")

    @property
    def split(self) -> bool:
        return self.first < self.num_tokens

    @property
    def second(self) -> int:
        """Tokens after the first chunk (half B, or every later chunk)."""
        return self.num_tokens - self.first

    @property
    def halves(self) -> tuple[int, ...]:
        """Token counts of the chunks, in order (one entry when unsplit)."""
        if self.chunks:
            return self.chunks
        return (self.first, self.second) if self.split else (self.num_tokens,)

    @classmethod
    def unsplit(cls, num_tokens: int) -> TokenSplitPlan:
        return cls(num_tokens=num_tokens, first=num_tokens, reason="unsplit")


def predict_step_s(
    halves: Sequence[int], hidden: int, world: int, *, device_profile: DeviceProfile,
    flops_per_token: float, num_layers: int, itemsize: int, mode: str,
    training: bool = False, normed_grad: str = "replicated",
) -> float:
    """Model step time of ``num_layers`` blocks run on ``halves`` (token counts of the chunks).

    Replays TokenWeaver's own schedule (:func:`distnorm.overlap.schedule.replay`) on two serial
    engines: the host runs ``C(n)`` per block and chunk (``backward_compute_ratio * C(n)`` in the
    backward; the add + RMSNorm is taken as free), a FIFO link runs the collectives -- an
    all-reduce ``M(n) = comm_latency + n * hidden * itemsize / comm_bytes_per_s``, a
    reduce-scatter or all-gather ``comm_latency`` + half those bytes' time (the two make one
    all-reduce). A chunk's work waits for its last collective. ``training``: forward + backward;
    the backward adds, per ``normed_grad``, the consumer's blocking all-reduce of ``x``'s
    gradient (``"replicated"``) and, in reduce_scatter mode, the weight gradient's all-reduce
    (``H`` float32, waited at the end). Collectives cost 0 for ``world == 1``; with more than one
    chunk compute is slowed by ``overlap_slowdown``.
    """
    prof = device_profile
    slow = 1.0 + (prof.overlap_slowdown if len(halves) > 1 else 0.0)
    comm_on = world > 1
    ratio = {"compute": 1.0, "compute_bwd": prof.backward_compute_ratio}

    def host_s(work: tuple[str, int], n: int) -> float:
        return prof.compute_s(n, flops_per_token) * slow * ratio.get(work[0], 0.0)

    def link_s(kind: str, n: int) -> float:
        if not comm_on:
            return 0.0
        if kind == "all_reduce":
            return prof.comm_s(n * hidden * itemsize)
        return prof.comm_latency_s + n * hidden * itemsize / (2 * prof.comm_bytes_per_s)

    def blocking_s(work: tuple[str, int], n: int) -> float:
        replicated = work[0] == "compute_bwd" and normed_grad == "replicated"
        return link_s("all_reduce", n) if replicated else 0.0

    def weight_grad_s(step: Step) -> float:
        norms = sum(1 for what, _ in step.work if what == "norm_bwd")
        return norms * prof.comm_s(hidden * 4) if comm_on and mode == "reduce_scatter" else 0.0

    total = replay(chain(mode, num_layers), halves, host_s=host_s, link_s=link_s)
    if training:
        total += replay(chain(mode, num_layers, backward=True, normed_grad=normed_grad), halves, host_s=host_s,
                        link_s=link_s, blocking_s=blocking_s, round_link_s=weight_grad_s)
    return total


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
    training: bool = False,
    normed_grad: NormedGrad = "replicated",
    max_chunks: int = 2,
) -> TokenSplitPlan:
    """Split ``num_tokens`` into two halves (or, with ``max_chunks=3``, up to three chunks) that
    balance compute against communication.

    Cost model (per block, per chunk of ``n`` tokens; see ``docs/overlap.md``):

    * compute ``C(n) = compute_latency + ceil(n / tile) * tile * flops_per_token / flops_per_s``
      (``flops_per_token`` defaults to a 4x MLP sharded over ``world``: ``16 * hidden**2 / world``);
    * communication ``M(n) = k * comm_latency + n * hidden * itemsize / comm_bytes_per_s``
      with ``k = 1`` (allreduce) or 2 (reduce_scatter + all-gather), 0 when ``world == 1``;
    * the unsplit step is ``num_layers * (C(n) + M(n))``; a split step is the makespan of
      TokenWeaver's schedule replayed on a host and a FIFO link (:func:`predict_step_s`); in
      allreduce mode its steady state per block is ``max(C(a) + C(b), M(a) + M(b), C(a) + M(a),
      C(b) + M(b))``: each half's critical path and each engine's load. In reduce_scatter mode
      the norm between a chunk's two collectives runs on the host, so with two halves only one of
      them can hide behind the other half's compute; three chunks hide both.
    * ``training``: the step is forward + backward (``normed_grad`` as the blocks use it).

    Candidates: the first half a multiple of ``lcm(tile, world)`` (whole tiles, equal shards in
    reduce_scatter mode) with at least that many tokens left; with ``max_chunks=3`` also three
    chunks ``(a, a, rest)``, ``a`` aligned, ``rest >= align``. The fastest wins if it beats the
    unsplit step by ``min_gain`` (relative), else no split. Batches shorter than two aligned
    halves, and ``world == 1``, never split.

    Returns a :class:`TokenSplitPlan` with the predicted times and the reason.
    """
    for name, value in (("num_tokens", num_tokens), ("hidden", hidden), ("world", world), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"plan_token_split: {name} must be a positive int, got {value!r} (rank {comm._global_rank()})")
    if mode not in ("allreduce", "reduce_scatter"):
        raise ValueError(f"plan_token_split: mode must be 'allreduce' or 'reduce_scatter', got {mode!r} "
                         f"(rank {comm._global_rank()})")
    if normed_grad not in NORMED_GRADS:
        raise ValueError(f"plan_token_split: normed_grad must be one of {NORMED_GRADS}, got {normed_grad!r} "
                         f"(rank {comm._global_rank()})")
    if max_chunks not in (2, 3):
        raise ValueError(f"plan_token_split: max_chunks must be 2 or 3, got {max_chunks!r} (rank {comm._global_rank()})")
    prof = DeviceProfile() if device_profile is None else device_profile
    fpt = 16.0 * hidden * hidden / world if flops_per_token is None else float(flops_per_token)
    model = dict(device_profile=prof, flops_per_token=fpt, num_layers=num_layers,
                 itemsize=torch.empty((), dtype=dtype).element_size(), mode=mode, training=training,
                 normed_grad=normed_grad)
    unsplit = predict_step_s([num_tokens], hidden, world, **model)  # type: ignore[arg-type]
    plan = TokenSplitPlan(num_tokens=num_tokens, first=num_tokens, predicted_unsplit_s=unsplit,
                          predicted_split_s=unsplit, reason="")
    align = math.lcm(prof.tile_tokens, world)
    if world == 1:
        return replace(plan, reason="world == 1: nothing to overlap")
    if num_tokens < 2 * align:
        return replace(plan, reason=f"{num_tokens} tokens < two aligned halves of lcm(tile, world) = {align}")
    candidates: list[tuple[int, ...]] = [(a, num_tokens - a) for a in range(align, num_tokens - align + 1, align)]
    if max_chunks == 3:
        candidates += [(a, a, num_tokens - 2 * a) for a in range(align, (num_tokens - align) // 2 + 1, align)]
    best_chunks: tuple[int, ...] = (num_tokens,)
    best = unsplit
    for chunks in candidates:
        t = predict_step_s(chunks, hidden, world, **model)  # type: ignore[arg-type]
        if t < best:
            best_chunks, best = chunks, t
    if best > unsplit * (1.0 - min_gain):
        return replace(plan, reason=f"best split saves {1 - best / unsplit:.1%} < min_gain {min_gain:.1%}")
    return replace(plan, first=best_chunks[0], chunks=best_chunks if len(best_chunks) > 2 else (),
                   predicted_split_s=best,
                   reason=f"split {'+'.join(map(str, best_chunks))} saves {1 - best / unsplit:.1%}")


# --------------------------------------------------------------------------------------------
# A tensor-parallel block, and the weaver
# --------------------------------------------------------------------------------------------


class ParallelMLPBlock(nn.Module):
    """``ColumnParallelLinear -> GELU -> RowParallelLinear(reduce_output=False)``, then the fused
    all-reduce + residual + RMSNorm that ends every TP block.

    ``forward(x, residual)``: ``x [T, H]`` (normed, replicated), ``residual`` as
    :func:`fused_allreduce_rms_norm` wants it for ``mode`` -> ``(normed [T, H], residual_out)``.
    ``normed_grad``: the gradient convention of ``x`` and ``normed`` (see
    :func:`fused_allreduce_rms_norm`): ``"replicated"`` -- the column linear all-reduces ``x``'s
    gradient (bwd 1 all-reduce of ``T*H`` elements) -- or ``"partial"`` -- it does not, and the
    fused op that produced ``x`` reduces it (the minimum bytes).
    Collectives (P > 1): those of the fused op, the column linear's as just said, and (with a bias)
    1 all-reduce of ``H`` numbers in bwd for the row linear's replicated bias. P == 1: none.
    """

    def __init__(self, hidden: int, ffn_hidden: int, *, group: Group = None, eps: float = 1e-6, bias: bool = True,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, normed_grad: NormedGrad = "replicated") -> None:
        super().__init__()
        if normed_grad not in NORMED_GRADS:
            raise ValueError(f"ParallelMLPBlock: normed_grad must be one of {NORMED_GRADS}, got {normed_grad!r} "
                             f"(rank {group_rank(group)} of {group_size(group)})")
        self.group, self.eps, self.normed_grad = group, eps, normed_grad
        self.fc1 = ColumnParallelLinear(hidden, ffn_hidden, bias, group=group, generator=generator, dtype=dtype,
                                        device=device)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, bias, group=group, reduce_output=False, generator=generator,
                                     dtype=dtype, device=device)
        self.norm_weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm_weight)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        # "partial": this rank's column shard sees x as a local input; its gradient stays partial
        h = self.fc1(x) if self.normed_grad == "replicated" else F.linear(x, self.fc1.weight, self.fc1.bias)
        return self.fc2(F.gelu(h))

    def forward(self, x: torch.Tensor, residual: torch.Tensor, *, mode: Mode = "allreduce",
                backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        return fused_allreduce_rms_norm(self.partial(x), residual, self.norm_weight, self.eps, group=self.group,
                                        mode=mode, backend=backend, normed_grad=self.normed_grad)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, normed_grad={self.normed_grad!r}, group_size={group_size(self.group)}"


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
LauncherWrapper = Callable[[CollectiveLauncher], CollectiveLauncher]


class TokenWeaver(nn.Module):
    """Run a stack of TP blocks on two token halves, overlapping one half's collective with the
    other half's compute, in the forward and in the backward.

    ``forward(x, residual)``: ``x [T, H]`` (the first block's normed input, replicated over
    ``group``) and ``residual`` as :func:`fused_allreduce_rms_norm` holds it for ``mode`` --
    ``[T, H]`` (allreduce) or this rank's token shard ``[shard_sizes(T, P)[rank], H]``
    (reduce_scatter) -> ``(normed [T, H], residual_out)`` laid out like ``residual``: equal, up to
    round-off, to ``for b in blocks: x, residual = b(x, residual, mode=mode)`` (``plan=None``).

    Schedule (:mod:`distnorm.overlap.schedule`): the halves take turns step by step -- wait for
    the half's last collective, compute (``block.partial``) or normalise, issue the next
    collective -- so each collective is in flight while the other half computes::

        allreduce fwd  compute A_i | issue A_i | wait B_{i-1}, norm | compute B_i | issue B_i | wait A_i, norm

    The backward is woven the same way (its collectives issued asynchronously, one half's in
    flight during the other half's backward compute) whenever gradients are wanted, the code is
    not being compiled and no saved-tensor hooks are active (:func:`~distnorm.overlap.weave.can_weave`);
    under ``torch.compile``, non-reentrant or selective activation checkpointing (whose recompute
    runs once per backward call) and offloading hooks it is the autograd of the forward graph
    (the same gradients, collectives blocking); reentrant checkpointing weaves the backward of
    its recomputed forward. On gloo/NCCL "issue" returns a work handle; ``symm_mem`` and
    ``stand_in`` use one side stream. No host syncs.

    ``plan``: a :class:`TokenSplitPlan` for ``T`` tokens, a callable ``T -> plan`` (e.g. a
    ``functools.partial`` of :func:`plan_token_split`), or None (no split). In reduce_scatter
    mode a half is the same share of *every rank's* residual shard (``shard_sizes(first, P)``
    rows of each), so no token changes rank.
    ``mode``/``backend``/``normed_grad``: as :func:`fused_allreduce_rms_norm`; every block's
    ``normed_grad`` attribute (default ``"replicated"``) must match ``normed_grad``: it is the
    gradient its ``partial`` hands back for ``x``. Every block's ``norm_weight`` must be None or a
    floating ``[H]`` tensor on ``x``'s device, checked at each forward (shape metadata only), so
    that one assigned or passed through ``torch.func.functional_call`` with another shape is a
    ValueError naming it, never a broadcast.

    Collectives (P > 1, h halves, L blocks, per forward): allreduce mode ``h*L`` all-reduces;
    reduce_scatter mode ``h*L`` reduce-scatters and ``h*L`` all-gathers. Backward, besides the
    blocks' own: ``normed_grad="partial"`` the same kinds and counts again (allreduce) or ``h*L``
    reduce-scatters + ``h*L`` all-gathers (reduce_scatter); ``"replicated"`` none (allreduce) or
    ``h*L`` all-gathers (reduce_scatter); reduce_scatter mode adds ``L`` all-reduces of ``H``
    float32 numbers (the norm weights' gradients, one per block for both halves).

    ``wrap_launcher``: a function applied to the collective launcher (benchmarks and tests: e.g.
    ``SimulatedLink(...).wrap`` makes every collective also take a modelled link's time).
    ``stand_in``: benchmarks only, with a group of one -- every collective becomes ``stand_in(x)``
    on a side stream (e.g. a sleep kernel sized like the real all-reduce).
    """

    def __init__(self, blocks: Sequence[nn.Module], group: Group, plan: PlanArg = None, *,
                 mode: Mode = "allreduce", backend: Backend = "auto", normed_grad: NormedGrad = "replicated",
                 stand_in: Callable[[torch.Tensor], None] | None = None,
                 wrap_launcher: LauncherWrapper | None = None) -> None:
        super().__init__()
        where = f"rank {group_rank(group)} of {group_size(group)}"
        if len(blocks) == 0:
            raise ValueError(f"TokenWeaver: blocks must be a non-empty sequence, got {len(blocks)} blocks ({where})")
        check_options(mode, backend, normed_grad, group=group, fn="TokenWeaver")
        for i, block in enumerate(blocks):
            if not callable(getattr(block, "partial", None)) or not hasattr(block, "norm_weight"):
                raise TypeError(f"TokenWeaver: blocks[{i}] ({type(block).__name__}) must have partial(x) and "
                                f"norm_weight, eps (see WeaveBlock) ({where})")
            block_grad = getattr(block, "normed_grad", "replicated")
            if block_grad != normed_grad:
                raise ValueError(f"TokenWeaver: blocks[{i}].normed_grad is {block_grad!r} but normed_grad="
                                 f"{normed_grad!r}: the gradient a block hands back for x must be the one the weaver "
                                 f"expects, else it is reduced twice or not at all ({where})")
        if stand_in is not None and group_size(group) > 1:
            raise ValueError(f"TokenWeaver: stand_in replaces the collective of a one-device benchmark; "
                             f"got a group of {group_size(group)} ranks ({where})")
        self.blocks = nn.ModuleList(blocks)
        self.group, self.plan, self.mode, self.backend, self.stand_in = group, plan, mode, backend, stand_in
        self.normed_grad, self.wrap_launcher = normed_grad, wrap_launcher

    def _plan_for(self, num_tokens: int) -> TokenSplitPlan:
        plan = self.plan(num_tokens) if callable(self.plan) else self.plan
        if plan is None:
            return TokenSplitPlan.unsplit(num_tokens)
        if plan.num_tokens != num_tokens:
            raise ValueError(f"TokenWeaver: plan is for num_tokens={plan.num_tokens}, got an input of {num_tokens} "
                             f"tokens (pass a callable plan for varying batches) (rank {group_rank(self.group)})")
        return plan

    def _launcher(self, device: torch.device) -> CollectiveLauncher | None:
        if self.stand_in is not None:
            return _StandInLauncher(self.stand_in)
        launcher = make_launcher(self.group, self.backend, device, async_op=True, fn="TokenWeaver")
        return launcher if launcher is None or self.wrap_launcher is None else self.wrap_launcher(launcher)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"rank {group_rank(self.group)} of {group_size(self.group)}"
        if x.dim() != 2:
            raise ValueError(f"TokenWeaver: x must be [tokens, hidden] (every token, replicated), got "
                             f"{tuple(x.shape)} ({where})")
        launcher = self._launcher(x.device)
        world = 1 if launcher is None else launcher.world
        rank = group_rank(self.group) if world > 1 else 0
        tokens, hidden = x.shape
        if self.mode == "allreduce":
            expected, why = (tokens, hidden), "allreduce mode: every token, like x"
        else:
            expected = (shard_sizes(tokens, world)[rank], hidden)
            why = f"reduce_scatter mode: this rank's token shard, shard_sizes({tokens}, {world})"
        if tuple(residual.shape) != expected:
            raise ValueError(f"TokenWeaver: residual must have shape {expected} ({why}), got "
                             f"{tuple(residual.shape)} ({where})")
        if residual.dtype != x.dtype:
            raise TypeError(f"TokenWeaver: residual dtype must equal x's {x.dtype}, got {residual.dtype} ({where})")
        for i, block in enumerate(self.blocks):  # read now: functional_call and assignment swap them
            check_norm_weight(block.norm_weight, hidden, x.device, name=f"blocks[{i}].norm_weight", like="x",
                              fn="TokenWeaver", where=where)
        plan = self._plan_for(tokens)
        params = list({id(p): p for p in self.parameters() if p.requires_grad}.values())
        record = can_weave() and (x.requires_grad or residual.requires_grad or bool(params))
        run = WeaveRun(list(self.blocks), group=self.group, launcher=launcher,
                       layout=ChunkLayout(self.mode, tokens, plan.halves, world, rank), mode=self.mode,
                       normed_grad=self.normed_grad, unfused=self.backend == "torch", record=record, params=params)
        return woven(run, x, residual) if record else run.forward(x, residual)

    def extra_repr(self) -> str:
        plan = self.plan if isinstance(self.plan, TokenSplitPlan) else ("callable" if self.plan else None)
        return (f"mode={self.mode!r}, backend={self.backend!r}, normed_grad={self.normed_grad!r}, plan={plan}, "
                f"group_size={group_size(self.group)}")
