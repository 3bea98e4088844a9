"""sync_running_stats / broadcast_running_stats / recalibrate: only real statistics, exact vs one process."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distnorm import SyncBatchNorm, broadcast_running_stats, recalibrate, sync_running_stats
from distnorm.comm import count_collectives
from distnorm.data_parallel import running_stat_buffers
from distnorm.testing import simulate, spawn, split_for_world
from tests.data_parallel._parity import world_group

C = 3


class Decoy(nn.Module):
    """A user module whose buffer happens to be called running_var: never a statistic."""

    def __init__(self):
        super().__init__()
        self.register_buffer("running_var", torch.zeros(C))

    def forward(self, x):
        return x


class Declared(nn.Module):
    """A statistics-bearing module that declares its buffers (the protocol part B's norms use)."""

    running_stat_buffers = ("psi",)

    def __init__(self):
        super().__init__()
        self.register_buffer("psi", torch.zeros(C))
        self.register_buffer("other", torch.zeros(C))

    def forward(self, x):
        return x


def _model():
    return nn.Sequential(nn.BatchNorm1d(C), Decoy(), Declared(), nn.BatchNorm1d(C, track_running_stats=False))


def test_which_buffers_are_statistics():
    model = _model()
    assert running_stat_buffers(model[0]) == ("running_mean", "running_var", "num_batches_tracked")
    assert running_stat_buffers(model[1]) == ()
    assert running_stat_buffers(model[2]) == ("psi",)
    assert running_stat_buffers(model[3]) == ()
    assert running_stat_buffers(SyncBatchNorm(C)) == ("running_mean", "running_var", "num_batches_tracked")


def _fill(model, rank):
    for name, buf in model.named_buffers():
        buf.fill_(rank + 1 + (10 if "num_batches" in name else 0))


def _sync_rank(rank, world, op):
    model = _model()
    _fill(model, rank)
    with count_collectives() as c:
        sync_running_stats(model, world_group(world), op=op)
    return dict(model.named_buffers()), c


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sync_running_stats_mean(world):
    for rank, (bufs, c) in enumerate(simulate(world, _sync_rank, world, "mean", timeout=60)):
        expected = (world + 1) / 2  # mean of 1..world
        for name in ("0.running_mean", "0.running_var", "2.psi"):
            torch.testing.assert_close(bufs[name], torch.full((C,), expected))
        for name in ("1.running_var", "2.other"):  # not statistics: untouched
            torch.testing.assert_close(bufs[name], torch.full((C,), rank + 1.0))
        assert int(bufs["0.num_batches_tracked"]) == rank + 11  # counters are not averaged
        assert c.counts == ({} if world == 1 else {"all_reduce": 1})  # coalesced: one float32 bucket
        assert c.bytes.get("all_reduce", 0) == (0 if world == 1 else 3 * C * 4)


def test_sync_running_stats_max_and_bad_op():
    for bufs, _ in simulate(3, _sync_rank, 3, "max", timeout=60):
        torch.testing.assert_close(bufs["0.running_var"], torch.full((C,), 3.0))
    with pytest.raises(ValueError, match=r"op must be 'mean', 'sum', 'max' or 'min', got 'median' \(rank 0 of 1\)"):
        sync_running_stats(_model(), None, op="median")


def _broadcast_rank(rank, world, src):
    model = _model()
    _fill(model, rank)
    with count_collectives() as c:
        broadcast_running_stats(model, src, world_group(world))
    return dict(model.named_buffers()), c


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_broadcast_running_stats(world):
    src = world - 1
    for rank, (bufs, c) in enumerate(simulate(world, _broadcast_rank, world, src, timeout=60)):
        torch.testing.assert_close(bufs["0.running_var"], torch.full((C,), src + 1.0))
        torch.testing.assert_close(bufs["2.psi"], torch.full((C,), src + 1.0))
        assert int(bufs["0.num_batches_tracked"]) == src + 11
        torch.testing.assert_close(bufs["1.running_var"], torch.full((C,), rank + 1.0))  # the decoy stays
        assert c.counts == ({} if world == 1 else {"broadcast": 2})  # one float32, one int64 bucket
    with pytest.raises(ValueError, match=r"src must be a rank in \[0, 1\) of the group, got 1 \(rank 0 of 1\)"):
        broadcast_running_stats(_model(), 1, None)


class Net(nn.Module):
    """Linear -> BN -> dropout -> Linear -> masked [B, T, C] BN; the norms local or synced."""

    def __init__(self, synced=False, group=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(2, C).double(), nn.Linear(C, C).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.bn1 = SyncBatchNorm(C, group=group, dtype=torch.float64) if synced else nn.BatchNorm1d(C, dtype=torch.float64)
        self.drop = nn.Dropout(0.5)
        self.bn2 = SyncBatchNorm(C, group=group, channel_dim=-1, dtype=torch.float64)
        self.bn1.running_mean.fill_(0.3)  # the old statistics (and the accumulation shift)
        self.bn2.running_mean.fill_(-0.2)

    def forward(self, x, mask=None):
        h = self.lin2(self.drop(self.bn1(self.lin1(x).transpose(1, 2)).transpose(1, 2)))
        return self.bn2(h, mask=mask)


def _batches(n_batches, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": 1.0 + torch.randn(4, 3, 2, generator=g, dtype=torch.float64), "mask": torch.rand(4, 3, generator=g) > 0.3}
            for _ in range(n_batches)]


def _recal_rank(rank, world, batches, synced):
    group = world_group(world)
    model = Net(synced, group if synced else None)
    model.bn1.train(False)  # modes are restored afterwards
    if synced:  # every rank runs the same number of steps; each step's batch is split over ranks
        local = [{k: split_for_world(v, world)[rank] for k, v in b.items()} for b in batches]
    else:  # local norms: ranks may hold different numbers of batches
        local = [b for i, b in enumerate(batches) if i % world == rank]
    with count_collectives() as c:
        recalibrate(model, local, group)
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()], c


@pytest.mark.parametrize("synced", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_recalibrate_equals_one_process(world, synced):
    batches = _batches(5)
    outs = simulate(world, _recal_rank, world, batches, synced, timeout=60)
    one, modes, _ = _recal_rank(0, 1, batches, synced)
    # the first norm's input does not depend on any norm: its population is known in closed form
    h = torch.cat([Net().lin1(b["x"]).detach().reshape(-1, C) for b in batches])
    torch.testing.assert_close(one["bn1.running_mean"], h.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(one["bn1.running_var"], h.var(0), rtol=0, atol=1e-12)
    for state, rank_modes, c in outs:
        for k in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
            torch.testing.assert_close(state[k], one[k], rtol=0, atol=1e-10)
        assert int(state["bn1.num_batches_tracked"]) == 0
        assert rank_modes == modes == [True, True, True, False, True, True]  # restored: only bn1 was in eval
        n_fwd = 10 if synced else 0  # synced norms: a fwd all-reduce each in every step
        assert c.counts == ({} if world == 1 else {"all_reduce": n_fwd + 1})
        assert c.bytes.get("all_reduce", 0) == (0 if world == 1 else (n_fwd + 2) * (2 * C + 1) * 8)


def _spawn_rank(rank, world, batches):
    model = _model()
    _fill(model, rank)
    sync_running_stats(model, dist.group.WORLD)
    synced = model[0].running_var.clone()
    broadcast_running_stats(model, 0, dist.group.WORLD)
    recal = _recal_rank(rank, world, batches, True)[0]
    return synced, model[0].num_batches_tracked.clone(), recal


def test_real_processes_gloo():
    batches = _batches(2)
    outs = spawn(2, _spawn_rank, 2, batches, timeout=120)
    one = _recal_rank(0, 1, batches, True)[0]
    for synced, nbt, recal in outs:
        torch.testing.assert_close(synced, torch.full((C,), 1.5))
        assert int(nbt) == 11
        torch.testing.assert_close(recal["bn2.running_var"], one["bn2.running_var"], rtol=0, atol=1e-10)
