"""The sharded-statistics pieces composed over a split hidden dim equal the unsharded norm.

A hidden-sharded norm is: partial-stats kernel -> one all-reduce (the caller's) -> finish kernel, in
each direction. Here the all-reduce is a plain sum over the shards (worlds 1-4, uneven splits from
``shard_sizes``), and once for real in ``simulate`` through ``distnorm.comm`` with its count pinned.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distnorm import comm
from distnorm import kernels as K
from distnorm.comm import count_collectives, shard_sizes
from distnorm.functional.reference import layer_norm_ref, rms_norm_ref
from distnorm.testing import assert_close_to_reference, simulate, split_for_world

EPS = 1e-5


def _reduce_fwd_stats(partials, sizes, rms):
    """Merge per-shard stats exactly as a caller's one float64 all-reduce would.

    RMSNorm: Σx² summed. LayerNorm: each shard contributes [n·mean, M2 + n·mean²] (= Σx, Σx²
    rebuilt from centred pieces) in float64, so |mean|/std of 1e3 loses nothing.
    """
    n_total = sum(sizes)
    if rms:
        total = sum(p[:, 0].double() for p in partials)
        return None, torch.rsqrt(total / n_total + EPS).float()
    packed = sum(torch.stack([n * p[:, 0].double(), p[:, 1].double() + n * p[:, 0].double() ** 2], -1)
                 for p, n in zip(partials, sizes))
    mean = packed[:, 0] / n_total
    var = (packed[:, 1] - n_total * mean**2) / n_total
    return mean.float(), torch.rsqrt(var + EPS).float()


def _sharded_norm(x, w, b, dy, world, rms, zcg, scale, backend):
    """y, dx, dw, db of the hidden-sharded norm, each shard through the partial/finish pieces."""
    h = x.shape[-1]
    sizes = shard_sizes(h, world)
    xs, dys = split_for_world(x, world, dim=1), split_for_world(dy, world, dim=1)
    ws = [None] * world if w is None else split_for_world(w, world, dim=0)
    bs = [None] * world if b is None else split_for_world(b, world, dim=0)
    partials = [K.norm_partial_stats(xr, rms=rms, backend=backend) for xr in xs]
    assert all(p.dtype == torch.float32 and p.shape == (x.shape[0], 1 if rms else 2) for p in partials)
    mean, rstd = _reduce_fwd_stats(partials, sizes, rms)
    ys = [K.norm_fwd_with_stats(xr, mean, rstd, wr, br, zero_centered_gamma=zcg, output_scale=scale, backend=backend)
          for xr, wr, br in zip(xs, ws, bs)]
    bwd = [K.norm_bwd_partial(dyr, xr, wr, mean, rstd, zero_centered_gamma=zcg, output_scale=scale,
                              has_bias=br is not None, backend=backend)
           for dyr, xr, wr, br in zip(dys, xs, ws, bs)]
    sums = sum(s for s, _, _ in bwd)  # the caller's one all-reduce
    dxs = [K.norm_bwd_finish(dyr, xr, wr, mean, rstd, sums, h, zero_centered_gamma=zcg, output_scale=scale,
                             backend=backend) for dyr, xr, wr in zip(dys, xs, ws)]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=-1)  # noqa: E731
    return cat(ys), cat(dxs), cat([d for _, d, _ in bwd]), cat([d for _, _, d in bwd])


def _reference(x, w, b, dy, rms, zcg, scale):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    if rms:
        y = rms_norm_ref(leaves[0], leaves[1], EPS, zero_centered_gamma=zcg, output_scale=scale)
    else:
        y = layer_norm_ref(*leaves, EPS, zero_centered_gamma=zcg, output_scale=scale)
    y.backward(dy.double())
    return y.detach(), *(None if t is None else t.grad for t in leaves)


def _baseline(x, w, b, dy, rms, zcg, scale):
    """Plain torch in x's dtype."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    w_eff = None if leaves[1] is None else (leaves[1] + 1 if zcg else leaves[1])
    h = (x.shape[-1],)
    y = (F.rms_norm(leaves[0], h, w_eff, EPS) if rms else F.layer_norm(leaves[0], h, w_eff, leaves[2], EPS)) * scale
    y.backward(dy)
    return y.detach(), *(None if t is None else t.grad for t in leaves)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [(True, True, False, 1.0), (True, True, True, 0.5), (False, False, False, 1.0)])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_pieces_compose_to_the_unsharded_norm(world, rms, affine, dtype, backend, kernel_device):
    has_w, has_b, zcg, scale = affine
    has_b = has_b and not rms
    g = torch.Generator().manual_seed(world)
    tokens, hidden = 9, 127  # 127 over 2/3/4 ranks: uneven shards
    x = (torch.randn(tokens, hidden, generator=g) * 3 + 1).to(kernel_device, dtype)
    dy = torch.randn(tokens, hidden, generator=g).to(kernel_device, dtype)
    w = (torch.randn(hidden, generator=g) * 0.2 + (0 if zcg else 1)).to(kernel_device, dtype) if has_w else None
    b = (torch.randn(hidden, generator=g) * 0.1).to(kernel_device, dtype) if has_b else None
    out = _sharded_norm(x, w, b, dy, world, rms, zcg, scale, backend)
    ref = _reference(x, w, b, dy, rms, zcg, scale)
    base = _baseline(x, w, b, dy, rms, zcg, scale)
    for name, a, r, bl in zip(["y", "dx", "dw", "db"], out, ref, base):
        if r is None:
            assert a is None, name
            continue
        # dW/dB leave the launchers in float32 (they are summed over ranks before the one cast)
        assert a.dtype == (torch.float32 if name in ("dw", "db") else dtype), name
        assert_close_to_reference(a, r, baseline=bl, name=name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sharded_layer_norm_stats_survive_a_large_mean(backend, kernel_device):
    """|mean| / std = 1e4 in float32: the centred per-shard M2 keeps the variance accurate."""
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(5, 127, generator=g)).to(kernel_device)
    dy = torch.randn(5, 127, generator=g).to(kernel_device)
    y, dx, _, _ = _sharded_norm(x, None, None, dy, 3, False, False, 1.0, backend)
    y_ref, dx_ref, _, _ = _reference(x, None, None, dy, False, False, 1.0)
    y_base, dx_base, _, _ = _baseline(x, None, None, dy, False, False, 1.0)
    assert_close_to_reference(y, y_ref, baseline=y_base, name="y")
    assert_close_to_reference(dx, dx_ref, baseline=dx_base, name="dx")


def _sharded_rms_rank(rank, world, x, w, dy):
    """One rank of a hidden-sharded RMSNorm built from the pieces and distnorm.comm (fwd + bwd)."""
    group = dist.group.WORLD if world > 1 else None
    h = x.shape[-1]
    x_shard = split_for_world(x, world, dim=1)[rank]
    w_shard = split_for_world(w, world, dim=0)[rank]
    dy_shard = split_for_world(dy, world, dim=1)[rank]
    with count_collectives() as counts:
        sumsq = K.norm_partial_stats(x_shard, rms=True, backend="triton")
        comm.all_reduce_(sumsq, group)
        rstd = torch.rsqrt(sumsq[:, 0] / h + EPS)
        y = K.norm_fwd_with_stats(x_shard, None, rstd, w_shard, None, backend="triton")
        sums, dw, _ = K.norm_bwd_partial(dy_shard, x_shard, w_shard, None, rstd, backend="triton")
        comm.all_reduce_(sums, group)
        dx = K.norm_bwd_finish(dy_shard, x_shard, w_shard, None, rstd, sums, h, backend="triton")
    return y, dx, dw, counts


@pytest.mark.parametrize("world", [1, 3])
def test_sharded_rms_norm_one_all_reduce_per_direction(world, kernel_device):
    if kernel_device.type != "cpu":
        pytest.skip("the threaded process group runs on CPU tensors")
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    w = torch.randn(10, generator=g)
    outs = simulate(world, _sharded_rms_rank, world, x, w, dy, timeout=60)
    y, dx, dw = (torch.cat([o[i] for o in outs], dim=-1) for i in range(3))
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y_ref = rms_norm_ref(xr, wr, EPS)
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(dx.double(), xr.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(dw.double(), wr.grad, rtol=0, atol=1e-5)
    for o in outs:
        if world == 1:
            assert o[3].counts == {}
        else:  # fwd Σx² + bwd Σg·x̂: 4 bytes per token each
            assert o[3].counts == {"all_reduce": 2}
            assert o[3].bytes["all_reduce"] == 2 * 6 * 4
