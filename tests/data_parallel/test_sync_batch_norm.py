"""SyncBatchNorm: N ranks (uneven, one empty, masks) == one process on the concatenated batch."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from distnorm import SyncBatchNorm, convert_sync_batchnorm
from distnorm.comm import count_collectives
from distnorm.functional.reference import batch_norm_ref
from distnorm.testing import assert_close_to_reference, distributed_gradcheck, simulate, spawn, split_for_world
from tests.data_parallel._parity import sizes_with_empty_rank, world_group

C, STEPS = 5, 3
LAYOUTS = {  # name: (global shape, channel_dim, masked)
    "nchw": ((7, C, 3, 2), 1, False),
    "btc_mask": ((7, 4, C), -1, True),
}


def _inputs(layout, dtype=torch.float64, seed=0):
    shape, channel_dim, masked = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    xs = [3.0 + 2.0 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    dys = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    mask_shape = tuple(s for i, s in enumerate(shape) if i != channel_dim % len(shape))
    masks = [torch.rand(mask_shape, generator=g) > 0.3 if masked else None for _ in range(STEPS)]
    params = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in xs], [dy.to(dtype) for dy in dys], masks, params


def _sbn_rank(rank, world, layout, xs, dys, masks, params, momentum, dtype):
    _, channel_dim, _ = LAYOUTS[layout]
    sizes = sizes_with_empty_rank(xs[0].shape[0], world)
    bn = SyncBatchNorm(C, momentum=momentum, group=world_group(world), channel_dim=channel_dim, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(params[0])
        bn.bias.copy_(params[1])
    steps = []
    for x_full, dy_full, mask_full in zip(xs, dys, masks):
        x = split_for_world(x_full, world, sizes=sizes)[rank].requires_grad_()
        mask = None if mask_full is None else split_for_world(mask_full, world, sizes=sizes)[rank]
        bn.zero_grad()
        with count_collectives() as c:
            y = bn(x, mask)
            y.backward(split_for_world(dy_full, world, sizes=sizes)[rank])
        steps.append((y.detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone(), c))
    bn.eval()
    with count_collectives() as c_eval:
        y_eval = bn(split_for_world(xs[0], world, sizes=sizes)[rank])
    return steps, bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked), y_eval, c_eval


def _reference(layout, xs, dys, masks, params, momentum):
    _, channel_dim, _ = LAYOUTS[layout]
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    steps = []
    for i, (x, dy, mask) in enumerate(zip(xs, dys, masks)):
        x = x.double().clone().requires_grad_()
        w, b = (p.clone().requires_grad_() for p in params)
        y, rm, rv = batch_norm_ref(x, rm, rv, w, b, momentum=momentum, num_batches_tracked=i,
                                   channel_dim=channel_dim, mask=mask)
        y.backward(dy.double())
        rm, rv = rm.detach(), rv.detach()
        steps.append((y.detach(), x.grad, w.grad, b.grad))
    y_eval, _, _ = batch_norm_ref(xs[0].double(), rm, rv, *params, training=False, channel_dim=channel_dim)
    return steps, rm, rv, y_eval


@pytest.mark.parametrize("layout,momentum", [("nchw", 0.1), ("btc_mask", 0.1), ("nchw", None)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_one_process_float64(world, layout, momentum):
    xs, dys, masks, params = _inputs(layout)
    outs = simulate(world, _sbn_rank, world, layout, xs, dys, masks, params, momentum, torch.float64, timeout=60)
    ref_steps, ref_rm, ref_rv, ref_eval = _reference(layout, xs, dys, masks, params, momentum)
    for s, (y_ref, dx_ref, dw_ref, db_ref) in enumerate(ref_steps):
        steps = [o[0][s] for o in outs]
        torch.testing.assert_close(torch.cat([t[0] for t in steps]), y_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.cat([t[1] for t in steps]), dx_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(sum(t[2] for t in steps), dw_ref, rtol=0, atol=1e-10)  # summed over ranks
        torch.testing.assert_close(sum(t[3] for t in steps), db_ref, rtol=0, atol=1e-10)
        for t in steps:  # fwd 2C+1 float64, bwd 2C numbers in the stats dtype (float64), one all-reduce each
            assert t[4].counts == ({} if world == 1 else {"all_reduce": 2})
            assert t[4].bytes.get("all_reduce", 0) == (0 if world == 1 else (4 * C + 1) * 8)
    for _, rm, rv, nbt, _y, c_eval in outs:
        torch.testing.assert_close(rm, ref_rm, rtol=0, atol=1e-10)
        torch.testing.assert_close(rv, ref_rv, rtol=0, atol=1e-10)
        assert nbt == STEPS
        assert c_eval.counts == {}
    torch.testing.assert_close(torch.cat([o[4] for o in outs]), ref_eval, rtol=0, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_torch_batch_norm_on_concatenated_batch(momentum):
    xs, dys, masks, params = _inputs("nchw")
    outs = simulate(3, _sbn_rank, 3, "nchw", xs, dys, masks, params, momentum, torch.float64, timeout=60)
    bn = nn.BatchNorm2d(C, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(params[0])
        bn.bias.copy_(params[1])
    for s, (x, dy) in enumerate(zip(xs, dys)):
        x = x.clone().requires_grad_()
        bn.zero_grad()
        y = bn(x)
        y.backward(dy)
        steps = [o[0][s] for o in outs]
        torch.testing.assert_close(torch.cat([t[0] for t in steps]), y.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.cat([t[1] for t in steps]), x.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(sum(t[2] for t in steps), bn.weight.grad, rtol=0, atol=1e-10)
    for _, rm, rv, nbt, _y, _c in outs:
        torch.testing.assert_close(rm, bn.running_mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(rv, bn.running_var, rtol=0, atol=1e-10)
        assert nbt == int(bn.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    world, layout = 3, "nchw"
    xs, dys, masks, params = _inputs(layout, dtype)
    outs = simulate(world, _sbn_rank, world, layout, xs, dys, masks, params, 0.1, torch.float32, timeout=60)
    ref_steps, ref_rm, ref_rv, _ = _reference(layout, xs, dys, masks, params, 0.1)
    torch_bn = nn.BatchNorm2d(C)  # baseline: plain torch in the same dtype on the whole batch
    with torch.no_grad():
        torch_bn.weight.copy_(params[0])
        torch_bn.bias.copy_(params[1])
    for s, (y_ref, dx_ref, dw_ref, _) in enumerate(ref_steps):
        x = xs[s].float().requires_grad_()
        torch_bn.zero_grad()
        y_base = torch_bn(x.to(dtype))  # bf16 in, fp32 parameters: torch's own mixed path
        y_base.backward(dys[s].to(dtype))
        steps = [o[0][s] for o in outs]
        assert_close_to_reference(torch.cat([t[0] for t in steps]), y_ref, baseline=y_base.detach(), atol=1e-6, name=f"y[{s}]")
        assert_close_to_reference(torch.cat([t[1] for t in steps]).to(dtype), dx_ref, baseline=x.grad.to(dtype),
                                  atol=1e-6, name=f"dx[{s}]")
        assert_close_to_reference(sum(t[2] for t in steps), dw_ref, baseline=torch_bn.weight.grad, atol=1e-5)
        assert all(t[0].dtype == dtype and t[1].dtype == dtype for t in steps)
    assert_close_to_reference(outs[1][1], ref_rm, baseline=torch_bn.running_mean, atol=1e-6)
    assert_close_to_reference(outs[1][2], ref_rv, baseline=torch_bn.running_var, atol=1e-6)


def _large_mean_rank(rank, world, x_full, shift):
    bn = SyncBatchNorm(C, group=world_group(world))
    bn.running_mean.copy_(shift)  # a warm module: the running mean is near the data mean
    y = bn(split_for_world(x_full, world)[rank])
    return y.detach(), bn.running_var.clone()


def test_accurate_when_mean_dwarfs_std():
    g = torch.Generator().manual_seed(1)
    x64 = 1e4 + torch.randn(16, C, 8, generator=g, dtype=torch.float64)  # |mean| / std = 1e4
    shift = x64.mean((0, 2)) + torch.randn(C, generator=g, dtype=torch.float64)  # off by ~1 std
    outs = simulate(4, _large_mean_rank, 4, x64.float(), shift.float(), timeout=60)
    y_ref, _, rv_ref = batch_norm_ref(x64, shift, torch.ones(C, dtype=torch.float64))
    y_base = nn.functional.batch_norm(x64.float(), None, None, training=True)
    assert_close_to_reference(torch.cat([o[0] for o in outs]), y_ref, baseline=y_base, atol=1e-5)
    torch.testing.assert_close(outs[0][1].double(), rv_ref, rtol=1e-4, atol=0)


def test_state_dict_both_ways_with_torch():
    ours, theirs = SyncBatchNorm(C), nn.SyncBatchNorm(C)
    for m, seed in ((ours, 1), (theirs, 2)):
        g = torch.Generator().manual_seed(seed)
        for t in m.state_dict().values():
            t.copy_(torch.randint(1, 9, t.shape, generator=g) if t.dtype == torch.int64 else torch.rand(t.shape, generator=g))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    fresh_torch = nn.SyncBatchNorm(C)
    fresh_torch.load_state_dict(ours.state_dict())  # strict
    ours.load_state_dict(theirs.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(fresh_torch.state_dict().values(), SyncBatchNorm(C).state_dict().values()):
        assert a.shape == b.shape and a.dtype == b.dtype
    legacy = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    SyncBatchNorm(C).load_state_dict(legacy)  # old checkpoints without the counter, as torch


def test_torch_constructor_and_aliases():
    bn = SyncBatchNorm(C, 1e-3, 0.2, False, True, None, None, torch.float64)
    assert (bn.eps, bn.momentum, bn.affine, bn.weight, bn.running_mean.dtype) == (1e-3, 0.2, False, None, torch.float64)
    assert SyncBatchNorm(C, process_group=None).process_group is None
    assert "channel_dim=-1, group_size=1" in repr(SyncBatchNorm(C, channel_dim=-1))
    no_stats = SyncBatchNorm(C, track_running_stats=False).eval()  # eval without stats: local batch stats
    x = torch.randn(6, C, dtype=torch.float32)
    torch.testing.assert_close(no_stats(x), nn.functional.batch_norm(x, None, None, no_stats.weight, no_stats.bias, True))


def test_convert_sync_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C), nn.Sequential(nn.ReLU(), nn.SyncBatchNorm(C)))
    model[1].running_mean.fill_(0.5)
    model.eval()
    x = torch.randn(4, 3, 2, 2)
    expected = model(x)
    weight = model[1].weight
    converted = convert_sync_batchnorm(model, None)
    assert type(converted[1]) is SyncBatchNorm and type(converted[2][1]) is SyncBatchNorm
    assert converted[1].weight is weight and not converted[1].training
    torch.testing.assert_close(converted(x), expected)
    assert type(SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(C))) is SyncBatchNorm


def _all_empty_rank(rank, world):
    bn = SyncBatchNorm(C, group=world_group(world), channel_dim=-1)
    if rank == 0:
        bn(torch.randn(0, 3, C))
    else:
        bn(torch.randn(2, 3, C), torch.zeros(2, 3, dtype=torch.bool))


def test_bad_inputs():
    bn = SyncBatchNorm(4)
    with pytest.raises(ValueError, match=r"num_features = 4 channels on channel_dim=1, got shape \(2, 3, 5\) \(rank 0 of 1\)"):
        bn(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"mask must have the input's shape without the channel dim \(2, 5\), got \(2, 4\) \(rank 0 of 1\)"):
        bn(torch.randn(2, 4, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .* got torch.float32 \(rank 0 of 1\)"):
        bn(torch.randn(2, 4, 5), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"more than 1 value per channel .* got input shape \(1, 4\) \(1 value\(s\) per channel, rank 0 of 1\)"):
        bn(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"num_features must be a positive int, got 0"):
        SyncBatchNorm(0)
    with pytest.raises(ValueError, match=r"channel_dim must be 1 or -1, got 2"):
        SyncBatchNorm(4, channel_dim=2)
    # every rank empty (rank 0 no rows, rank 1 all padding): a clear error, no hang
    with pytest.raises(RuntimeError, match=r"global batch has no real elements .*in training mode \(rank 0 of 2\)"):
        simulate(2, _all_empty_rank, 2, timeout=60)


def _spawn_rank(rank, world, xs, dys, masks, params):
    return _sbn_rank(rank, world, "btc_mask", xs, dys, masks, params, 0.1, torch.float32)


def test_real_processes_gloo():
    world = 3
    xs, dys, masks, params = _inputs("btc_mask", torch.float32)
    outs = spawn(world, _spawn_rank, world, xs, dys, masks, params, timeout=120)
    ref_steps, ref_rm, ref_rv, _ = _reference("btc_mask", xs, dys, masks, params, 0.1)
    for s, (y_ref, dx_ref, dw_ref, db_ref) in enumerate(ref_steps):
        steps = [o[0][s] for o in outs]
        torch.testing.assert_close(torch.cat([t[0] for t in steps]).double(), y_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.cat([t[1] for t in steps]).double(), dx_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(sum(t[2] for t in steps).double(), dw_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(sum(t[3] for t in steps).double(), db_ref, rtol=0, atol=1e-5)
        # fwd 2C+1 float64 (exact moments), bwd 2C float32
        assert all(t[4].counts == {"all_reduce": 2} and t[4].bytes["all_reduce"] == (2 * C + 1) * 8 + 2 * C * 4 for t in steps)
    torch.testing.assert_close(outs[2][1].double(), ref_rm, rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[2][2].double(), ref_rv, rtol=0, atol=1e-5)


def _gradcheck_rank(rank, world, x_full, mask_full):
    sizes = sizes_with_empty_rank(x_full.shape[0], world)
    group = world_group(world)
    bn = SyncBatchNorm(C, group=group, channel_dim=-1, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, C, dtype=torch.float64))
    mask = split_for_world(mask_full, world, sizes=sizes)[rank]
    x = split_for_world(x_full, world, sizes=sizes)[rank]
    return distributed_gradcheck(lambda inp: bn(inp, mask), x, group)


@pytest.mark.parametrize("world", [1, 3])
def test_distributed_gradcheck(world):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, C, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 2, generator=g) > 0.3
    assert all(simulate(world, _gradcheck_rank, world, x, mask, timeout=120))


def test_functional_checks_its_inputs():
    from distnorm.data_parallel import sync_batch_norm

    with pytest.raises(ValueError, match=r"sync_batch_norm: parameter running_mean must have shape \(4,\), got \(3,\)"):
        sync_batch_norm(torch.randn(2, 4), torch.zeros(3), torch.ones(3), channel_dim=-1)
    with pytest.raises(ValueError, match=r"input must have at least 2 dims .* got shape \(4,\) \(rank 0 of 1\)"):
        sync_batch_norm(torch.randn(4), None, None)
    for wrong in (torch.ones(5), torch.ones(1)):  # larger, and broadcastable: both named, never broadcast
        with pytest.raises(ValueError, match=rf"sync_batch_norm: parameter weight must have shape \(4,\), got "
                                             rf"\({wrong.numel()},\) \(rank 0"):
            sync_batch_norm(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), wrong)
        with pytest.raises(ValueError, match=rf"parameter bias must have shape \(4,\), got \({wrong.numel()},\)"):
            sync_batch_norm(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), torch.ones(4), wrong)


@pytest.mark.parametrize("kind", ["nonreentrant", "reentrant", "selective", "compiled nonreentrant"])
def test_functional_under_checkpoint_advances_the_running_stats_once(kind):
    # the output reads only the batch: a recomputation that leaves the running statistics alone is exact
    from distnorm.data_parallel import sync_batch_norm
    from tests.data_parallel._compose import region

    def steps(run_kind):
        g = torch.Generator().manual_seed(5)
        weight, bias = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        stats = torch.zeros(C), torch.ones(C)
        holder = nn.Module()  # region() checkpoints while its module trains
        fn = region(holder, run_kind.removeprefix("compiled "), call=lambda t: sync_batch_norm(t, *stats, weight, bias))
        if run_kind.startswith("compiled"):
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out = []
        for _ in range(3):
            x = torch.randn(6, C, 5, generator=g, requires_grad=True)
            fn(x).mul(torch.randn(6, C, 5, generator=g)).sum().backward()
            out += [x.grad, weight.grad.clone(), bias.grad.clone(), *(s.clone() for s in stats)]
        return out

    for got, want in zip(steps(kind), steps("none"), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _ScalarReads(TorchDispatchMode):
    """Records reads of tensor data by the host (.item(), float(t), bool(t), `if t:`)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _host_sync_rank(rank, world):
    bn = SyncBatchNorm(C, group=world_group(world), channel_dim=-1, momentum=None)
    rows = 3 * rank if world > 1 else 3  # rank 0 of 2 is empty
    x = torch.randn(rows, 4, C, requires_grad=True)
    mask = torch.ones(rows, 4, dtype=torch.bool)
    with _ScalarReads() as mode:
        bn(x, mask).sum().backward()
    return mode.reads


@pytest.mark.parametrize("world", [1, 2])
def test_no_host_sync(world):
    # the masked path with momentum=None is where a host read would hide (count, 1/num_batches)
    assert simulate(world, _host_sync_rank, world, timeout=60) == [0] * world
