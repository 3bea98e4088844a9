"""EvoNormB0 (synced batch variance) and EvoNormS0 (local): N ranks == float64 reference, over steps."""

import pytest
import torch
import torch.distributed as dist

from distnorm.data_parallel.evo_norm import EvoNormB0, EvoNormS0
from distnorm.functional.evo_norm import evo_norm_b0_ref, evo_norm_s0_ref
from distnorm.testing import simulate
from tests.data_parallel._literature import assert_parity, autograd_reference, gather, make_steps, perturb_, run_rank

C, STEPS = 4, 4


def _b0(group=None, **kw):
    return EvoNormB0(C, momentum=0.2, group=group, **kw)


def _s0(group=None, **kw):
    return EvoNormS0(C, groups=2, group=group, **kw)


def _b0_reference(steps, channel_dim, training=True):
    module = perturb_(_b0(channel_dim=channel_dim).double())
    state = {"running_var": torch.ones(C), "num_batches_tracked": torch.tensor(0)}

    def fn(x, mask, p, s):
        return evo_norm_b0_ref(x, p, s, momentum=0.2, channel_dim=channel_dim, mask=mask, training=training)

    return autograd_reference(steps, dict(module.named_parameters()), state, fn)


def _s0_reference(steps, channel_dim):
    module = perturb_(_s0(channel_dim=channel_dim).double())

    def fn(x, mask, p, s):
        return evo_norm_s0_ref(x, p, groups=2, channel_dim=channel_dim, mask=mask), s

    return autograd_reference(steps, dict(module.named_parameters()), {}, fn)


@pytest.mark.parametrize("layout", ["cnn", "tokens_masked"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evo_norm_b0_ranks_match_reference_float64(world, layout):
    channel_dim, masked = (1, False) if layout == "cnn" else (-1, True)
    steps = make_steps(STEPS, C, channel_dim, masked)
    out = gather(simulate(world, run_rank, world, _b0, {"channel_dim": channel_dim}, steps, torch.float64, timeout=60))
    assert_parity(out, _b0_reference(steps, channel_dim), atol=1e-10)
    expected = ({}, {}) if world == 1 else ({"all_reduce": 2}, {"all_reduce": 2 * (2 * C + 1) * 8})
    for rank_counts in out["counts"]:
        assert rank_counts == [expected] * STEPS


@pytest.mark.parametrize("world", [1, 3])
def test_evo_norm_b0_eval_uses_running_var_without_collectives(world):
    steps = make_steps(2, C, 1, False)
    out = gather(simulate(world, run_rank, world, _b0, {"channel_dim": 1}, steps, torch.float64, False, timeout=60))
    assert_parity(out, _b0_reference(steps, 1, training=False), atol=1e-10)
    assert all(rank_counts == [({}, {})] * 2 for rank_counts in out["counts"])


@pytest.mark.parametrize("layout", ["cnn", "tokens_masked"])
@pytest.mark.parametrize("world", [1, 4])
def test_evo_norm_s0_ranks_match_reference_float64(world, layout):
    channel_dim, masked = (1, False) if layout == "cnn" else (-1, True)
    steps = make_steps(STEPS, C, channel_dim, masked)
    out = gather(simulate(world, run_rank, world, _s0, {"channel_dim": channel_dim}, steps, torch.float64, timeout=60))
    assert_parity(out, _s0_reference(steps, channel_dim), atol=1e-10)
    assert all(rank_counts == [({}, {})] * STEPS for rank_counts in out["counts"])


def test_evo_norm_b0_float32_ranks_match_one_process():
    steps = make_steps(STEPS, C, -1, True, dtype=torch.float32)
    one = gather([run_rank(0, 1, _b0, {"channel_dim": -1}, steps, torch.float32)])
    out = gather(simulate(4, run_rank, 4, _b0, {"channel_dim": -1}, steps, torch.float32, timeout=60))
    assert_parity(out, one, atol=1e-5, rtol=1e-5)



def test_evo_norm_bad_inputs():
    with pytest.raises(ValueError, match=r"EvoNormS0: groups must divide num_features=4, got 3 \(rank 0\)"):
        EvoNormS0(C, groups=3)
    with pytest.raises(ValueError, match=r"EvoNormB0: input has 3 channels on channel_dim=1, expected num_features=4.*rank 0"):
        _b0()(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"EvoNormS0: mask must be a bool tensor.*\(2, 5\), got torch.bool \(2, 4\).*rank 0"):
        _s0()(torch.randn(2, C, 5), mask=torch.ones(2, 4, dtype=torch.bool))


def _all_empty(rank):
    _b0(group=dist.group.WORLD)(torch.zeros(0, C, 3))


def test_evo_norm_b0_all_ranks_empty_is_an_error():
    with pytest.raises(RuntimeError, match=r"EvoNormB0: the global batch has no real elements.*rank 0 of 2"):
        simulate(2, _all_empty, timeout=60)
