"""Every running-statistics norm in 2 real gloo processes (one spawn for all: process start is the cost)."""

import torch

from distnorm.testing import spawn
from tests.data_parallel import test_batch_channel_norm as bcn
from tests.data_parallel import test_evo_norm as evo
from tests.data_parallel import test_power_norm as pn
from tests.data_parallel import test_rep_batch_norm as rbn
from tests.data_parallel import test_unified_norm as un
from tests.data_parallel._literature import assert_parity, gather, make_steps, run_rank


def _cases():
    """(name, builder, module kwargs, steps, reference thunk, rtol) for each norm."""
    pn_steps, un_steps = make_steps(3, pn.C, -1, True), make_steps(un.STEPS, un.C, -1, True, scales=un.SCALES)
    un_dim, _, un_kw = un.CASES["tokens_masked"]
    prep_steps, bcn_steps, evo_steps = make_steps(6, 4, 1, False, seed=3), make_steps(4, 4, -1, True), make_steps(4, 4, 1, False)
    s0_steps = make_steps(2, 4, -1, True)
    return [
        ("PowerNorm", pn._build, {"channel_dim": -1, "warmup_iters": 1}, pn_steps,
         lambda: pn._reference(pn_steps, -1, {"warmup_iters": 1}), 0.0),
        ("UnifiedNorm", un._build, {"channel_dim": un_dim, **un_kw}, un_steps,
         lambda: un._reference(un_steps, un_dim, un_kw), 0.0),
        ("ProgressiveRepBN", rbn._prep_bn, {"channel_dim": 1}, prep_steps, lambda: rbn._prep_bn_reference(prep_steps, 1), 0.0),
        ("RepBatchNorm", rbn._rep_bn, {"channel_dim": 1}, evo_steps, lambda: rbn._rep_bn_reference(evo_steps, 1, 0.1), 0.0),
        ("BatchChannelNorm", bcn._build, {"channel_dim": -1}, bcn_steps, lambda: bcn._reference(bcn_steps, -1), 1e-12),
        ("EvoNormB0", evo._b0, {"channel_dim": 1}, evo_steps, lambda: evo._b0_reference(evo_steps, 1), 0.0),
        ("EvoNormS0", evo._s0, {"channel_dim": -1}, s0_steps, lambda: evo._s0_reference(s0_steps, -1), 0.0),
    ]


def _all_norms(rank, world):
    return [run_rank(rank, world, build, kw, steps, torch.float64) for _, build, kw, steps, _, _ in _cases()]


def test_every_norm_in_real_gloo_processes_matches_reference():
    per_rank = spawn(2, _all_norms, 2, timeout=180)
    for i, (name, *_, reference, rtol) in enumerate(_cases()):
        out = gather([r[i] for r in per_rank])
        assert_parity(out, reference(), atol=1e-10, rtol=rtol)
        collectives = out["counts"][0][0][0]
        assert (collectives == {}) if name == "EvoNormS0" else (collectives.get("all_reduce", 0) >= 1), name
