"""The local-math contract the Triton kernels implement: whole-row fwd/bwd and the sharded pieces."""

import pytest
import torch

from distnorm.functional.layer_norm import (
    layer_norm_bwd,
    layer_norm_fwd,
    norm_bwd_finish,
    norm_bwd_partial,
    norm_fwd_with_stats,
    norm_partial_stats,
    rms_norm_bwd,
    rms_norm_fwd,
)
from distnorm.functional.reference import layer_norm_ref, rms_norm_ref
from distnorm.testing import assert_close_to_reference, split_for_world


@pytest.mark.parametrize("zero_centered_gamma,output_scale", [(False, 1.0), (True, 0.5)])
@pytest.mark.parametrize("rms", [False, True])
def test_whole_row_fwd_bwd_match_reference(rms, zero_centered_gamma, output_scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 13, generator=g, dtype=torch.float64) + 3.0
    dy = torch.randn(6, 13, generator=g, dtype=torch.float64)
    w = torch.randn(13, generator=g, dtype=torch.float64).requires_grad_()
    b = None if rms else torch.randn(13, generator=g, dtype=torch.float64).requires_grad_()
    kw = {"zero_centered_gamma": zero_centered_gamma, "output_scale": output_scale}
    xr = x.clone().requires_grad_()
    ref = rms_norm_ref(xr, w, 1e-6, **kw) if rms else layer_norm_ref(xr, w, b, 1e-5, **kw)
    ref.backward(dy)
    if rms:
        y, rstd = rms_norm_fwd(x, w.detach(), 1e-6, **kw)
        dx, dw = rms_norm_bwd(dy, x, w.detach(), rstd, **kw)
        db = None
    else:
        y, mean, rstd = layer_norm_fwd(x, w.detach(), b.detach(), 1e-5, **kw)
        dx, dw, db = layer_norm_bwd(dy, x, w.detach(), mean, rstd, **kw)
        assert mean.shape == rstd.shape == (6,) and mean.dtype == torch.float64
    for name, a, r in [("y", y, ref.detach()), ("dx", dx, xr.grad), ("dw", dw, w.grad)] + (
            [] if rms else [("db", db, b.grad)]):
        assert_close_to_reference(a, r, atol=1e-12, name=name)


@pytest.mark.parametrize("rms", [False, True])
def test_sharded_pieces_compose_to_whole_rows(rms):
    """Summing the partial stats / sums of column shards (what the all-reduces do) gives whole-row results."""
    x = torch.randn(5, 10, dtype=torch.float64) * 2 + 7
    dy, w = torch.randn(5, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    xs, dys, ws = (split_for_world(t, 3, -1) for t in (x, dy, w))
    parts = [norm_partial_stats(p, rms=rms) for p in xs]
    assert all(p.shape == (5, 1 if rms else 2) for p in parts)
    if rms:
        rstd, mean = torch.rsqrt(sum(parts)[:, 0] / 10 + 1e-6), None
        y_ref, rstd_ref = rms_norm_fwd(x, w, 1e-6)
    else:
        s1 = sum(p[:, 0] * q.shape[-1] for p, q in zip(parts, xs, strict=True))
        s2 = sum(p[:, 1] + q.shape[-1] * p[:, 0] ** 2 for p, q in zip(parts, xs, strict=True))
        mean = s1 / 10
        rstd = torch.rsqrt(s2 / 10 - mean**2 + 1e-5)
        y_ref, _, rstd_ref = layer_norm_fwd(x, w, None, 1e-5)
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-12, atol=0)
    y = torch.cat([norm_fwd_with_stats(p, mean, rstd, q, None) for p, q in zip(xs, ws, strict=True)], -1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    partial = [norm_bwd_partial(d, p, q, mean, rstd) for d, p, q in zip(dys, xs, ws, strict=True)]
    sums = sum(s for s, _, _ in partial)
    dx = torch.cat([norm_bwd_finish(d, p, q, mean, rstd, sums, 10) for d, p, q in zip(dys, xs, ws, strict=True)], -1)
    dx_ref = (rms_norm_bwd(dy, x, w, rstd)[0] if rms else
              layer_norm_bwd(dy, x, w, mean, rstd, has_bias=False)[0])
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-12)


def test_lower_layers_do_not_import_higher_ones():
    """comm <- kernels <- functional.layer_norm <- tensor_parallel: importing a layer loads none above it."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, distnorm.kernels; "
        "assert not any(m in sys.modules for m in ('distnorm.functional.layer_norm', 'distnorm.tensor_parallel', "
        "'distnorm.overlap', 'triton')), sorted(m for m in sys.modules if m.startswith('distnorm'));"
        "import distnorm.functional.layer_norm; "
        "assert 'distnorm.tensor_parallel' not in sys.modules and 'distnorm.overlap' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})


HIDDEN = 10  # over 3 ranks 4, 3, 3 columns


def _wrong_parameter_errors(rank, world):
    """Every wrong weight / bias shape fed to layer_norm / rms_norm on this rank: the error message
    (or None where nothing was raised), keyed by (function, argument, shape)."""
    import torch.distributed as dist

    from distnorm.comm import shard_sizes
    from distnorm.functional.layer_norm import layer_norm, rms_norm

    group = dist.group.WORLD if world > 1 else None
    local = shard_sizes(HIDDEN, world)[rank]
    x = torch.randn(3, local, generator=torch.Generator().manual_seed(rank))
    good = torch.ones(local)
    calls = {"layer_norm.weight": lambda p: layer_norm(x, p, good, group=group, hidden=HIDDEN),
             "layer_norm.bias": lambda p: layer_norm(x, good, p, group=group, hidden=HIDDEN),
             "rms_norm.weight": lambda p: rms_norm(x, p, group=group, hidden=HIDDEN)}
    shapes = {(1,), (), (local + 1,), (1, local), (HIDDEN,)} - {(local,)}
    out = {}
    for name, call in calls.items():
        assert call(good).shape == x.shape  # the right shape still runs
        for shape in shapes:
            try:
                call(torch.full(shape, 1.5))
                out[name, shape] = None
            except (ValueError, RuntimeError) as exc:
                out[name, shape] = str(exc)
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_wrong_shape_weight_or_bias_is_refused_as_torch_refuses_it(world):
    """A weight or bias of any shape but this rank's ``[H_local]`` -- a broadcastable ``[1]`` or 0-d
    one, the full ``[H]`` on a sharded rank, ``[1, H_local]`` -- is a ValueError naming the
    function, the argument, the expectation, the shape and the rank (torch's F.layer_norm raises on
    a ``[1]`` weight; broadcasting it would be a silently wrong answer)."""
    import re

    from distnorm.comm import shard_sizes
    from distnorm.testing import simulate

    with pytest.raises(RuntimeError):
        torch.nn.functional.layer_norm(torch.randn(3, HIDDEN), (HIDDEN,), torch.ones(1))
    for rank, errors in enumerate(simulate(world, _wrong_parameter_errors, world, timeout=60)):
        local = shard_sizes(HIDDEN, world)[rank]
        for (name, shape), msg in errors.items():
            fn, arg = name.split(".")
            want = (rf"^{fn}: {arg} must have shape \({local},\) \(.*\), got {re.escape(str(shape))} "
                    rf"\(rank {rank} of {world}\)$")
            assert msg is not None and re.search(want, msg), f"{name} of shape {shape}, rank {rank}: {msg}"
