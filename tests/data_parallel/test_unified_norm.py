"""UnifiedNorm: N ranks == float64 reference on the whole batch, windows, skips and ema_gz included."""

import pytest
import torch
import torch.distributed as dist

from distnorm.data_parallel.unified_norm import UnifiedNorm
from distnorm.functional.unified_norm import unified_norm_ref
from distnorm.testing import simulate
from tests.data_parallel._literature import assert_parity, gather, make_steps, perturb_, run_rank

C, STEPS = 4, 7
SCALES = [1.0, 1.0, 1.0, 1.0, 60.0, 1.0, 1.0]  # step 5 is an outlier batch
CASES = {  # name: (channel_dim, masked, kwargs): all phases (warmup, window, ratio clamp, skip) in 7 steps
    "cnn_filtered": (1, False, {"window_size": 2, "warmup_iters": 2, "ratio_warmup_iters": 3, "outlier_filtration": True}),
    "tokens_masked": (-1, True, {"window_size": 2, "warmup_iters": 1, "ratio_warmup_iters": 4, "momentum": 0.8}),
}


def _build(group=None, **kw):
    return UnifiedNorm(C, group=group, **kw)


def _reference(steps, channel_dim, kw):
    params = perturb_(_build(channel_dim=channel_dim, **kw).double())
    w, b = params.weight.detach(), params.bias.detach()
    win = kw["window_size"]
    state = {"running_var": torch.ones(C), "ema_gz": torch.zeros(C), "step": torch.tensor(0),
             "buffer_x2": torch.zeros(win, C), "buffer_gz": torch.zeros(win, C), "skip_counter": torch.tensor(0)}
    ys, dxs, dw, db = [], [], 0, 0
    for x, dy, mask in steps:
        y, dx, dwi, dbi, state = unified_norm_ref(x, dy, w, b, state, channel_dim=channel_dim, mask=mask, **kw)
        ys, dxs, dw, db = [*ys, y], [*dxs, dx], dw + dwi, db + dbi
    buffers = dict(state)
    buffers["num_batches_tracked"] = buffers.pop("step")
    return {"ys": ys, "dxs": dxs, "grads": {"weight": dw, "bias": db}, "buffers": buffers}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_unified_norm_ranks_match_reference_float64(world, case):
    channel_dim, masked, kw = CASES[case]
    steps = make_steps(STEPS, C, channel_dim, masked, scales=SCALES)
    per_rank = simulate(world, run_rank, world, _build, {"channel_dim": channel_dim, **kw}, steps, torch.float64, timeout=60)
    out = gather(per_rank)
    ref = _reference(steps, channel_dim, kw)
    if kw.get("outlier_filtration"):
        assert 0 < int(ref["buffers"]["skip_counter"]) < STEPS - 1  # both skipped and kept steps happen
    assert_parity(out, ref, atol=1e-10)
    expected = {} if world == 1 else {"all_reduce": 2}
    expected_bytes = {} if world == 1 else {"all_reduce": ((C + 1) + C) * 8}
    for rank_counts in out["counts"]:
        assert rank_counts == [(expected, expected_bytes)] * STEPS


def test_unified_norm_float32_ranks_match_one_process():
    channel_dim, masked, kw = CASES["cnn_filtered"]
    steps = make_steps(STEPS, C, channel_dim, masked, dtype=torch.float32, scales=SCALES)
    kwargs = {"channel_dim": channel_dim, **kw}
    one = gather([run_rank(0, 1, _build, kwargs, steps, torch.float32)])
    out = gather(simulate(4, run_rank, 4, _build, kwargs, steps, torch.float32, timeout=60))
    assert_parity(out, one, atol=1e-5, rtol=1e-5)



def test_unified_norm_eval_is_the_folded_affine_map():
    norm = perturb_(UnifiedNorm(C, window_size=2, warmup_iters=1).double())
    for x, _, _ in make_steps(3, C, -1, False):
        norm(x)
    norm.eval()
    x = torch.randn(2, 3, C, dtype=torch.float64)
    scale, shift = norm.fold_scale_shift()
    torch.testing.assert_close(norm(x), x * scale.double() + shift.double())


def test_unified_norm_bad_inputs():
    norm = UnifiedNorm(C, channel_dim=1)
    with pytest.raises(ValueError, match=r"UnifiedNorm: input has 3 channels on channel_dim=1, expected num_features=4.*rank 0"):
        norm(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"UnifiedNorm: mask must be a bool tensor.*\(2, 5\), got torch.bool \(5, 2\).*rank 0"):
        norm(torch.randn(2, C, 5), mask=torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"window_size must be an int >= 1, got 0 \(rank 0\)"):
        UnifiedNorm(C, window_size=0)


def _all_empty(rank):
    UnifiedNorm(C, group=dist.group.WORLD)(torch.zeros(0, 3, C))


def test_unified_norm_all_ranks_empty_is_an_error():
    with pytest.raises(RuntimeError, match=r"UnifiedNorm: the global batch has no real elements.*rank 0 of 3"):
        simulate(3, _all_empty, timeout=60)
