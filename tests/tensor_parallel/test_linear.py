"""Column/Row parallel linears vs one device, replicated and sequence-parallel, worlds 1-4."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distnorm import ColumnParallelLinear, RowParallelLinear
from distnorm.comm import count_collectives
from distnorm.testing import simulate, split_for_world

IN, HID, OUT, TOKENS = 6, 10, 5, 7  # 10 hidden over 3/4 ranks and 7 tokens: uneven


def _params():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in [(HID, IN), (HID,), (OUT, HID), (OUT,)]]


def _reference(x, w1, b1, w2, b2):
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in (w1, b1, w2, b2)]
    y = F.linear(F.gelu(F.linear(x, params[0], params[1])), params[2], params[3])
    return y, x, params


def _mlp_rank(rank, world, x_full, params, sequence_parallel, dy):
    group = dist.group.WORLD if world > 1 else None
    w1, b1, w2, b2 = params
    col = ColumnParallelLinear.from_full(w1, b1, group=group, sequence_parallel=sequence_parallel)
    row = RowParallelLinear.from_full(w2, b2, group=group, sequence_parallel=sequence_parallel)
    x = (split_for_world(x_full, world)[rank] if sequence_parallel else x_full).clone().requires_grad_()
    with count_collectives() as c:
        y = row(F.gelu(col(x, num_tokens=TOKENS)))
        dy_local = split_for_world(dy, world)[rank] if sequence_parallel else dy
        y.backward(dy_local)
    return (y.detach(), x.grad, col.weight.grad, col.bias.grad, row.weight.grad, row.bias.grad,
            col.full_weight(), row.full_weight(), c)


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_mlp_matches_one_device(world, sequence_parallel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, IN, generator=g, dtype=torch.float64)
    dy = torch.randn(TOKENS, OUT, generator=g, dtype=torch.float64)
    params = _params()
    y_ref, x_ref, p_ref = _reference(x, *params)
    y_ref.backward(dy)
    outs = simulate(world, _mlp_rank, world, x, params, sequence_parallel, dy, timeout=60)
    y = torch.cat([o[0] for o in outs]) if sequence_parallel else outs[0][0]
    torch.testing.assert_close(y, y_ref.detach(), rtol=0, atol=1e-12)
    dx = torch.cat([o[1] for o in outs]) if sequence_parallel else outs[0][1]
    torch.testing.assert_close(dx, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([o[2] for o in outs]), p_ref[0].grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([o[3] for o in outs]), p_ref[1].grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([o[4] for o in outs], dim=1), p_ref[2].grad, rtol=0, atol=1e-12)
    for o in outs:  # row bias is replicated: every rank holds the full gradient
        torch.testing.assert_close(o[5], p_ref[3].grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(o[6], params[0], rtol=0, atol=0)
        torch.testing.assert_close(o[7], params[2], rtol=0, atol=0)
    for o in outs:
        counts = {k: v for k, v in o[8].counts.items()}
        if world == 1:
            assert counts == {}
        elif sequence_parallel:
            # fwd AG + RS; bwd AG + RS + the row bias's all-reduce (it saw only local tokens)
            assert counts == {"all_gather": 2, "reduce_scatter": 2, "all_reduce": 1}
            assert o[8].bytes["all_reduce"] == OUT * 8
        else:
            assert counts == {"all_reduce": 2}  # fwd row output, bwd column input grad


def _partial_rank(rank, world, x_full, params):
    group = dist.group.WORLD if world > 1 else None
    row = RowParallelLinear.from_full(params[2], params[3], group=group, reduce_output=False)
    h = split_for_world(x_full, world, dim=-1)[rank]
    with count_collectives() as fwd:
        partial = row(h)
    with count_collectives() as bwd:
        partial.sum().backward()
    return partial.detach(), fwd.total, row.bias.grad, bwd.counts


@pytest.mark.parametrize("world", [1, 3])
def test_row_partial_sums_add_up(world):
    params = _params()
    h = torch.randn(TOKENS, HID, dtype=torch.float64)
    outs = simulate(world, _partial_rank, world, h, params, timeout=60)
    torch.testing.assert_close(sum(o[0] for o in outs), F.linear(h, params[2], params[3]), rtol=0, atol=1e-12)
    for _, fwd_total, bias_grad, bwd_counts in outs:
        assert fwd_total == 0
        # every replica of the bias gets the full gradient (TOKENS per output), so none drifts
        torch.testing.assert_close(bias_grad, torch.full((OUT,), float(TOKENS), dtype=torch.float64))
        assert bwd_counts == ({} if world == 1 else {"all_reduce": 1})


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"in_features must be a positive int, got 0 \(rank 0\)"):
        ColumnParallelLinear(0, 4)
    col = ColumnParallelLinear(4, 4)
    with pytest.raises(ValueError, match=r"input last dim must be in_features = 4, got shape \(2, 3\) \(rank 0 of 1\)"):
        col(torch.randn(2, 3))
    with pytest.raises(ValueError, match="sequence_parallel=True needs reduce_output=True"):
        RowParallelLinear(4, 4, sequence_parallel=True, reduce_output=False)


def test_same_init_regardless_of_world():
    def fn(rank, world):
        group = dist.group.WORLD
        col = ColumnParallelLinear(6, 10, group=group, generator=torch.Generator().manual_seed(5))
        return col.full_weight()

    full = ColumnParallelLinear(6, 10, generator=torch.Generator().manual_seed(5)).weight.detach()
    for w in simulate(3, fn, 3, timeout=60):
        torch.testing.assert_close(w, full, rtol=0, atol=0)
