"""plan_token_split / DeviceProfile: properties of the analytic cost model."""

import dataclasses
import math

import pytest
import torch

from distnorm.overlap import DeviceProfile, TokenSplitPlan, plan_token_split
from distnorm.overlap.token_split import predict_step_s

# a profile whose compute and comm are comparable at these sizes, so splits happen
PROFILE = DeviceProfile(flops_per_s=1e12, compute_latency_s=5e-6, tile_tokens=64, comm_latency_s=8e-6,
                        comm_bytes_per_s=2e10)
CASES = [(t, h, w) for t in (1, 7, 100, 127, 128, 1000, 4096, 8191) for h in (256, 1024) for w in (2, 3, 4, 8)]


@pytest.mark.parametrize("mode", ["allreduce", "reduce_scatter"])
def test_halves_aligned_and_never_predicted_slower(mode):
    for tokens, hidden, world in CASES:
        plan = plan_token_split(tokens, hidden, world, device_profile=PROFILE, num_layers=4, mode=mode)
        assert plan.num_tokens == tokens and plan.first + plan.second == tokens
        assert plan.predicted_split_s <= plan.predicted_unsplit_s
        if plan.split:
            align = math.lcm(PROFILE.tile_tokens, world)
            assert plan.first % align == 0 and plan.second >= align, (tokens, world, plan)
            assert plan.predicted_split_s < plan.predicted_unsplit_s * 0.99


def test_some_batches_split_and_tiny_ones_do_not():
    assert plan_token_split(4096, 1024, 4, device_profile=PROFILE, num_layers=4).split
    for tokens in (1, 7, 64, 127):  # fewer than two aligned halves (lcm(64, 4) = 64 tokens each)
        plan = plan_token_split(tokens, 1024, 4, device_profile=PROFILE, num_layers=4)
        assert not plan.split and "two aligned halves" in plan.reason
    plan = plan_token_split(4096, 1024, 1, device_profile=PROFILE)
    assert not plan.split and "world == 1" in plan.reason


def test_no_split_when_overheads_eat_the_gain():
    slow_launch = dataclasses.replace(PROFILE, compute_latency_s=1.0)  # a second per extra block launch
    plan = plan_token_split(4096, 1024, 4, device_profile=slow_launch, num_layers=4)
    assert not plan.split and "min_gain" in plan.reason


def test_balanced_split_when_compute_equals_comm():
    # no latencies, tile of one token, compute time per token == comm time per token: halves equal
    prof = DeviceProfile(flops_per_s=1.0, compute_latency_s=0.0, tile_tokens=1, comm_latency_s=0.0,
                         comm_bytes_per_s=2.0)
    plan = plan_token_split(1000, 1, 2, device_profile=prof, flops_per_token=1.0, num_layers=8)
    assert plan.split and abs(plan.first - 500) <= 10, plan
    # unsplit: 8 x (1000 compute + 1000 comm); split: 8 x 1000 compute, every collective but the
    # last half's (500) hidden
    assert plan.predicted_unsplit_s == pytest.approx(16000.0)
    assert plan.predicted_split_s == pytest.approx(8000.0 + 500.0, rel=0.02)


COST_FIELDS = {  # field -> value that makes things more expensive
    "flops_per_s": 0.5,
    "compute_latency_s": 3.0,
    "comm_latency_s": 3.0,
    "comm_bytes_per_s": 0.5,
    "backward_compute_ratio": 1.5,
}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("field", [*COST_FIELDS, "overlap_slowdown"])
def test_monotone_in_cost_inputs(field, training):
    """Raising any cost never lowers a predicted time: of a fixed split, or of the chosen plan."""
    model = dict(flops_per_token=16 * 1024 * 1024 / 4, num_layers=4, itemsize=2, training=training)
    plan_kw = dict(num_layers=4, training=training, normed_grad="partial", max_chunks=3)
    for mode in ("allreduce", "reduce_scatter"):
        prof = PROFILE
        for _ in range(3):
            value = getattr(prof, field)
            worse = dataclasses.replace(prof, **{field: value + 0.1 if field == "overlap_slowdown"
                                                  else value * COST_FIELDS[field]})
            for halves in ([4096], [2048, 2048], [1024, 3072], [1344, 1344, 1408]):
                for normed_grad in ("replicated", "partial"):
                    before = predict_step_s(halves, 1024, 4, device_profile=prof, mode=mode, normed_grad=normed_grad,
                                            **model)
                    after = predict_step_s(halves, 1024, 4, device_profile=worse, mode=mode, normed_grad=normed_grad,
                                           **model)
                    assert after >= before, (field, halves, before, after)
            best_before = plan_token_split(4096, 1024, 4, device_profile=prof, mode=mode, **plan_kw)
            best_after = plan_token_split(4096, 1024, 4, device_profile=worse, mode=mode, **plan_kw)
            assert best_after.predicted_split_s >= best_before.predicted_split_s
            prof = worse


def test_three_chunks_hide_what_two_halves_cannot_in_reduce_scatter_mode():
    """Compute == comm per token, no latencies: with two halves reduce_scatter mode hides about
    half the link time (the norm between a half's two collectives is host work), three chunks
    nearly all of it; allreduce mode hides nearly all with two."""
    prof = DeviceProfile(flops_per_s=1.0, compute_latency_s=0.0, tile_tokens=1, comm_latency_s=0.0,
                         comm_bytes_per_s=2.0)
    kw = dict(device_profile=prof, flops_per_token=1.0, num_layers=8, dtype=torch.bfloat16)
    two = plan_token_split(960, 1, 2, mode="reduce_scatter", **kw)
    three = plan_token_split(960, 1, 2, mode="reduce_scatter", max_chunks=3, **kw)
    assert len(two.halves) == 2 and len(three.halves) == 3 and sum(three.halves) == 960, (two, three)
    assert three.first == three.halves[0] and three.second == 960 - three.first
    # unsplit 8 x (960 + 960); ideal split 8 x 960 + a chunk's exposed collectives
    assert two.predicted_unsplit_s == pytest.approx(15360.0)
    assert two.predicted_split_s > 11000.0
    assert three.predicted_split_s < 9000.0
    ar = plan_token_split(960, 1, 2, mode="allreduce", **kw)
    assert len(ar.halves) == 2 and ar.predicted_split_s < 9000.0


def test_training_plans_count_the_backward():
    kw = dict(device_profile=PROFILE, num_layers=4, mode="reduce_scatter")
    fwd = plan_token_split(4096, 1024, 4, **kw)
    for normed_grad in ("replicated", "partial"):
        step = plan_token_split(4096, 1024, 4, training=True, normed_grad=normed_grad, **kw)
        assert step.predicted_unsplit_s > 2 * fwd.predicted_unsplit_s
    # "replicated": the consumer's blocking all-reduce of x's gradient costs more than the
    # reduce-scatter "partial" moves instead
    rep = plan_token_split(4096, 1024, 4, training=True, normed_grad="replicated", **kw)
    par = plan_token_split(4096, 1024, 4, training=True, normed_grad="partial", **kw)
    assert rep.predicted_unsplit_s > par.predicted_unsplit_s


def test_calibrate_recovers_a_known_profile():
    true = DeviceProfile(flops_per_s=3e11, compute_latency_s=2e-5, tile_tokens=32, comm_latency_s=4e-5,
                         comm_bytes_per_s=5e9)
    fpt = 1e6
    compute = [(t, true.compute_s(t, fpt)) for t in (32, 100, 512, 2048)]
    comm = [(b, true.comm_s(b)) for b in (1e3, 1e5, 1e7)]
    fit = DeviceProfile.calibrate(compute=compute, comm=comm, flops_per_token=fpt, tile_tokens=32)
    for f in ("flops_per_s", "compute_latency_s", "comm_latency_s", "comm_bytes_per_s"):
        assert getattr(fit, f) == pytest.approx(getattr(true, f), rel=1e-9), f
    with pytest.raises(ValueError, match=r"comm needs >= 2 distinct sizes, got \[1000.0\]"):
        DeviceProfile.calibrate(compute=compute, comm=[(1e3, 1.0), (1e3, 2.0)], flops_per_token=fpt)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"num_tokens must be a positive int, got 0 \(rank 0\)"):
        plan_token_split(0, 16, 2)
    with pytest.raises(ValueError, match=r"world must be a positive int, got 2.0 \(rank 0\)"):
        plan_token_split(8, 16, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mode must be 'allreduce' or 'reduce_scatter', got 'ring'"):
        plan_token_split(8, 16, 2, mode="ring")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"first must be in \[1, num_tokens=8\], got 9"):
        TokenSplitPlan(num_tokens=8, first=9)
    with pytest.raises(ValueError, match=r"chunks must be >= 2 positive token counts summing to num_tokens=8, "
                                         r"the first equal to first=3, got \(3, 3, 3\)"):
        TokenSplitPlan(num_tokens=8, first=3, chunks=(3, 3, 3))
    with pytest.raises(ValueError, match=r"max_chunks must be 2 or 3, got 4"):
        plan_token_split(8, 16, 2, max_chunks=4)
    with pytest.raises(ValueError, match=r"normed_grad must be one of .* got 'sum'"):
        plan_token_split(8, 16, 2, normed_grad="sum")  # type: ignore[arg-type]


def test_default_profile_splits_a_large_h100_batch():
    plan = plan_token_split(8192, 8192, 8, num_layers=32, dtype=torch.bfloat16)
    assert plan.split and plan.first % 128 == 0
