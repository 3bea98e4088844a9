"""distnorm.debug: cross-rank consistency checks, replica drift, non-finite detection."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distnorm import comm, debug
from distnorm.comm import count_collectives, shard_sizes
from distnorm.tensor_parallel import SequenceParallelRMSNorm, ShardedLayerNorm, ShardedRMSNorm
from distnorm.testing import simulate, spawn, split_for_world

WORLDS = [1, 2, 3, 4]
TIMEOUT = 60


def _group(world):
    return dist.group.WORLD if world > 1 else None


# --------------------------------------------------------------------------------------------
# consistency_checks
# --------------------------------------------------------------------------------------------


def _agreeing_ops(rank, x_full, world, checked):
    group = _group(world)
    x = split_for_world(x_full, world)[rank].requires_grad_()
    before = debug.consistency_check_stats()
    with debug.consistency_checks() if checked else contextlib.nullcontext(), count_collectives() as c:
        y = comm.gather_along(x, group, dim=0, sizes=shard_sizes(x_full.shape[0], world))  # uneven
        z = comm.reduce_from_group(y * (rank + 1), group)
        comm.reduce_scatter_along(z, group).sum().backward()
    after = debug.consistency_check_stats()
    return y.detach(), x.grad, c, (after[0] - before[0], after[1] - before[1])


@pytest.mark.parametrize("world", WORLDS)
def test_consistency_checks_pass_agreeing_ranks_and_cost_one_all_gather_each(world):
    x_full = torch.randn(10, 3, dtype=torch.float64)
    plain = simulate(world, _agreeing_ops, x_full, world, False, timeout=TIMEOUT)
    checked = simulate(world, _agreeing_ops, x_full, world, True, timeout=TIMEOUT)
    for (y, grad, c, checks), (_, grad0, c0, checks0) in zip(checked, plain):
        torch.testing.assert_close(y, x_full, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad0, rtol=0, atol=0)
        assert c.counts == c0.counts and c.bytes == c0.bytes  # the op's pinned contract is unchanged
        assert checks0 == (0, 0)
        if world == 1:
            assert c.counts == {} and checks == (0, 0)
        else:
            # fwd all-gather, all-reduce, reduce-scatter; bwd all-gather and reduce-scatter: each of
            # the 5 is preceded by one check all-gather of 14 int64.
            assert c0.counts == {"all_gather": 2, "all_reduce": 1, "reduce_scatter": 2}
            assert checks == (5, 5 * 14 * 8)


def _token_mismatch(rank, world, spawned=False):
    group = dist.group.WORLD
    tokens = 5 if rank == world - 1 else 4  # the last rank was handed one token too many
    x = torch.ones(tokens, 8)
    try:
        with debug.consistency_checks():
            comm.gather_along(x, group, dim=0)  # sequence-parallel gather with equal shards assumed
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("world", [2, 3, 4])
def test_different_token_count_raises_on_every_rank(world):
    msgs = simulate(world, _token_mismatch, world, timeout=TIMEOUT)
    for rank, msg in enumerate(msgs):
        assert msg is not None, f"rank {rank} did not raise"
        assert "consistency check failed before all_gather" in msg
        assert "shape: " + "; ".join(
            f"rank {r}: ({5 if r == world - 1 else 4}, 8)" for r in range(world)) in msg
        assert "dtype: float32 (all ranks)" in msg
        assert f"raised on rank {rank} of the group" in msg


def _sharded_norm_token_mismatch(rank, world):
    norm = ShardedLayerNorm(12, group=dist.group.WORLD)
    x_shard = torch.randn(7 if rank == 1 else 6, norm.local_size)  # rank 1 got one more token
    try:
        with debug.consistency_checks():
            norm(x_shard)
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_norm_with_a_different_token_count_raises_on_every_rank(world):
    msgs = simulate(world, _sharded_norm_token_mismatch, world, timeout=TIMEOUT)
    for msg in msgs:
        assert msg is not None and "before all_reduce" in msg
        assert "called from: distnorm.kernels.autograd.ShardedNormFn.forward (all ranks)" in msg
        assert "rank 1: (7, 2)" in msg and "rank 0: (6, 2)" in msg


def _fused_token_mismatch(rank, world):
    from distnorm.overlap import fused_allreduce_rms_norm

    tokens = 5 if rank == 0 else 4
    try:
        with debug.consistency_checks():
            fused_allreduce_rms_norm(torch.randn(tokens, 8), torch.randn(tokens, 8), torch.ones(8),
                                     group=dist.group.WORLD)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_fused_allreduce_rms_norm_with_a_different_token_count_raises_on_every_rank():
    for msg in simulate(3, _fused_token_mismatch, 3, timeout=TIMEOUT):
        assert msg is not None and "before all_reduce" in msg
        assert "shape: rank 0: (5, 8); rank 1: (4, 8); rank 2: (4, 8)" in msg


def _dtype_and_op_mismatch(rank, world):
    group = dist.group.WORLD
    out = []
    with debug.consistency_checks():
        try:  # rank 1 computed its stats in float64
            comm.all_reduce_(torch.ones(4, dtype=torch.float64 if rank == 1 else torch.float32), group)
        except RuntimeError as exc:
            out.append(str(exc))
        try:  # rank 0 broadcasts while the others all-reduce
            t = torch.ones(4)
            comm.broadcast_(t, 0, group) if rank == 0 else comm.all_reduce_(t, group)
        except RuntimeError as exc:
            out.append(str(exc))
    return out


def test_dtype_and_op_mismatches_name_each_rank_value():
    outs = simulate(3, _dtype_and_op_mismatch, 3, timeout=TIMEOUT)
    for dtype_msg, op_msg in outs:
        assert "dtype: rank 0: float32; rank 1: float64; rank 2: float32" in dtype_msg
        assert "op: rank 0: broadcast; rank 1: all_reduce; rank 2: all_reduce" in op_msg
        assert "consistency check failed before all_reduce / broadcast" in op_msg


def _norm_a(x, group):
    return comm.all_reduce_(x.pow(2).sum(-1, keepdim=True), group)


def _norm_b(x, group):
    return comm.all_reduce_(x.sum(-1, keepdim=True), group)


def _site_mismatch(rank, world):
    with debug.consistency_checks():
        try:
            (_norm_a if rank == 0 else _norm_b)(torch.ones(4, 3), dist.group.WORLD)
        except RuntimeError as exc:
            return str(exc)
    return None


def test_same_collective_from_different_ops_is_caught():
    msgs = simulate(2, _site_mismatch, 2, timeout=TIMEOUT)
    for msg in msgs:
        assert "called from: rank 0: tests.test_debug._norm_a; rank 1: tests.test_debug._norm_b" in msg


def _flag_run(rank, world):
    x = torch.ones(4 + (rank == 1), 2)
    try:  # no context manager: the process-wide flag alone checks this thread's collectives
        comm.gather_along(x, dist.group.WORLD)
    except RuntimeError as exc:
        return "consistency check failed" in str(exc)
    return "no error"


def test_config_flag_checks_every_thread_and_turns_off():
    assert not debug.consistency_checks_enabled()
    assert debug.enable_consistency_checks(True) is False
    try:
        assert debug.consistency_checks_enabled()
        assert simulate(2, _flag_run, 2, timeout=TIMEOUT) == [True, True]
    finally:
        assert debug.enable_consistency_checks(False) is True
    assert not debug.consistency_checks_enabled()
    assert comm._GLOBAL_HOOKS == []


def _flag_and_context(rank, world):
    before = debug.consistency_check_stats()[0]
    with debug.consistency_checks(), count_collectives() as c:
        comm.all_reduce_(torch.ones(3), dist.group.WORLD)
    return c.counts, debug.consistency_check_stats()[0] - before


def test_flag_and_context_manager_check_once():
    debug.enable_consistency_checks(True)
    try:
        outs = simulate(2, _flag_and_context, 2, timeout=TIMEOUT)
    finally:
        debug.enable_consistency_checks(False)
    assert outs == [({"all_reduce": 1}, 1)] * 2


# --------------------------------------------------------------------------------------------
# hyper-parameters, compared on first use
# --------------------------------------------------------------------------------------------


def _mismatched_norm(rank, world, which):
    from distnorm.data_parallel import SyncBatchNorm

    group = dist.group.WORLD
    if which == "eps":  # the example: a different eps on one rank of a ShardedRMSNorm
        norm, x = ShardedRMSNorm(8, eps=1e-5 if rank == 1 else 1e-6, group=group), torch.randn(3, 4)
    elif which == "bias":
        norm, x = ShardedLayerNorm(8, bias=rank != 0, group=group), torch.randn(3, 4)
    else:
        norm, x = SyncBatchNorm(4, momentum=0.1 if rank == 0 else 0.01, group=group), torch.randn(3, 4)
    try:
        with debug.consistency_checks():
            norm(x)
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(("which", "line"), [
    ("eps", "  eps: rank 0: 1e-06; rank 1: 1e-05"),
    ("bias", "  parameter bias: rank 0: <absent>; rank 1: float32"),
    ("momentum", "  momentum: rank 0: 0.1; rank 1: 0.01"),
])
def test_different_hyper_parameters_raise_on_every_rank(which, line):
    for rank, msg in enumerate(simulate(2, _mismatched_norm, 2, which, timeout=TIMEOUT)):
        assert msg is not None, f"rank {rank} did not raise"
        assert "is configured differently on the ranks of its group of 2" in msg
        assert line in msg.splitlines(), msg
        assert f"raised on rank {rank} of the group" in msg


def _agreeing_modules(rank, world, checked):
    group = dist.group.WORLD
    model = nn.Sequential(SequenceParallelRMSNorm(10, group=group), ShardedLayerNorm(10, group=group),
                          ShardedRMSNorm(10, group=group))
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    x_shard = x.split(shard_sizes(10, world), dim=-1)[rank]  # uneven: local_size differs across ranks
    before = debug.consistency_check_stats()[0]
    with debug.consistency_checks() if checked else contextlib.nullcontext(), count_collectives() as c:
        for _ in range(2):  # checked on the first call only
            y = model[2](model[1](x_shard)) + model[0](x).split(shard_sizes(10, world), dim=-1)[rank]
    return y, c.counts, debug.consistency_check_stats()[0] - before


def test_agreeing_modules_with_uneven_shards_pass_and_are_checked_once():
    plain = simulate(3, _agreeing_modules, 3, False, timeout=TIMEOUT)
    checked = simulate(3, _agreeing_modules, 3, True, timeout=TIMEOUT)
    for (y, counts, checks), (y0, counts0, checks0) in zip(checked, plain, strict=True):
        torch.testing.assert_close(y, y0, rtol=0, atol=0)
        assert counts == counts0 == {"all_reduce": 4} and checks0 == 0
        assert checks == 3 + 4  # one hyper-parameter check per module, once; one per collective


def test_hyper_parameters_leave_out_this_ranks_pieces():
    norm = ShardedLayerNorm(8, eps=1e-3)
    desc = debug.hyper_parameters(norm)
    assert desc["eps"] == "0.001" and desc["normalized_shape"] == repr(norm.normalized_shape)
    assert desc["parameter bias"] == "float32" and desc["group size"] == "1" and desc["class"] == "ShardedLayerNorm"
    assert not {"local_size", "param_shape", "training"} & desc.keys()
    norm.rank_local_attributes = ("eps",)  # a class may name more of them
    assert "eps" not in debug.hyper_parameters(norm)


# --------------------------------------------------------------------------------------------
# check_replicas
# --------------------------------------------------------------------------------------------


def _model(state=None):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    if state is not None:  # rank threads share the global RNG: the same weights come in from outside
        model.load_state_dict(state)
    return model


def _replicas(rank, world, drift_rank, state):
    model = _model(state)
    model[1].running_mean.fill_(0.5)
    if rank == drift_rank:
        model[1].running_mean[2] += 1e-7  # one float32 ulp-ish: exactness matters
    try:
        with count_collectives() as c:
            names = debug.check_replicas(model, _group(world))
    except RuntimeError as exc:
        return str(exc), c.counts
    return names, c.counts


@pytest.mark.parametrize("world", WORLDS)
def test_check_replicas_identical(world):
    outs = simulate(world, _replicas, world, -1, _model().state_dict(), timeout=TIMEOUT)
    for names, counts in outs:
        assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias",
                         "1.running_mean", "1.running_var", "1.num_batches_tracked"]
        assert counts == ({} if world == 1 else {"all_reduce": 1})


@pytest.mark.parametrize("world", [2, 3, 4])
def test_check_replicas_names_the_drifted_tensor_and_rank(world):
    outs = simulate(world, _replicas, world, 1, _model().state_dict(), timeout=TIMEOUT)
    others = [r for r in range(world) if r != 1]
    for msg, counts in outs:
        assert isinstance(msg, str)
        assert f"1 of 9 replicated tensors differ across the group of {world} ranks" in msg
        assert f"'1.running_mean': ranks agreeing: {others} | [1]" in msg
        assert counts == {"all_reduce": 1, "all_gather_object": 1}


def _gloo_checks(rank, world, state):
    return _token_mismatch(rank, world), _replicas(rank, world, 1, state)[0]


@pytest.mark.slow
def test_consistency_and_replica_checks_raise_on_every_gloo_process():
    outs = spawn(2, _gloo_checks, 2, _model().state_dict(), timeout=TIMEOUT)
    for token_msg, replica_msg in outs:  # real processes: no hang, the same error on every rank
        assert token_msg is not None and "shape: rank 0: (4, 8); rank 1: (5, 8)" in token_msg
        assert "'1.running_mean': ranks agreeing: [0] | [1]" in replica_msg


def _tp_replicas(rank, world, drift):
    group = dist.group.WORLD
    model = nn.Sequential(SequenceParallelRMSNorm(8, group=group), ShardedLayerNorm(8, group=group))
    with torch.no_grad():
        model[1].weight.fill_(rank)  # sharded: legitimately different on every rank
        if drift and rank == world - 1:
            model[0].weight[0] = 2.0
    try:
        return debug.check_replicas(model, group)
    except RuntimeError as exc:
        return str(exc)


def test_check_replicas_skips_parameters_sharded_over_the_group():
    assert simulate(3, _tp_replicas, 3, False, timeout=TIMEOUT) == [["0.weight"]] * 3
    for msg in simulate(3, _tp_replicas, 3, True, timeout=TIMEOUT):
        assert "'0.weight': ranks agreeing: [0, 1] | [2]" in msg


def test_check_replicas_include_and_bad_model():
    model = _model()
    assert debug.check_replicas(model, None, include=lambda n, t: "running" in n) == [
        "1.running_mean", "1.running_var"]
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got Tensor \(rank 0\)"):
        debug.check_replicas(torch.ones(2), None)


def test_fingerprint_is_exact():
    a = torch.randn(100)
    b = a.clone()
    assert torch.equal(debug._fingerprint(a), debug._fingerprint(b))
    b[7] = torch.nextafter(b[7], torch.tensor(float("inf")))
    assert not torch.equal(debug._fingerprint(a), debug._fingerprint(b))
    swapped = a.clone()
    swapped[[3, 4]] = a[[4, 3]]
    assert not torch.equal(debug._fingerprint(a), debug._fingerprint(swapped))
    assert not torch.equal(debug._fingerprint(a.view(10, 10)), debug._fingerprint(a.double()))


# --------------------------------------------------------------------------------------------
# detect_nonfinite
# --------------------------------------------------------------------------------------------


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


class _Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


def test_detect_nonfinite_names_first_forward_producer():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Identity(), _Log()), nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight.copy_(-torch.eye(3))
        model[0].bias.zero_()
    with pytest.raises(debug.NonFiniteError, match=r"module '1\.1' \(_Log\) in forward output on rank 0") as info:
        with debug.detect_nonfinite(model):
            model(torch.ones(2, 3))
    assert info.value.event.phase == "forward"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_detect_nonfinite_backward_and_report_mode():
    model = nn.Sequential(nn.Linear(2, 2), _Sqrt(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()  # sqrt(0): finite forward, infinite gradient
    with debug.detect_nonfinite(model, raise_error=False) as report:
        model(torch.ones(4, 2)).sum().backward()
    assert report.first is not None
    assert (report.first.module, report.first.phase, report.first.where) == ("1", "backward", "grad_input[0]")


def test_detect_nonfinite_blames_the_module_with_bad_parameters_and_not_its_consumers():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with debug.detect_nonfinite(model, backward=False, raise_error=False) as report:
        model(torch.ones(3, 2))
    assert [e.module for e in report.events] == ["0", "<root>"]  # the root saw finite inputs too
    assert report.first is not None and report.first.nonfinite_params == ("weight",)


def test_detect_nonfinite_without_model_hooks_every_module_and_cleans_up():
    with debug.detect_nonfinite(raise_error=False) as report:
        _Log()(torch.tensor([-1.0, 1.0]))
    assert report.first is not None and report.first.module == "_Log"
    with debug.detect_nonfinite(raise_error=False) as again:
        pass
    _Log()(torch.tensor([-1.0]))
    assert again.events == []


def _nonfinite_rank(rank, world):
    model = nn.Sequential(nn.Linear(2, 2), _Log())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2) * (-1.0 if rank == 2 else 1.0))
        model[0].bias.zero_()
    with debug.detect_nonfinite(model, raise_error=False) as report:
        y = model(torch.ones(1, 2))
        comm.all_reduce_(y.detach().clone(), dist.group.WORLD)
    return report.first


def test_detect_nonfinite_names_the_rank():
    firsts = simulate(3, _nonfinite_rank, 3, timeout=TIMEOUT)
    assert firsts[0] is None and firsts[1] is None
    assert firsts[2] is not None and (firsts[2].module, firsts[2].rank) == ("1", 2)
