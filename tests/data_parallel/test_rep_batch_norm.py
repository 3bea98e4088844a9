"""RepBatchNorm and ProgressiveRepBN: N ranks == float64 reference on the whole batch, over steps."""

import pytest
import torch
import torch.distributed as dist

from distnorm.data_parallel.rep_batch_norm import ProgressiveRepBN, RepBatchNorm
from distnorm.functional.rep_batch_norm import progressive_rep_bn_ref, rep_batch_norm_ref
from distnorm.testing import simulate
from tests.data_parallel._literature import assert_parity, autograd_reference, gather, make_steps, perturb_, run_rank

C, STEPS = 4, 6
SCHEDULE = {"warmup_steps": 1, "decay_steps": 3, "total_steps": STEPS}  # lam: 1, 1, 2/3, 1/3, 0, 0


def _rep_bn(group=None, **kw):
    return RepBatchNorm(C, group=group, **kw)


def _prep_bn(group=None, **kw):
    return ProgressiveRepBN(C, group=group, **SCHEDULE, **kw)


def _rep_bn_reference(steps, channel_dim, momentum):
    module = perturb_(_rep_bn(channel_dim=channel_dim).double())
    state = {"running_mean": torch.zeros(C), "running_var": torch.ones(C), "num_batches_tracked": torch.tensor(0)}

    def fn(x, mask, p, s):
        return rep_batch_norm_ref(x, p["weight"], p["bias"], p["alpha"], s, channel_dim=channel_dim, mask=mask,
                                  momentum=momentum)

    return autograd_reference(steps, dict(module.named_parameters()), state, fn)


def _prep_bn_reference(steps, channel_dim):
    module = perturb_(_prep_bn(channel_dim=channel_dim).double())
    state = {"step": torch.tensor(0), "rep_bn.running_mean": torch.zeros(C), "rep_bn.running_var": torch.ones(C),
             "rep_bn.num_batches_tracked": torch.tensor(0)}

    def fn(x, mask, p, s):
        return progressive_rep_bn_ref(x, p, s, warmup_steps=1, decay_steps=3, channel_dim=channel_dim, mask=mask)

    return autograd_reference(steps, dict(module.named_parameters()), state, fn)


@pytest.mark.parametrize("layout", ["cnn", "tokens_masked"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rep_batch_norm_ranks_match_reference_float64(world, layout):
    channel_dim, masked = (1, False) if layout == "cnn" else (-1, True)
    momentum = 0.1 if layout == "cnn" else None  # None: cumulative average, as torch BatchNorm
    steps = make_steps(STEPS, C, channel_dim, masked)
    out = gather(simulate(world, run_rank, world, _rep_bn, {"channel_dim": channel_dim, "momentum": momentum},
                          steps, torch.float64, timeout=60))
    assert_parity(out, _rep_bn_reference(steps, channel_dim, momentum), atol=1e-10)
    expected = ({}, {}) if world == 1 else ({"all_reduce": 2}, {"all_reduce": ((2 * C + 1) + 2 * C) * 8})  # fwd 2C+1, bwd 2C
    for rank_counts in out["counts"]:
        assert rank_counts == [expected] * STEPS


@pytest.mark.parametrize("layout", ["cnn", "tokens_masked"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_progressive_rep_bn_ranks_match_reference_float64(world, layout):
    channel_dim, masked = (1, False) if layout == "cnn" else (-1, True)
    steps = make_steps(STEPS, C, channel_dim, masked, seed=2)
    out = gather(simulate(world, run_rank, world, _prep_bn, {"channel_dim": channel_dim}, steps, torch.float64, timeout=60))
    assert_parity(out, _prep_bn_reference(steps, channel_dim), atol=1e-10)
    expected = ({}, {}) if world == 1 else ({"all_reduce": 2}, {"all_reduce": ((2 * C + 1) + 2 * C) * 8})  # fwd 2C+1, bwd 2C
    for rank_counts in out["counts"]:
        assert rank_counts == [expected] * STEPS


def test_progressive_rep_bn_float32_ranks_match_one_process():
    steps = make_steps(STEPS, C, -1, True, dtype=torch.float32)
    one = gather([run_rank(0, 1, _prep_bn, {}, steps, torch.float32)])
    out = gather(simulate(4, run_rank, 4, _prep_bn, {}, steps, torch.float32, timeout=60))
    assert_parity(out, one, atol=1e-5, rtol=1e-5)



def test_progressive_rep_bn_resumes_its_schedule_from_the_state_dict():
    steps = make_steps(STEPS, C, -1, False)
    straight = perturb_(_prep_bn().double())
    for x, _, _ in steps:
        y_straight = straight(x)
    first = perturb_(_prep_bn().double())
    for x, _, _ in steps[:3]:
        first(x)
    resumed = _prep_bn().double()
    resumed.load_state_dict(first.state_dict())
    assert int(resumed.step) == 3
    for x, _, _ in steps[3:]:
        y_resumed = resumed(x)
    torch.testing.assert_close(y_resumed, y_straight, rtol=0, atol=0)


def test_rep_batch_norm_eval_is_the_folded_affine_map():
    for norm in (perturb_(RepBatchNorm(C, channel_dim=1).double()), perturb_(_prep_bn(channel_dim=1).double())):
        for x, _, _ in make_steps(3, C, 1, False):
            norm(x)
        norm.eval()
        x = torch.randn(2, C, 3, dtype=torch.float64)
        scale, shift = norm.fold_scale_shift()
        torch.testing.assert_close(norm(x), x * scale.double().view(1, C, 1) + shift.double().view(1, C, 1))


def test_progressive_schedule_longer_than_training_is_an_error():
    with pytest.raises(ValueError, match=r"warmup_steps \+ decay_steps = 1100, after training ends at total_steps = 1000.*rank 0"):
        ProgressiveRepBN(C, warmup_steps=100, decay_steps=1000, total_steps=1000)
    with pytest.raises(ValueError, match=r"decay_steps must be >= 1.*got decay_steps=0"):
        ProgressiveRepBN(C, decay_steps=0, total_steps=10)


def test_rep_batch_norm_bad_inputs():
    with pytest.raises(ValueError, match=r"RepBatchNorm: input has 3 channels on channel_dim=-1, expected num_features=4.*rank 0"):
        RepBatchNorm(C)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"ProgressiveRepBN: mask must be a bool tensor.*got torch.int64 \(2, 5\).*rank 0"):
        _prep_bn()(torch.randn(2, 5, C), mask=torch.ones(2, 5, dtype=torch.long))


def _all_empty(rank):
    RepBatchNorm(C, group=dist.group.WORLD)(torch.zeros(0, 3, C))


def test_rep_batch_norm_all_ranks_empty_is_an_error():
    with pytest.raises(RuntimeError, match=r"RepBatchNorm: the global batch has no real elements.*rank 0 of 2"):
        simulate(2, _all_empty, timeout=60)
