"""PowerNorm: N ranks (uneven, one empty, masks) == float64 reference on the whole batch, over steps."""

import pytest
import torch
import torch.distributed as dist

from distnorm.data_parallel.power_norm import PowerNorm
from distnorm.functional.power_norm import power_norm_ref
from distnorm.testing import simulate
from tests.data_parallel._literature import assert_parity, gather, make_steps, perturb_, run_rank

C = 4
CASES = {  # name: (channel_dim, masked, kwargs)
    "cnn": (1, False, {"warmup_iters": 2}),
    "tokens_masked_groupscaling": (-1, True, {"warmup_iters": 2, "group_num": 2, "alpha_fwd": 0.8, "alpha_bkw": 0.7}),
}


def _build(group=None, **kw):
    return PowerNorm(C, group=group, **kw)


def _reference(steps, channel_dim, kw):
    params = perturb_(_build(channel_dim=channel_dim, **kw).double())
    w, b = params.weight.detach(), params.bias.detach()
    state = {"running_phi": torch.ones(C, dtype=torch.float64), "ema_gz": torch.zeros(C, dtype=torch.float64),
             "step": torch.tensor(0)}
    ys, dxs, dw, db = [], [], 0, 0
    for x, dy, mask in steps:
        y, dx, dwi, dbi, state = power_norm_ref(x, dy, w, b, state, channel_dim=channel_dim, mask=mask, **kw)
        ys, dxs, dw, db = [*ys, y], [*dxs, dx], dw + dwi, db + dbi
    buffers = {"running_phi": state["running_phi"], "ema_gz": state["ema_gz"], "num_batches_tracked": state["step"]}
    return {"ys": ys, "dxs": dxs, "grads": {"weight": dw, "bias": db}, "buffers": buffers}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_power_norm_ranks_match_reference_float64(world, case):
    channel_dim, masked, kw = CASES[case]
    steps = make_steps(4, C, channel_dim, masked)
    per_rank = simulate(world, run_rank, world, _build, {"channel_dim": channel_dim, **kw}, steps, torch.float64, timeout=60)
    out = gather(per_rank)
    assert_parity(out, _reference(steps, channel_dim, kw), atol=1e-10)
    expected = {} if world == 1 else {"all_reduce": 2}
    expected_bytes = {} if world == 1 else {"all_reduce": ((C + 1) + C) * 8}
    for rank_counts in out["counts"]:
        assert rank_counts == [(expected, expected_bytes)] * len(steps)


def test_power_norm_float32_ranks_match_one_process():
    channel_dim, masked, kw = CASES["tokens_masked_groupscaling"]
    steps = make_steps(4, C, channel_dim, masked, dtype=torch.float32)
    kwargs = {"channel_dim": channel_dim, **kw}
    one = gather([run_rank(0, 1, _build, kwargs, steps, torch.float32)])
    out = gather(simulate(3, run_rank, 3, _build, kwargs, steps, torch.float32, timeout=60))
    assert_parity(out, one, atol=1e-5, rtol=1e-5)
    assert out["ys"][0].dtype == torch.float32



def test_power_norm_eval_is_the_folded_affine_map():
    norm = perturb_(PowerNorm(C, warmup_iters=1, channel_dim=1).double())
    for x, _, _ in make_steps(3, C, 1, False):
        norm(x)
    norm.eval()
    x = torch.randn(2, C, 3, dtype=torch.float64)
    scale, shift = norm.fold_scale_shift()
    torch.testing.assert_close(norm(x), x * scale.double().view(1, C, 1) + shift.double().view(1, C, 1))
    with pytest.raises(ValueError, match=r"group_num=2 makes the eval form non-affine.*rank 0"):
        PowerNorm(C, group_num=2).fold_scale_shift()


def test_power_norm_bad_inputs():
    norm = PowerNorm(C)
    with pytest.raises(ValueError, match=r"input has 5 channels on channel_dim=-1, expected num_features=4.*rank 0"):
        norm(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of the input's shape without the channel dim \(2, 3\), got torch.bool \(2, 4\).*rank 0"):
        norm(torch.randn(2, 3, C), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"group_num must divide num_features=4, got 3"):
        PowerNorm(C, group_num=3)
    with pytest.raises(RuntimeError, match=r"no real elements.*rank 0 of 1"):  # data (the mask): a device assert
        norm(torch.randn(2, 3, C), mask=torch.zeros(2, 3, dtype=torch.bool))


def _all_empty(rank):
    PowerNorm(C, group=dist.group.WORLD)(torch.zeros(0, 3, C))


def test_power_norm_all_ranks_empty_is_an_error_on_every_rank():
    with pytest.raises(RuntimeError, match=r"PowerNorm: the global batch has no real elements.*rank 0 of 2"):
        simulate(2, _all_empty, timeout=60)


def test_group_scaling_keeps_the_authors_eps_whatever_the_norm_eps():
    x = torch.randn(3, 4, C, dtype=torch.float64) * 0.05  # small activations: eps matters
    dy = torch.randn_like(x)
    norm = PowerNorm(C, eps=1e-3, group_num=2, warmup_iters=1).double()
    y = norm(x)
    state = {"running_phi": torch.ones(C, dtype=torch.float64), "ema_gz": torch.zeros(C, dtype=torch.float64),
             "step": torch.tensor(0)}
    ones, zeros = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    y_authors, *_ = power_norm_ref(x, dy, ones, zeros, state, eps=1e-3, warmup_iters=1, group_num=2)
    y_coupled, *_ = power_norm_ref(x, dy, ones, zeros, state, eps=1e-3, warmup_iters=1, group_num=2,
                                   group_scaling_eps=1e-3)
    torch.testing.assert_close(y.detach(), y_authors, rtol=0, atol=1e-12)
    assert float((y_coupled - y_authors).abs().max()) > 0.1  # the coupling the authors avoid changes outputs
    coupled = PowerNorm(C, eps=1e-3, group_num=2, warmup_iters=1, group_scaling_eps=1e-3).double()
    torch.testing.assert_close(coupled(x).detach(), y_coupled, rtol=0, atol=1e-12)
    assert "group_scaling_eps=1e-05" in repr(norm)


def test_running_quadratic_mean_is_the_ema_from_step_warmup_iters_on():
    norm = PowerNorm(C, warmup_iters=2, alpha_fwd=0.8).double()
    xs = [torch.randn(4, 3, C, dtype=torch.float64) * s for s in (1.0, 2.0, 3.0)]
    psi = [x.square().mean((0, 1)) for x in xs]
    norm(xs[0])  # t = 1 < warmup_iters: the cumulative average of one batch
    torch.testing.assert_close(norm.running_phi, psi[0], rtol=0, atol=1e-12)
    norm(xs[1])  # t = 2 = warmup_iters: normalised by the batch, psi^2 moves by EMA (the authors' rule)
    torch.testing.assert_close(norm.running_phi, 0.8 * psi[0] + 0.2 * psi[1], rtol=0, atol=1e-12)
    norm(xs[2])
    torch.testing.assert_close(norm.running_phi, 0.8 * (0.8 * psi[0] + 0.2 * psi[1]) + 0.2 * psi[2], rtol=0, atol=1e-12)
