"""Contracts shared by the running-statistics norms: bf16 in/out, running_stat_buffers, eval = no collectives."""

import pytest
import torch

from distnorm.data_parallel.batch_channel_norm import BatchChannelNorm
from distnorm.data_parallel.evo_norm import EvoNormB0, EvoNormS0
from distnorm.data_parallel.power_norm import PowerNorm
from distnorm.data_parallel.rep_batch_norm import ProgressiveRepBN, RepBatchNorm
from distnorm.data_parallel.unified_norm import UnifiedNorm
from distnorm.testing import assert_close_to_reference
from tests.data_parallel import test_batch_channel_norm as bcn
from tests.data_parallel import test_evo_norm as evo
from tests.data_parallel import test_power_norm as pn
from tests.data_parallel import test_rep_batch_norm as rbn
from tests.data_parallel import test_unified_norm as un
from tests.data_parallel._literature import make_steps, run_rank

CASES = {  # name: (builder, kwargs, reference(steps) -> dict)
    "PowerNorm": (pn._build, {"channel_dim": -1, "warmup_iters": 1}, lambda s: pn._reference(s, -1, {"warmup_iters": 1})),
    "UnifiedNorm": (un._build, {"channel_dim": -1, "window_size": 2, "warmup_iters": 1},
                    lambda s: un._reference(s, -1, {"window_size": 2, "warmup_iters": 1})),
    "RepBatchNorm": (rbn._rep_bn, {"channel_dim": -1}, lambda s: rbn._rep_bn_reference(s, -1, 0.1)),
    "ProgressiveRepBN": (rbn._prep_bn, {"channel_dim": -1}, lambda s: rbn._prep_bn_reference(s, -1)),
    "BatchChannelNorm": (bcn._build, {"channel_dim": -1}, lambda s: bcn._reference(s, -1)),
    "EvoNormB0": (evo._b0, {"channel_dim": -1}, lambda s: evo._b0_reference(s, -1)),
    "EvoNormS0": (evo._s0, {"channel_dim": -1}, lambda s: evo._s0_reference(s, -1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_input_gives_bfloat16_output_within_twice_its_rounding(name):
    build, kw, reference = CASES[name]
    steps64 = [(x.bfloat16().double(), dy.bfloat16().double(), m) for x, dy, m in make_steps(2, 4, -1, True)]
    steps16 = [(x.bfloat16(), dy.bfloat16(), m) for x, dy, m in steps64]
    out = run_rank(0, 1, build, kw, steps16, torch.float32)  # fp32 parameters and statistics, bf16 activations
    ref = reference(steps64)
    for y, y_ref in zip(out["ys"], ref["ys"]):
        assert y.dtype == torch.bfloat16
        assert_close_to_reference(y, y_ref, baseline=y_ref.bfloat16(), name=f"{name} output")
    for dx, dx_ref in zip(out["dxs"], ref["dxs"]):
        assert dx.dtype == torch.bfloat16
        assert_close_to_reference(dx, dx_ref, baseline=dx_ref.bfloat16(),
                                  name=f"{name} dx")


@pytest.mark.parametrize("cls,kw", [
    (PowerNorm, {}), (UnifiedNorm, {}), (RepBatchNorm, {}), (ProgressiveRepBN, {"decay_steps": 1, "total_steps": 1}),
    (BatchChannelNorm, {"num_groups": 2}), (EvoNormB0, {}), (EvoNormS0, {"groups": 2}),
])
def test_running_stat_buffers_name_real_float_buffers(cls, kw):
    module = cls(4, **kw)
    buffers = dict(module.named_buffers())
    assert isinstance(cls.running_stat_buffers, tuple)
    for name in cls.running_stat_buffers:
        assert buffers[name].dtype == torch.float32 and buffers[name].shape == (4,), name


@pytest.mark.parametrize("cls", [PowerNorm, UnifiedNorm])
def test_approximate_backward_state_survives_two_forwards_before_backward(cls):
    """Gradient accumulation: the backward-updated ema_gz is not a saved tensor (no version error)."""
    norm = cls(4, warmup_iters=0)
    x1, x2 = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    (norm(x1).square().sum() + norm(x2).square().sum()).backward()
    assert int(norm.num_batches_tracked) == 2 and bool(norm.ema_gz.abs().sum() > 0)
    assert x1.grad is not None and x2.grad is not None
