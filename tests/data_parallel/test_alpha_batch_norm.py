"""AlphaBatchNorm (α-BN test-time calibration): N ranks == one process on the concatenated test batch."""

import pytest
import torch

from distnorm import AlphaBatchNorm, SyncBatchNorm
from distnorm.comm import count_collectives
from distnorm.data_parallel import alpha_batch_norm_ref
from distnorm.functional.reference import batch_norm_ref
from distnorm.testing import simulate, spawn, split_for_world
from tests.data_parallel._parity import sizes_with_empty_rank, world_group

C = 4


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 1.5 + 2.0 * torch.randn(7, 3, C, generator=g, dtype=torch.float64)  # [B, T, C]
    dy = torch.randn(7, 3, C, generator=g, dtype=torch.float64)
    mask = torch.rand(7, 3, generator=g) > 0.3
    stats = [torch.randn(C, generator=g, dtype=torch.float64), 0.5 + torch.rand(C, generator=g, dtype=torch.float64),
             torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)]
    return x, dy, mask, stats


def _alpha_rank(rank, world, alpha, x_full, dy_full, mask_full, stats, dtype):
    sizes = sizes_with_empty_rank(x_full.shape[0], world)
    bn = AlphaBatchNorm(C, alpha=alpha, group=world_group(world), channel_dim=-1, dtype=dtype).eval()
    with torch.no_grad():
        for t, v in zip((bn.running_mean, bn.running_var, bn.weight, bn.bias), stats):
            t.copy_(v)
    x = split_for_world(x_full, world, sizes=sizes)[rank].to(dtype).requires_grad_()
    mask = split_for_world(mask_full, world, sizes=sizes)[rank]
    with count_collectives() as c:
        y = bn(x, mask)
        y.backward(split_for_world(dy_full, world, sizes=sizes)[rank].to(dtype))
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean.clone(), c


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_matches_one_process_float64(world, alpha):
    x, dy, mask, stats = _inputs()
    outs = simulate(world, _alpha_rank, world, alpha, x, dy, mask, stats, torch.float64, timeout=60)
    x_ref = x.clone().requires_grad_()
    w, b = (p.clone().requires_grad_() for p in stats[2:])
    y_ref = alpha_batch_norm_ref(x_ref, stats[0], stats[1], w, b, alpha=alpha, channel_dim=-1, mask=mask)
    y_ref.backward(dy)
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), y_ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([o[1] for o in outs]), x_ref.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(sum(o[2] for o in outs), w.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(sum(o[3] for o in outs), b.grad, rtol=0, atol=1e-10)
    for o in outs:
        torch.testing.assert_close(o[4], stats[0], rtol=0, atol=0)  # eval never moves running stats
        synced = world > 1 and alpha < 1
        assert o[5].counts == ({"all_reduce": 2} if synced else {})
        assert o[5].bytes.get("all_reduce", 0) == (((2 * C + 1) + 2 * C) * 8 if synced else 0)  # fwd 2C+1, bwd 2C (fp64)


def test_alpha_ends_are_eval_and_train_batch_norm():
    x, _, _, stats = _inputs(1)
    bn = AlphaBatchNorm(C, alpha=1.0, channel_dim=-1, dtype=torch.float64).eval()
    with torch.no_grad():
        for t, v in zip((bn.running_mean, bn.running_var, bn.weight, bn.bias), stats):
            t.copy_(v)
    y_eval, _, _ = batch_norm_ref(x, *stats, training=False, channel_dim=-1)
    torch.testing.assert_close(bn(x), y_eval, rtol=0, atol=1e-12)
    bn.alpha = 0.0
    y_batch, _, _ = batch_norm_ref(x, None, None, *stats[2:], channel_dim=-1)
    torch.testing.assert_close(bn(x), y_batch, rtol=0, atol=1e-12)
    train = AlphaBatchNorm(C, channel_dim=-1, dtype=torch.float64)
    plain = SyncBatchNorm(C, channel_dim=-1, dtype=torch.float64)
    torch.testing.assert_close(train(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(train.running_var, plain.running_var, rtol=0, atol=0)


def test_bad_alpha():
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\], got 1.5 \(rank 0 of 1\)"):
        AlphaBatchNorm(C, alpha=1.5)
    with pytest.raises(ValueError, match=r"track_running_stats must be True .* got False \(rank 0 of 1\)"):
        AlphaBatchNorm(C, track_running_stats=False)


def _spawn_rank(rank, world, x, dy, mask, stats):
    return _alpha_rank(rank, world, 0.5, x, dy, mask, stats, torch.float32)


def test_real_processes_gloo():
    x, dy, mask, stats = _inputs(2)
    outs = spawn(2, _spawn_rank, 2, x, dy, mask, stats, timeout=120)
    x_ref = x.clone().requires_grad_()
    y_ref = alpha_batch_norm_ref(x_ref, *stats, alpha=0.5, channel_dim=-1, mask=mask)
    y_ref.backward(dy)
    torch.testing.assert_close(torch.cat([o[0] for o in outs]).double(), y_ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([o[1] for o in outs]).double(), x_ref.grad, rtol=0, atol=1e-5)
    assert all(o[5].counts == {"all_reduce": 2} for o in outs)
