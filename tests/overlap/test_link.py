"""SimulatedLink: ring costs, FIFO service, waits that free the host; and, in virtual time, the
woven run's step time equals the planner's replay of the same schedule (no wall-clock timing)."""

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import PendingCollective
from distnorm.overlap import DeviceProfile, ParallelMLPBlock, SimulatedLink, TokenSplitPlan, TokenWeaver
from distnorm.overlap.token_split import predict_step_s
from distnorm.testing import simulate


class _Clock:
    """Virtual time: ``sleep`` and modelled compute advance it, nothing else does."""

    def __init__(self):
        self.t, self.slept = 0.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.slept.append(s)
        self.t += s


class _Instant:
    """An inner launcher whose collectives are done at once (a world of ``world``)."""

    def __init__(self, world):
        self.world = world

    def all_reduce(self, x):
        return PendingCollective.done(x)

    def reduce_scatter(self, x, sizes):
        return PendingCollective.done(x[: sizes[0]])

    def all_gather(self, x, sizes):
        return PendingCollective.done(x.new_zeros(sum(sizes), *x.shape[1:]))


def test_ring_costs_and_fifo_service():
    clock = _Clock()
    link = SimulatedLink(latency_s=1e-3, bus_bytes_per_s=1e6, clock=clock, sleep=clock.sleep)
    launcher = link.wrap(_Instant(4))
    x = torch.zeros(250, 1)  # 1000 bytes
    # ring: all-reduce moves 2(P-1)/P of the payload per rank, reduce-scatter / all-gather (P-1)/P
    assert link.collective_s("all_reduce", 1000, 4) == pytest.approx(1e-3 + 1.5e-3)
    assert link.collective_s("reduce_scatter", 1000, 4) == pytest.approx(1e-3 + 0.75e-3)
    assert link.collective_s("all_gather", 1000, 1) == 0.0
    assert link.all_reduce_bytes_per_s(4) == pytest.approx(1000 / 1.5e-3)
    a = launcher.all_reduce(x)
    g = launcher.all_gather(x[:50], [50, 50, 50, 100])  # payload: every rank's rows, 1000 bytes
    a.wait()  # waits out the whole all-reduce
    assert clock.t == pytest.approx(2.5e-3)
    clock.t += 10e-3  # host work longer than the queued all-gather: its wait costs nothing
    g.wait()
    assert clock.slept == [pytest.approx(2.5e-3)]
    assert link.collectives == 2 and link.injected_s == pytest.approx(2.5e-3 + 1.75e-3)
    # a collective issued while the link is busy starts when it frees (FIFO)
    clock.t = 0.0
    link.free_at = 0.0
    first, second = launcher.reduce_scatter(x, [250, 0, 0, 0]), launcher.reduce_scatter(x, [250, 0, 0, 0])
    second.wait()
    assert clock.t == pytest.approx(2 * 1.75e-3)
    first.wait()
    assert clock.t == pytest.approx(2 * 1.75e-3)
    with pytest.raises(ValueError, match=r"kind must be one of .* got 'broadcast'"):
        link.collective_s("broadcast", 1, 2)
    with pytest.raises(ValueError, match=r"bus_bytes_per_s must be > 0 .* got 0"):
        SimulatedLink(latency_s=0.0, bus_bytes_per_s=0)


HIDDEN, LAYERS = 32, 4
# per block on 64 tokens: compute 1.5 ms (3 ms backward), an all-reduce 1 ms
PROFILE = DeviceProfile(flops_per_s=1e12, compute_latency_s=2e-4, tile_tokens=1, comm_latency_s=3e-4,
                        comm_bytes_per_s=1.2e7, backward_compute_ratio=2.0)
FLOPS_PER_TOKEN = 2e7


class _Tick(torch.autograd.Function):
    """Identity whose backward advances the virtual clock by the block's backward compute."""

    @staticmethod
    def forward(ctx, x, clock, seconds):
        ctx.clock, ctx.seconds = clock, seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.t += ctx.seconds
        return grad, None, None


class _TimedBlock(ParallelMLPBlock):
    """A block whose compute takes the profile's C(n) of virtual time (2 C(n) in backward)."""

    def __init__(self, clock, **kw):
        super().__init__(HIDDEN, 2 * HIDDEN, bias=False, normed_grad="partial", **kw)
        self.clock = clock

    def partial(self, x):
        seconds = PROFILE.compute_s(x.shape[0], FLOPS_PER_TOKEN)
        self.clock.t += seconds
        return _Tick.apply(super().partial(x), self.clock, PROFILE.backward_compute_ratio * seconds)


def _virtual_rank(rank, world, mode, tokens, plan):
    group = dist.group.WORLD
    clock = _Clock()
    # the planner's comm model is this link: latency, and the all-reduce's algorithmic bandwidth
    link = SimulatedLink(latency_s=PROFILE.comm_latency_s, clock=clock, sleep=clock.sleep,
                         bus_bytes_per_s=PROFILE.comm_bytes_per_s * 2.0 * (world - 1) / world)
    assert link.all_reduce_bytes_per_s(world) == pytest.approx(PROFILE.comm_bytes_per_s)
    gen = torch.Generator().manual_seed(0)
    blocks = [_TimedBlock(clock, group=group, generator=gen) for _ in range(LAYERS)]
    x, residual = torch.randn(2, tokens, HIDDEN, generator=gen).unbind(0)
    if mode == "reduce_scatter":
        residual = residual[: -(-tokens // world)] if rank == 0 else residual[: tokens // world]
    times = {}
    for name, p, wrap in (("unsplit", None, link.wrap), ("woven", plan, link.wrap), ("compute", plan, None)):
        weaver = TokenWeaver(blocks, group, p, mode=mode, normed_grad="partial", wrap_launcher=wrap)
        link.reset()
        t0 = clock.t
        y, r = weaver(x.requires_grad_(), residual)
        t1, fwd_link = clock.t, link.injected_s
        (y.sum() + r.sum()).backward()
        times[name] = {"fwd": t1 - t0, "bwd": clock.t - t1, "fwd_link": fwd_link,
                       "bwd_link": link.injected_s - fwd_link}
    return times


@pytest.mark.parametrize("mode,chunks,at_least", [
    ("allreduce", (32, 32), 0.8),
    ("reduce_scatter", (32, 32), 0.4),       # two halves: one of each half's two collectives waits
    ("reduce_scatter", (22, 22, 20), 0.8),   # three chunks: both hide
])
def test_woven_step_in_virtual_time_is_the_planners_prediction(mode, chunks, at_least):
    """Compute and link both run on a virtual clock, so the run is deterministic: the measured
    forward and backward equal predict_step_s (the planner replaying the same schedule), unsplit
    and split, and the split hides link time: hidden / min(compute, link) >= ``at_least``. In
    reduce_scatter mode the norm between a chunk's two collectives runs on the host: with two
    halves one of them waits behind the other half's short norm, three chunks hide both."""
    world, tokens = 2, sum(chunks)
    plan = TokenSplitPlan(num_tokens=tokens, first=chunks[0], chunks=chunks if len(chunks) > 2 else ())
    times = simulate(world, _virtual_rank, world, mode, tokens, plan, timeout=120)
    kw = dict(device_profile=PROFILE, flops_per_token=FLOPS_PER_TOKEN, num_layers=LAYERS, itemsize=4, mode=mode,
              normed_grad="partial")
    for per_rank in times:
        for name, halves in (("unsplit", [tokens]), ("woven", chunks)):
            fwd, bwd = per_rank[name]["fwd"], per_rank[name]["bwd"]
            assert fwd == pytest.approx(predict_step_s(halves, HIDDEN, world, **kw), rel=1e-9), name
            assert fwd + bwd == pytest.approx(predict_step_s(halves, HIDDEN, world, training=True, **kw),
                                              rel=1e-9), name
        for phase in ("fwd", "bwd"):
            compute, link = per_rank["compute"][phase], per_rank["woven"][f"{phase}_link"]
            assert per_rank["compute"][f"{phase}_link"] == 0.0
            efficiency = (compute + link - per_rank["woven"][phase]) / min(compute, link)
            assert efficiency >= at_least, (phase, efficiency)
