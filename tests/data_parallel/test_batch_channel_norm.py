"""BatchChannelNorm: N ranks == float64 reference on the whole batch (estimates, GN, all grads)."""

import pytest
import torch
import torch.distributed as dist

from distnorm.data_parallel.batch_channel_norm import BatchChannelNorm
from distnorm.functional.batch_channel_norm import batch_channel_norm_ref
from distnorm.testing import simulate
from tests.data_parallel._literature import assert_parity, autograd_reference, gather, make_steps, perturb_, run_rank

C, G, STEPS = 4, 2, 4


def _build(group=None, **kw):
    return BatchChannelNorm(C, G, momentum=0.3, group=group, **kw)


def _reference(steps, channel_dim):
    module = perturb_(_build(channel_dim=channel_dim).double())
    state = {"running_mean": torch.zeros(C), "running_var": torch.ones(C), "num_batches_tracked": torch.tensor(0)}

    def fn(x, mask, p, s):
        return batch_channel_norm_ref(x, p, s, num_groups=G, momentum=0.3, channel_dim=channel_dim, mask=mask)

    return autograd_reference(steps, dict(module.named_parameters()), state, fn)


@pytest.mark.parametrize("layout", ["cnn", "tokens_masked"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_batch_channel_norm_ranks_match_reference_float64(world, layout):
    channel_dim, masked = (1, False) if layout == "cnn" else (-1, True)
    steps = make_steps(STEPS, C, channel_dim, masked)
    out = gather(simulate(world, run_rank, world, _build, {"channel_dim": channel_dim}, steps, torch.float64, timeout=60))
    # A sample with one real position makes a tiny group variance: |dx| ~ 1e3, so also 1e-12 relative.
    assert_parity(out, _reference(steps, channel_dim), atol=1e-10, rtol=1e-12)
    expected = ({}, {}) if world == 1 else ({"all_reduce": 1}, {"all_reduce": (2 * C + 1) * 8})
    for rank_counts in out["counts"]:
        assert rank_counts == [expected] * STEPS


def test_batch_channel_norm_float32_ranks_match_one_process():
    steps = make_steps(STEPS, C, 1, False, dtype=torch.float32)
    one = gather([run_rank(0, 1, _build, {}, steps, torch.float32)])
    out = gather(simulate(3, run_rank, 3, _build, {}, steps, torch.float32, timeout=60))
    assert_parity(out, one, atol=1e-5, rtol=1e-5)



def test_batch_channel_norm_eval_uses_the_estimates():
    norm = perturb_(_build().double())
    for x, _, _ in make_steps(2, C, 1, False):
        norm(x)
    norm.eval()
    x = torch.randn(3, C, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in norm.named_parameters()}
    y_ref, state = batch_channel_norm_ref(x, params, {k: v for k, v in norm.named_buffers()}, num_groups=G, training=False)
    torch.testing.assert_close(norm(x), y_ref, rtol=0, atol=1e-12)
    assert int(state["num_batches_tracked"]) == 2


def test_batch_channel_norm_bad_inputs():
    with pytest.raises(ValueError, match=r"num_groups must divide num_features=4, got 3 \(rank 0\)"):
        BatchChannelNorm(C, 3)
    with pytest.raises(ValueError, match=r"BatchChannelNorm: input has 5 channels on channel_dim=1, expected num_features=4.*rank 0"):
        _build()(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"BatchChannelNorm: mask must be a bool tensor.*\(2, 3\), got torch.bool \(2,\).*rank 0"):
        _build()(torch.randn(2, C, 3), mask=torch.ones(2, dtype=torch.bool))


def _all_empty(rank):
    _build(group=dist.group.WORLD)(torch.zeros(0, C, 3))


def test_batch_channel_norm_all_ranks_empty_is_an_error():
    with pytest.raises(RuntimeError, match=r"BatchChannelNorm: the global batch has no real elements.*rank 0 of 2"):
        simulate(2, _all_empty, timeout=60)


def test_estbn_keeps_the_authors_eps_whatever_the_norm_eps():
    x = torch.randn(3, C, 5, dtype=torch.float64) * 0.01  # tiny variance: both eps matter
    params = {k: torch.ones(C, dtype=torch.float64) if "weight" in k else torch.zeros(C, dtype=torch.float64)
              for k in ("weight", "bias", "cn_weight", "cn_bias")}
    state = {"running_mean": torch.zeros(C), "running_var": torch.ones(C), "num_batches_tracked": torch.tensor(0)}
    norm = BatchChannelNorm(C, G, eps=1e-3, momentum=0.3).double()
    y_authors, _ = batch_channel_norm_ref(x, params, state, num_groups=G, momentum=0.3, eps=1e-3)  # estbn_eps=1e-5
    y_coupled, _ = batch_channel_norm_ref(x, params, state, num_groups=G, momentum=0.3, eps=1e-3, estbn_eps=1e-3)
    torch.testing.assert_close(norm(x), y_authors, rtol=0, atol=1e-10)
    assert float((y_coupled - y_authors).abs().max()) > 1e-4  # the group norm after it hides most of it
    coupled = BatchChannelNorm(C, G, eps=1e-3, momentum=0.3, estbn_eps=1e-3).double()
    torch.testing.assert_close(coupled(x), y_coupled, rtol=0, atol=1e-10)
