"""Running statistics are never updated from a non-finite batch unless ``allow_nonfinite_stats=True``.

For every running-statistics norm, on worlds of 1-3 ranks: a batch with one NaN/Inf element on one
rank still gives NaN/Inf outputs (propagated like torch, not masked), but leaves every buffer of
every rank bitwise as it was and counts one skip in ``num_nonfinite_skips``; the next finite batch
continues exactly as if the bad one had never come. No extra collectives.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import count_collectives
from distnorm.data_parallel import _state
from distnorm.testing import simulate, split_for_world
from tests.test_checkpoint_safety import DP_NORMS, _dp_norms

TIMEOUT = 60
BACKWARD_STATS = {"PowerNorm": ("ema_gz",), "UnifiedNorm": ("ema_gz", "buffer_gz")}


SCHEDULE = {"step"}  # ProgressiveRepBN's LayerNorm->RepBN schedule counter: a clock, not a statistic
# The recomputation snapshot (distnorm/data_parallel/_state.py) records the state each training forward *read*
# and counts forwards/backwards: bookkeeping that must move with every forward, not a statistic.
RECOMPUTE = {_state.SNAPSHOT, _state.COUNTERS, _state.BACKWARDS}


def _buffers(norm):
    return {k: v.clone() for k, v in norm.named_buffers()}


def _skips(buffers):
    return sum(int(v) for k, v in buffers.items() if k.endswith(("num_nonfinite_skips", "num_nonfinite_grad_skips")))


def _stats(buffers):
    return {k: v for k, v in buffers.items() if not k.endswith(("num_nonfinite_skips", "num_nonfinite_grad_skips")) and k not in SCHEDULE | RECOMPUTE}


def _step(norm, x_full, dy_full, rank, world):
    x = split_for_world(x_full, world)[rank].clone().requires_grad_()
    with count_collectives() as c:
        y = norm(x)
        y.backward(split_for_world(dy_full, world)[rank])
    return y.detach(), c.counts


def _run(rank, world, name, batches, dys, allow):
    group = dist.group.WORLD if world > 1 else None
    norm = _dp_norms()[name][0](group=group, dtype=torch.float64, allow_nonfinite_stats=allow)
    out = []
    for x_full, dy_full in zip(batches, dys, strict=True):
        y, counts = _step(norm, x_full, dy_full, rank, world)
        out.append((y, counts, _buffers(norm)))
    return out


def _problem(name, bad_value, where):
    shape = _dp_norms()[name][1]
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3 for _ in range(3)]
    dys = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    if where == "forward":
        batches[1][-1].view(-1)[0] = bad_value  # the last sample: on the last rank
    else:
        dys[1][-1].view(-1)[0] = bad_value
    return batches, dys


def _check_name(name):
    if name not in _dp_norms():
        pytest.skip(f"{name} has not landed in this checkout")


@pytest.mark.parametrize("name", DP_NORMS)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_batch_skips_the_running_stat_update(name, world, bad_value):
    _check_name(name)
    batches, dys = _problem(name, bad_value, "forward")
    outs = simulate(world, _run, world, name, batches, dys, False, timeout=TIMEOUT)
    skipped = simulate(world, _run, world, name, [batches[0], batches[2]], [dys[0], dys[2]], False, timeout=TIMEOUT)
    y_bad = torch.cat([o[1][0] for o in outs])
    assert not torch.isfinite(y_bad).all()  # propagated, not masked
    for rank_out, rank_skipped in zip(outs, skipped, strict=True):
        before, during, after = (step[2] for step in rank_out)
        # one skipped update, two where the backward keeps statistics of the (NaN) gradients too
        assert _skips(during) == (2 if name in BACKWARD_STATS else 1)
        for k, v in _stats(before).items():
            assert torch.equal(during[k], v), k  # nothing learnt from the bad batch
        for k, v in _stats(rank_skipped[1][2]).items():  # then the next batch continues as if it never came
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)
        assert rank_out[1][1] == rank_out[0][1]  # the guard adds no collective


@pytest.mark.parametrize("name", DP_NORMS)
def test_allow_nonfinite_stats_updates_from_any_batch(name):
    _check_name(name)
    batches, dys = _problem(name, float("nan"), "forward")
    for rank_out in simulate(2, _run, 2, name, batches[:2], dys[:2], True, timeout=TIMEOUT):
        during = rank_out[1][2]
        assert _skips(during) == 0
        assert any(not torch.isfinite(v).all() for v in during.values() if v.is_floating_point())


@pytest.mark.parametrize("name", sorted(BACKWARD_STATS))
@pytest.mark.parametrize("world", [1, 3])
def test_nonfinite_gradient_skips_the_backward_statistics(name, world):
    _check_name(name)
    batches, dys = _problem(name, float("inf"), "backward")
    for rank_out in simulate(world, _run, world, name, batches, dys, False, timeout=TIMEOUT):
        before, during, _ = (step[2] for step in rank_out)
        assert _skips(during) == 1
        for k in BACKWARD_STATS[name]:
            assert torch.isfinite(during[k]).all() and torch.equal(during[k], before[k]), k
