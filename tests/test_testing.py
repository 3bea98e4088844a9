"""distnorm.testing: simulate / spawn contracts (results, failures, timeouts) and helpers."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from distnorm.testing import (
    RankTimeoutError,
    assert_close_to_reference,
    chunk_for_rank,
    simulate,
    spawn,
    split_for_world,
)


def _rank_info(rank, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, dist.get_rank(), dist.get_world_size(), float(t) * scale


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulate_returns_results_in_rank_order(world):
    out = simulate(world, _rank_info, 2.0, timeout=30)
    total = sum(range(world)) * 2.0
    assert out == [(r, r, world, total) for r in range(world)]


def _raise_on(rank, bad):
    if rank == bad:
        raise KeyError(f"boom on {rank}")
    dist.barrier()  # the others wait in a collective that the failing rank never joins
    return rank


def test_simulate_failing_rank_is_named_and_others_do_not_hang():
    start = time.monotonic()
    with pytest.raises(KeyError, match="boom on 2") as info:
        simulate(4, _raise_on, 2, timeout=30)
    assert time.monotonic() - start < 10
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "raised on rank 2 of a world of 4" in notes and "_raise_on" in notes


def _sleep_forever_on(rank, bad):
    if rank == bad:
        time.sleep(3600)
    dist.barrier()


def test_simulate_timeout():
    start = time.monotonic()
    with pytest.raises(RankTimeoutError, match=r"ranks \[(0, )?1(, 2)?\] of 3 did not finish within 1.0 s"):
        simulate(3, _sleep_forever_on, 1, timeout=1.0)
    assert time.monotonic() - start < 10
    # the process is usable again afterwards
    assert simulate(2, _rank_info, 1.0, timeout=30)[1][2] == 2


def test_simulate_restores_global_state():
    import sys

    hook = sys.excepthook
    simulate(2, _rank_info, 1.0, timeout=30)
    assert sys.excepthook is hook
    assert not dist.is_initialized()


def test_world_size_validation():
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        simulate(0, _rank_info, 1.0)
    with pytest.raises(ValueError, match=r"world_size must be a positive int, got 1\.5"):
        spawn(1.5, _rank_info, 1.0)


def _spawn_fn(rank, bad):
    if rank == bad:
        raise ValueError(f"bad rank {rank} pid {os.getpid()}")
    t = torch.ones(2) * rank
    dist.all_reduce(t)
    return t


def test_spawn_results_and_failure():
    out = spawn(2, _spawn_fn, -1, timeout=120)
    assert [o.tolist() for o in out] == [[1.0, 1.0], [1.0, 1.0]]
    start = time.monotonic()
    with pytest.raises(ValueError, match="bad rank 1") as info:
        spawn(2, _spawn_fn, 1, timeout=120)
    assert time.monotonic() - start < 60
    assert "raised on rank 1 of a world of 2" in "".join(info.value.__notes__)


def _spawn_hang(rank):
    if rank == 0:
        time.sleep(3600)
    return rank


def test_spawn_timeout_kills_children():
    start = time.monotonic()
    with pytest.raises(RankTimeoutError, match=r"ranks \[0(, 1)?\] of 2 did not finish within 6 s"):  # rank 1 may still be starting under load
        spawn(2, _spawn_hang, timeout=6)
    assert time.monotonic() - start < 30


def test_chunk_and_split_helpers():
    x = torch.arange(10.0).reshape(10, 1).requires_grad_()
    parts = split_for_world(x.detach(), 4)
    assert [p.shape[0] for p in parts] == [3, 3, 2, 2]
    c = chunk_for_rank(x, 2, 4)
    assert c.requires_grad and c.is_leaf and c.flatten().tolist() == [6.0, 7.0]


def test_assert_close_to_reference():
    ref = torch.randn(100, dtype=torch.float64)
    torch_out = ref.float()
    assert_close_to_reference(ref.float(), ref, baseline=torch_out, atol=1e-7)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference(ref.float() + 1e-3, ref, baseline=torch_out)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference(ref * float("nan"), ref, atol=1.0)
    assert_close_to_reference(ref + 1e-9, ref, atol=1e-8)
