"""A modelled network link, so that compute/communication overlap can be measured on a CPU.

On a CPU with gloo a collective runs on the same cores as the compute it should overlap, so there
is nothing to overlap onto (benchmarks/RESULTS.md). :class:`SimulatedLink` restores the missing
engine: wrapped around a :class:`~distnorm.overlap.fused.CollectiveLauncher` (e.g.
``TokenWeaver(..., wrap_launcher=link.wrap)``), every collective is still issued for real -- its
result is exact -- and its ``wait()`` also lasts until a modelled link would have delivered it.
The link serves collectives one at a time in issue order (FIFO, like one NIC), each taking::

    latency_s + (bytes a ring algorithm moves per rank) / bus_bytes_per_s

with a ring's ``2 (P-1)/P`` of the payload for an all-reduce and ``(P-1)/P`` for a reduce-scatter
or an all-gather (the payload being the whole, unsharded tensor), so ``bus_bytes_per_s`` is the
"bus bandwidth" of nccl-tests. The waiting thread sleeps out the remainder, leaving the cores to
the other ranks' compute as a NIC would: a collective whose wait comes late enough costs no time.
This is the schedule a background thread serving a FIFO queue would produce, computed at issue
time instead (deterministic, and testable with a fake clock).

Test and benchmark infrastructure: it adds time, never changes a result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from distnorm.comm import PendingCollective
from distnorm.overlap.fused import CollectiveLauncher

__all__ = ["SimulatedLink"]

_RING_SHARE = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0}


class SimulatedLink:
    """One rank's link: ``latency_s`` per collective and ``bus_bytes_per_s`` bus bandwidth.

    ``wrap(launcher)`` returns a launcher whose collectives also take the link's time (module
    docstring). State: ``free_at`` (when the link finishes its queue), ``injected_s`` (link time
    of every collective issued so far) and ``collectives`` (their number); :meth:`reset` zeroes
    the counters. One instance per rank (ranks of ``distnorm.testing.simulate`` are threads).
    ``clock``/``sleep`` default to ``time.perf_counter``/``time.sleep`` (tests pass fakes).
    """

    def __init__(self, *, latency_s: float, bus_bytes_per_s: float,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> None:
        if not latency_s >= 0:
            raise ValueError(f"SimulatedLink: latency_s must be >= 0, got {latency_s!r}")
        if not bus_bytes_per_s > 0:
            raise ValueError(f"SimulatedLink: bus_bytes_per_s must be > 0 (float('inf') for no bandwidth cost), "
                             f"got {bus_bytes_per_s!r}")
        self.latency_s, self.bus_bytes_per_s = float(latency_s), float(bus_bytes_per_s)
        self.clock, self.sleep = clock, sleep
        self.free_at = 0.0
        self.reset()

    def reset(self) -> None:
        self.injected_s, self.collectives = 0.0, 0

    def collective_s(self, kind: str, payload_bytes: float, world: int) -> float:
        """Link time of one ``kind`` collective of a ``payload_bytes`` tensor over ``world`` ranks."""
        if kind not in _RING_SHARE:
            raise ValueError(f"SimulatedLink: kind must be one of {sorted(_RING_SHARE)}, got {kind!r}")
        if world <= 1:
            return 0.0
        return self.latency_s + _RING_SHARE[kind] * (world - 1) / world * payload_bytes / self.bus_bytes_per_s

    def all_reduce_bytes_per_s(self, world: int) -> float:
        """The all-reduce *algorithmic* bandwidth (payload / time, latency aside) over ``world``
        ranks: ``DeviceProfile.comm_bytes_per_s`` for a planner that should see this link."""
        return self.bus_bytes_per_s * world / (2.0 * (world - 1)) if world > 1 else float("inf")

    def delay(self, pending: PendingCollective, seconds: float) -> PendingCollective:
        """``pending`` whose wait also lasts until the link, serving in issue order, has spent
        ``seconds`` on it."""
        done_at = max(self.clock(), self.free_at) + seconds
        self.free_at = done_at
        self.injected_s += seconds
        self.collectives += 1

        def finish() -> torch.Tensor:
            result = pending.wait()
            remaining = done_at - self.clock()
            if remaining > 0:
                self.sleep(remaining)
            return result

        return PendingCollective(None, finish)

    def wrap(self, launcher: CollectiveLauncher) -> CollectiveLauncher:
        """``launcher`` with every collective also taking this link's time."""
        return _LinkLauncher(launcher, self)


class _LinkLauncher:
    """A launcher whose collectives are the inner launcher's plus the link's time."""

    def __init__(self, inner: CollectiveLauncher, link: SimulatedLink) -> None:
        self.inner, self.link, self.world = inner, link, inner.world

    def all_reduce(self, x: torch.Tensor) -> PendingCollective:
        seconds = self.link.collective_s("all_reduce", x.nbytes, self.world)
        return self.link.delay(self.inner.all_reduce(x), seconds)

    def reduce_scatter(self, x: torch.Tensor, sizes: list[int]) -> PendingCollective:
        seconds = self.link.collective_s("reduce_scatter", x.nbytes, self.world)
        return self.link.delay(self.inner.reduce_scatter(x, sizes), seconds)

    def all_gather(self, x_shard: torch.Tensor, sizes: list[int]) -> PendingCollective:
        row_bytes = x_shard.element_size() * math.prod(x_shard.shape[1:])
        seconds = self.link.collective_s("all_gather", sum(sizes) * row_bytes, self.world)
        return self.link.delay(self.inner.all_gather(x_shard, sizes), seconds)
