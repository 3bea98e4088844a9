import pytest
import torch
import torch.distributed as dist

from distnorm.comm import count_collectives
from distnorm.functional.batch_stats import channel_sums, moments_from_sums, synced_moments
from distnorm.testing import simulate, split_for_world


def test_local_moments_with_shift_and_mask():
    x = 1e4 + torch.randn(6, 3, 5, dtype=torch.float64)
    mask = torch.rand(6, 5) > 0.3
    mean, var, n = moments_from_sums(channel_sums(x, 1, mask, shift=torch.full((3,), 1e4, dtype=torch.float64), dtype=torch.float64),
                                     shift=torch.full((3,), 1e4, dtype=torch.float64))
    rows = x.movedim(1, -1)[mask]
    torch.testing.assert_close(mean, rows.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(var, rows.var(0, unbiased=False), rtol=0, atol=1e-9)
    assert int(n) == int(mask.sum())


def test_mask_shape_error():
    with pytest.raises(ValueError, match=r"mask must have the input's shape without the channel dim \(6, 5\), got \(6, 4\)"):
        channel_sums(torch.zeros(6, 3, 5), 1, torch.ones(6, 4, dtype=torch.bool))


def _rank(rank, world, x, sizes):
    part = split_for_world(x, world, sizes=sizes)[rank]
    with count_collectives() as c:
        m = synced_moments(part, channel_dim=-1, group=dist.group.WORLD if world > 1 else None, dtype=torch.float64)
    return m, c


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_synced_moments_equal_global_batch(world):
    x = torch.randn(9, 4, dtype=torch.float64)
    sizes = [9] if world == 1 else [0] + [9 // (world - 1) + (1 if r < 9 % (world - 1) else 0) for r in range(world - 1)]
    for (mean, var, n), c in simulate(world, _rank, world, x, sizes, timeout=60):  # rank 0 holds no rows
        torch.testing.assert_close(mean, x.mean(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(var, x.var(0, unbiased=False), rtol=0, atol=1e-12)
        assert int(n) == 9
        assert c.counts == ({} if world == 1 else {"all_reduce": 1})
        assert c.bytes.get("all_reduce", 0) == (0 if world == 1 else (2 * 4 + 1) * 8)
