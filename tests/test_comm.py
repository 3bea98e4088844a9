"""distnorm.comm: every autograd collective, forward and backward, on worlds 1-4 (uneven shards)."""

import pytest
import torch

from distnorm import comm
from distnorm.comm import count_collectives, shard_sizes
from distnorm.testing import simulate, spawn, split_for_world

WORLDS = [1, 2, 3, 4]
N = 10  # 10 rows over 3 and 4 ranks: uneven


def test_shard_sizes():
    assert shard_sizes(10, 4) == [3, 3, 2, 2]
    assert shard_sizes(10, 3) == [4, 3, 3]
    assert shard_sizes(2, 4) == [1, 1, 0, 0]
    assert comm.shard_offsets(10, 4) == [0, 3, 6, 8]
    with pytest.raises(ValueError, match="world must be a positive int, got 0"):
        shard_sizes(10, 0)
    with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
        shard_sizes(-1, 2)


def _weights(world, shape):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(world)]


def _run_copy(rank, x, ws, world):
    x = x.clone().requires_grad_()
    with count_collectives() as c:
        y = comm.copy_to_group(x, _group(world))
        (y * ws[rank]).sum().backward()
    return y.detach(), x.grad, c


def _run_reduce(rank, xs, world):
    x = xs[rank].clone().requires_grad_()
    with count_collectives() as c:
        y = comm.reduce_from_group(x, _group(world))
        (y * (rank + 1)).sum().backward()
    return y.detach(), x.grad, c


def _run_gather(rank, x_full, ws, world):
    x = split_for_world(x_full, world)[rank].requires_grad_()
    sizes = shard_sizes(x_full.shape[0], world)
    with count_collectives() as c:
        y = comm.gather_along(x, _group(world), dim=0, sizes=sizes)
        (y * ws[rank]).sum().backward()
    return y.detach(), x.grad, c


def _run_scatter(rank, x_full, ws, world):
    x = x_full.clone().requires_grad_()
    with count_collectives() as c:
        y = comm.scatter_along(x, _group(world), dim=0)
        (y * split_for_world(ws[rank], world)[rank]).sum().backward()
    return y.detach(), x.grad, c


def _run_reduce_scatter(rank, xs, ws, world):
    x = xs[rank].clone().requires_grad_()
    with count_collectives() as c:
        y = comm.reduce_scatter_along(x, _group(world), dim=0)
        (y * split_for_world(ws[rank], world)[rank]).sum().backward()
    return y.detach(), x.grad, c


def _group(world):
    import torch.distributed as dist

    return dist.group.WORLD if world > 1 else None


def _check_copy(results, ws, world):
    for _rank, (_y, grad, c) in enumerate(results):
        torch.testing.assert_close(grad, sum(ws), rtol=0, atol=1e-12)
        if world > 1:
            assert c.counts == {"all_reduce": 1} and c.bytes == {"all_reduce": N * 3 * 8}
        else:
            assert c.total == 0


def _check_reduce(results, xs, world):
    for rank, (y, grad, c) in enumerate(results):
        torch.testing.assert_close(y, sum(xs), rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, torch.full_like(grad, rank + 1.0))
        assert c.counts == ({"all_reduce": 1} if world > 1 else {})


def _check_gather(results, x_full, ws, world):
    sizes = shard_sizes(N, world)
    expected_grads = split_for_world(sum(ws), world)
    for rank, (y, grad, c) in enumerate(results):
        torch.testing.assert_close(y, x_full, rtol=0, atol=0)
        torch.testing.assert_close(grad, expected_grads[rank], rtol=0, atol=1e-12)
        if world > 1:
            padded = max(sizes) * 3 * 8
            assert c.counts == {"all_gather": 1, "reduce_scatter": 1}
            assert c.bytes == {"all_gather": padded, "reduce_scatter": world * padded}


def _check_scatter(results, x_full, ws, world):
    expected_grad = torch.cat([split_for_world(ws[r], world)[r] for r in range(world)])
    for rank, (y, grad, c) in enumerate(results):
        torch.testing.assert_close(y, split_for_world(x_full, world)[rank], rtol=0, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
        assert c.counts == ({"all_gather": 1} if world > 1 else {})


def _check_reduce_scatter(results, xs, ws, world):
    total = sum(xs)
    expected_grad = torch.cat([split_for_world(ws[r], world)[r] for r in range(world)])
    for rank, (y, grad, c) in enumerate(results):
        torch.testing.assert_close(y, split_for_world(total, world)[rank], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
        assert c.counts == ({"reduce_scatter": 1, "all_gather": 1} if world > 1 else {})


def _all_ops(rank, world, x, xs, ws):
    """Every op on one rank; used by the simulated and the real-process tests alike."""
    return {
        "copy": _run_copy(rank, x, ws, world),
        "reduce": _run_reduce(rank, xs, world),
        "gather": _run_gather(rank, x, ws, world),
        "scatter": _run_scatter(rank, x, ws, world),
        "reduce_scatter": _run_reduce_scatter(rank, xs, ws, world),
    }


def _check_all(per_rank, world, x, xs, ws):
    _check_copy([r["copy"] for r in per_rank], ws, world)
    _check_reduce([r["reduce"] for r in per_rank], xs, world)
    _check_gather([r["gather"] for r in per_rank], x, ws, world)
    _check_scatter([r["scatter"] for r in per_rank], x, ws, world)
    _check_reduce_scatter([r["reduce_scatter"] for r in per_rank], xs, ws, world)


def _inputs(world):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    xs = [torch.randn(N, 3, generator=g, dtype=torch.float64) for _ in range(world)]
    return x, xs, _weights(world, (N, 3))


@pytest.mark.parametrize("world", WORLDS)
def test_collectives_forward_backward_and_counts(world):
    x, xs, ws = _inputs(world)
    per_rank = simulate(world, _all_ops, world, x, xs, ws, timeout=60)
    _check_all(per_rank, world, x, xs, ws)


def test_collectives_in_real_processes():
    world = 3  # uneven: 10 rows over 3 ranks
    x, xs, ws = _inputs(world)
    per_rank = spawn(world, _all_ops, world, x, xs, ws, timeout=120)
    _check_all(per_rank, world, x, xs, ws)


def _gradcheck_rank(rank, world):
    import torch.distributed as dist

    from distnorm.testing import distributed_gradcheck

    group = dist.group.WORLD
    sizes = shard_sizes(5, world)
    g = torch.Generator().manual_seed(rank)
    shared = torch.randn(5, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # (fn, input, input replicated?, output replicated?): the semantics each pair is built for
    cases = {
        "copy": (lambda t: comm.copy_to_group(t, group), shared, True, False),
        "reduce": (lambda t: comm.reduce_from_group(t, group), torch.randn(5, 2, generator=g, dtype=torch.float64), False, True),
        "gather": (lambda t: comm.gather_along(t, group, 0, sizes), torch.randn(sizes[rank], 2, generator=g, dtype=torch.float64), False, False),
        "gather_last_dim": (lambda t: comm.gather_along(t, group, -1), torch.randn(2, 3, generator=g, dtype=torch.float64), False, False),
        "scatter": (lambda t: comm.scatter_along(t, group, 0), shared, True, False),
        "reduce_scatter": (lambda t: comm.reduce_scatter_along(t, group, 0), torch.randn(5, 2, generator=g, dtype=torch.float64), False, False),
    }
    return {
        name: distributed_gradcheck(f, x, group, replicated_input=rin, replicated_output=rout)
        for name, (f, x, rin, rout) in cases.items()
    }


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gradcheck(world):
    """Autograd gradients of every collective equal finite differences of the global loss."""
    for result in simulate(world, _gradcheck_rank, world, timeout=120):
        assert all(result.values())


def test_gradcheck_catches_a_wrong_backward():
    class _WrongCopy(torch.autograd.Function):  # forgets the all-reduce in backward
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    def fn(rank):
        import torch.distributed as dist

        from distnorm.testing import distributed_gradcheck

        return distributed_gradcheck(_WrongCopy.apply, torch.ones(2, dtype=torch.float64), dist.group.WORLD,
                                     replicated_input=True)

    with pytest.raises(AssertionError, match="analytic"):
        simulate(2, fn, timeout=60)


def _bad_gather(rank):
    import torch.distributed as dist

    x = torch.zeros(4 if rank == 1 else 3, 2)
    comm.all_gather_uneven(x, dist.group.WORLD, dim=0, sizes=[3, 3, 3])


def test_uneven_gather_wrong_shape_names_rank():
    with pytest.raises(ValueError, match=r"size 3 along dim 0 on rank 1 .*got shape \(4, 2\)") as info:
        simulate(3, _bad_gather, timeout=30)
    assert "raised on rank 1" in "".join(getattr(info.value, "__notes__", []))


def _bad_sizes(rank):
    import torch.distributed as dist

    comm.reduce_scatter_along(torch.zeros(5, 2), dist.group.WORLD, 0, sizes=[1, 1])


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError, match=r"sizes must be 2 non-negative ints .* got \[1, 1, 1\] \(rank 0\)"):
        simulate(2, lambda r: comm.gather_along(torch.zeros(1), __import__("torch.distributed").distributed.group.WORLD, 0, [1, 1, 1]), timeout=30)
    with pytest.raises(ValueError, match=r"sizes \[1, 1\] must sum to the extent 5"):
        simulate(2, _bad_sizes, timeout=30)
    with pytest.raises(ValueError, match="op must be one of"):
        comm.all_reduce_(torch.zeros(1), None, op="prod")


def _async_and_broadcast(rank):
    import torch.distributed as dist

    group = dist.group.WORLD
    t = torch.full((3,), float(rank))
    with count_collectives() as c:
        work = comm.all_reduce_(t, group, async_op=True)
        work.wait()
        b = comm.broadcast_(torch.full((2,), float(rank)), src=1, group=group)
        objs = comm.all_gather_object({"rank": rank}, group)
    return t, b, objs, c


def test_async_all_reduce_broadcast_and_objects():
    out = simulate(3, _async_and_broadcast, timeout=30)
    for t, b, objs, c in out:
        assert t.tolist() == [3.0, 3.0, 3.0]
        assert b.tolist() == [1.0, 1.0]
        assert objs == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
        assert c.counts == {"all_reduce": 1, "broadcast": 1, "all_gather_object": 1}
        assert c.bytes["all_reduce"] == 12 and c.bytes["broadcast"] == 8
    assert comm.all_reduce_(torch.ones(1), None, async_op=True).wait()


def test_local_path_is_identity_and_uncounted():
    x = torch.randn(4, 3, requires_grad=True)
    with count_collectives() as c:
        for f in (comm.copy_to_group, comm.reduce_from_group, comm.gather_along, comm.scatter_along, comm.reduce_scatter_along):
            assert f(x, None) is x
    assert c.total == 0 and c.total_bytes == 0


def test_nested_counters_each_see_inner_collectives():
    def fn(rank):
        import torch.distributed as dist

        with count_collectives() as outer:
            comm.all_reduce_(torch.zeros(2), dist.group.WORLD)
            with count_collectives() as inner:
                comm.all_reduce_(torch.zeros(2), dist.group.WORLD)
        return outer.counts, inner.counts

    for outer, inner in simulate(2, fn, timeout=30):
        assert outer == {"all_reduce": 2} and inner == {"all_reduce": 1}


def _start_rank(rank, world, x_full):
    group = torch.distributed.group.WORLD
    sizes = shard_sizes(x_full.shape[0], world)
    with count_collectives() as c:
        rs = comm.start_reduce_scatter_uneven(x_full * (rank + 1), group)
        ag = comm.start_all_gather_uneven(split_for_world(x_full, world)[rank], group, sizes=sizes)
        out = rs.wait(), ag.wait(), rs.wait()
    return out, c.counts


@pytest.mark.parametrize("world", [1, 3])
def test_start_helpers_complete_on_wait(world):
    x = torch.randn(7, 3, dtype=torch.float64)
    outs = simulate(world, _start_rank, world, x, timeout=60)
    total = sum(range(1, world + 1))
    for rank, ((rs, ag, rs_again), counts) in enumerate(outs):
        torch.testing.assert_close(rs, split_for_world(x, world)[rank] * total, rtol=0, atol=1e-12)
        assert rs_again is rs
        torch.testing.assert_close(ag, x, rtol=0, atol=0)
        assert counts == ({} if world == 1 else {"reduce_scatter": 1, "all_gather": 1})


# --------------------------------------------------------------------------------------------
# torch.compile: every collective is a custom op; counts as in eager
# --------------------------------------------------------------------------------------------


def _pairs(group, sizes, rank, x, x_shard, xs_r, w):
    """Every autograd pair, uneven where it can be, reduced to one loss."""
    a = comm.copy_to_group(x, group) * w
    b = comm.reduce_from_group(xs_r, group) * w
    c = comm.gather_along(x_shard, group, 0, sizes) * w
    d = comm.scatter_along(x, group, 0)
    e = comm.reduce_scatter_along(xs_r, group, 0)
    return a.sum() + b.square().sum() + c.sum() + d.square().sum() + (e * e).sum()


def _helpers(group, sizes, rank, t):
    """Every plain helper, the async ones included (no autograd)."""
    m = comm.all_reduce_(t.clone(), group, op="max")
    s = t.clone() * (rank + 1)  # read below: a collective whose result nothing reads is dropped by the compiler
    work = comm.all_reduce_(s, group, async_op=True)
    work.wait()
    b = comm.broadcast_(t.clone(), 1, group)
    ag = comm.all_gather_uneven(t[: sizes[rank]], group, sizes=sizes)
    rs = comm.reduce_scatter_uneven(t, group)
    pending_ag = comm.start_all_gather_uneven(t[: sizes[rank]], group, sizes=sizes)
    pending_rs = comm.start_reduce_scatter_uneven(t, group)
    return m, s, b, ag, rs, pending_ag.wait(), pending_rs.wait()


def _compiled_rank(rank, world, x, xs, ws):
    import torch._dynamo
    import torch.distributed as dist
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    group, sizes = dist.group.WORLD, shard_sizes(N, world)
    x_shard = split_for_world(x, world)[rank]
    out = {}
    for name, fn, args, grads in (
        ("pairs", _pairs, (x, x_shard, xs[rank]), True),
        ("helpers", _helpers, (xs[rank],), False),
    ):
        torch._dynamo.reset()
        counters.clear()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, backend=cnt, fullgraph=True)
        runs = []
        for f in (fn, compiled):
            inputs = [a.clone().requires_grad_(grads) for a in args]
            extra = (ws[rank],) if grads else ()
            with count_collectives() as c:
                result = f(group, sizes, rank, *inputs, *extra)
                if grads:
                    result.backward()
            values = [result] if grads else list(result)
            runs.append(([v.detach() for v in values] + [i.grad for i in inputs if i.grad is not None], c.as_dict()))
        (want, want_counts), (got, got_counts) = runs
        out[name] = {
            "graphs": cnt.frame_count, "breaks": sum(counters["graph_break"].values()),
            "error": max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)),
            "counts": got_counts, "eager_counts": want_counts,
        }
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [3])  # uneven everywhere; the modules built on these compile at 2 and 4 (tests/compose)
def test_every_collective_compiles_fullgraph_in_real_processes(world):
    """fullgraph=True, one graph, no break; compiled == eager (values, gradients); count_collectives
    reports the same kinds, counts and bytes under compile as in eager mode."""
    x, xs, ws = _inputs(world)
    for rank, result in enumerate(spawn(world, _compiled_rank, world, x, xs, ws, timeout=240)):
        for name, r in result.items():
            where = f"{name}, rank {rank} of {world}"
            assert r["graphs"] == 1 and r["breaks"] == 0, f"{where}: {r['graphs']} graphs, {r['breaks']} breaks"
            assert r["error"] <= 1e-12, f"{where}: compiled - eager = {r['error']}"
            assert r["counts"] == r["eager_counts"], f"{where}: {r['counts']} != eager {r['eager_counts']}"
        assert result["pairs"]["counts"]["all_gather"]["count"] == 3  # gather fwd, scatter bwd, reduce-scatter bwd
        assert result["helpers"]["counts"]["all_reduce"]["count"] == 2
