"""Numerics of the synced statistics: exact from the first step, and the precision contract.

* A FRESH module (running mean 0) on float32 data with std 1 and |mean| up to 1e4, worlds 1-4 with
  uneven batches and an empty rank: output, input gradient and weight gradient within 2x the error
  of torch's own float32 batch norm on the concatenated batch (against float64).
* bf16/fp16 modules and inputs, worlds 1-4: statistics in float32, outputs in the input dtype,
  parameter gradients in the parameter dtype, each within 2x the error of torch's same-dtype op
  (or of rounding the float64 result once, where torch has no such op).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distnorm.data_parallel import (
    AlphaBatchNorm,
    EvoNormB0,
    PowerNorm,
    RepBatchNorm,
    SyncBatchNorm,
    alpha_batch_norm_ref,
)
from distnorm.functional.evo_norm import evo_norm_b0_ref
from distnorm.functional.power_norm import power_norm_ref
from distnorm.functional.reference import batch_norm_ref
from distnorm.testing import assert_close_to_reference, simulate, spawn, split_for_world
from tests.data_parallel._parity import sizes_with_empty_rank

C = 6


def _split(t, world):
    return split_for_world(t, world, sizes=sizes_with_empty_rank(t.shape[0], world))


def _group(world):
    return dist.group.WORLD if world > 1 else None


# --------------------------------------------------------------------------------------------
# Large |mean| / std from the first step
# --------------------------------------------------------------------------------------------

LAYOUTS = {"nchw": ((12, C, 4, 4), 1), "btc": ((12, 16, C), -1)}


def _problem(layout, mean, seed=0):
    shape, _ = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = (mean + torch.randn(shape, generator=g, dtype=torch.float64)).float()
    dy = torch.randn(shape, generator=g)
    w = 1 + 0.5 * torch.rand(C, generator=g)
    return x, dy, w


def _fresh_rank(rank, world, name, layout, x, dy, w):
    c_dim = LAYOUTS[layout][1]
    if name == "SyncBatchNorm":
        norm = SyncBatchNorm(C, group=_group(world), channel_dim=c_dim)
    elif name == "RepBatchNorm":
        norm = RepBatchNorm(C, group=_group(world), channel_dim=c_dim)
    else:  # AlphaBatchNorm in eval: the test batch's statistics mixed with the running ones
        norm = AlphaBatchNorm(C, alpha=0.5, group=_group(world), channel_dim=c_dim).eval()
    with torch.no_grad():
        norm.weight.copy_(w)
    xs = _split(x, world)[rank].clone().requires_grad_()
    y = norm(xs)
    y.backward(_split(dy, world)[rank])
    return y.detach(), xs.grad, norm.weight.grad


def _torch_fp32(name, layout, x, dy, w):
    """The same step by plain torch in float32 on the whole batch (nn.BatchNorm; [B, T, C] transposed)."""
    c_dim = LAYOUTS[layout][1]
    xt = x.clone().requires_grad_()
    x_c = xt if c_dim == 1 else xt.transpose(1, 2)
    wt = w.clone().requires_grad_()
    if name == "AlphaBatchNorm":  # running mean 0, running var 1, alpha 0.5
        dims = [0, 2, 3] if c_dim == 1 else [0, 2]
        var_b, mean_b = torch.var_mean(x_c, dims, correction=0, keepdim=True)
        shape = [1, C] + [1] * (x_c.dim() - 2)
        y_c = (x_c - 0.5 * mean_b) * torch.rsqrt(0.5 + 0.5 * var_b + 1e-5) * wt.view(shape)
    else:
        y_c = nn.functional.batch_norm(x_c, None, None, wt, None, True)
    y = y_c if c_dim == 1 else y_c.transpose(1, 2)
    if name == "RepBatchNorm":
        y = y + xt
    y.backward(dy)
    return y.detach(), xt.grad, wt.grad


def _float64(name, layout, x, dy, w):
    c_dim = LAYOUTS[layout][1]
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    if name == "AlphaBatchNorm":
        y = alpha_batch_norm_ref(x64, torch.zeros(C), torch.ones(C), w64, alpha=0.5, channel_dim=c_dim)
    else:
        y = batch_norm_ref(x64, None, None, w64, channel_dim=c_dim)[0]
        if name == "RepBatchNorm":
            y = y + x64
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad


@pytest.mark.parametrize("name,layout", [("SyncBatchNorm", "nchw"), ("SyncBatchNorm", "btc"), ("RepBatchNorm", "btc"),
                                         ("AlphaBatchNorm", "btc")])
@pytest.mark.parametrize("mean", [1e2, 1e4])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fresh_module_large_mean_within_twice_torch_error(world, name, layout, mean):
    x, dy, w = _problem(layout, mean)
    outs = simulate(world, _fresh_rank, world, name, layout, x, dy, w, timeout=60)
    y, dx, dw = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), sum(o[2] for o in outs)
    ref, base = _float64(name, layout, x, dy, w), _torch_fp32(name, layout, x, dy, w)
    for got, r, b, what in zip((y, dx, dw), ref, base, ("y", "dx", "dweight")):
        assert_close_to_reference(got, r, baseline=b, atol=1e-6, name=f"{name} {layout} world {world} {what}")


def _fresh_spawn_rank(rank, world, x, dy, w):
    return _fresh_rank(rank, world, "SyncBatchNorm", "btc", x, dy, w)


def test_fresh_module_large_mean_in_real_processes():
    x, dy, w = _problem("btc", 1e4, seed=1)
    outs = spawn(3, _fresh_spawn_rank, 3, x, dy, w, timeout=120)
    ref, base = _float64("SyncBatchNorm", "btc", x, dy, w), _torch_fp32("SyncBatchNorm", "btc", x, dy, w)
    got = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), sum(o[2] for o in outs)
    for g, r, b in zip(got, ref, base):
        assert_close_to_reference(g, r, baseline=b, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Precision contract: half-precision parameters and inputs
# --------------------------------------------------------------------------------------------

HALF = [torch.bfloat16, torch.float16]


def _half_sbn_rank(rank, world, x, dy, params, dtype):
    norm = SyncBatchNorm(C, group=_group(world), dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(params[0])
        norm.bias.copy_(params[1])
    xs = _split(x, world)[rank].clone().requires_grad_()
    y = norm(xs)
    y.backward(_split(dy, world)[rank])
    return y.detach(), xs.grad, norm.weight.grad, norm.bias.grad, norm.running_mean.clone(), norm.running_var.clone()


def _half_problem(dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = (3 + 2 * torch.randn(10, C, 3, 3, generator=g)).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    params = ((1 + 0.5 * torch.randn(C, generator=g)).to(dtype), (0.5 * torch.randn(C, generator=g)).to(dtype))
    return x, dy, params


def _bn_shares(x, dy, params, world):
    """Float64 reference: y, dx, and each rank's share of dweight/dbias (its rows' sums)."""
    x64 = x.double().requires_grad_()
    y, rm, rv = batch_norm_ref(x64, torch.zeros(C), torch.ones(C), params[0], params[1])
    y.backward(dy.double())
    x_hat = ((y - params[1].double().view(1, C, 1, 1)) / params[0].double().view(1, C, 1, 1)).detach()
    shares = [((d * h).sum((0, 2, 3)), d.sum((0, 2, 3))) for d, h in zip(_split(dy.double(), world), _split(x_hat, world))]
    return y.detach(), x64.grad, shares, rm.detach(), rv.detach()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sync_batch_norm_half_precision_contract(world, dtype):
    x, dy, params = _half_problem(dtype)
    outs = simulate(world, _half_sbn_rank, world, x, dy, params, dtype, timeout=60)
    y_ref, dx_ref, shares, rm_ref, rv_ref = _bn_shares(x, dy, params, world)
    torch_bn = nn.BatchNorm2d(C, dtype=dtype)  # torch's same-dtype op on the concatenated batch
    with torch.no_grad():
        torch_bn.weight.copy_(params[0])
        torch_bn.bias.copy_(params[1])
    xt = x.clone().requires_grad_()
    yt = torch_bn(xt)
    yt.backward(dy)
    y, dx = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    assert y.dtype == dx.dtype == dtype
    assert_close_to_reference(y, y_ref, baseline=yt.detach(), name="y")
    assert_close_to_reference(dx, dx_ref, baseline=xt.grad, name="dx")
    for rank, (o, (dw_ref, db_ref)) in enumerate(zip(outs, shares)):
        assert o[2].dtype == o[3].dtype == dtype
        # world 1 is torch's own kernel; the synced path sums in float32 and rounds once
        dw_base, db_base = (torch_bn.weight.grad, torch_bn.bias.grad) if world == 1 else (dw_ref.to(dtype), db_ref.to(dtype))
        assert_close_to_reference(o[2], dw_ref, baseline=dw_base, atol=1e-6, name=f"rank {rank} dweight")
        assert_close_to_reference(o[3], db_ref, baseline=db_base, atol=1e-6, name=f"rank {rank} dbias")
        assert o[4].dtype == dtype  # running statistics in the module dtype, as torch
        assert_close_to_reference(o[4], rm_ref, baseline=torch_bn.running_mean, atol=1e-6, name="running_mean")
        assert_close_to_reference(o[5], rv_ref, baseline=torch_bn.running_var, atol=1e-6, name="running_var")


def _half_literature_rank(rank, world, name, x, dy, dtype):
    kw = {"group": _group(world), "dtype": dtype}
    norm = {"RepBatchNorm": lambda: RepBatchNorm(C, channel_dim=1, **kw),
            "PowerNorm": lambda: PowerNorm(C, warmup_iters=0, channel_dim=1, **kw),
            "EvoNormB0": lambda: EvoNormB0(C, **kw)}[name]()
    xs = _split(x, world)[rank].clone().requires_grad_()
    y = norm(xs)
    y.backward(_split(dy, world)[rank])
    stats = [b.dtype for n, b in norm.named_buffers() if b.is_floating_point()]
    return y.detach(), xs.grad, {n: p.grad for n, p in norm.named_parameters()}, stats


def _literature_reference(name, x, dy):
    """Float64 step on the whole batch from the same (rounded) inputs and the modules' initial parameters."""
    x64 = x.double().requires_grad_()
    ones, zeros = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    if name == "PowerNorm":
        y, dx, dw, db, _ = power_norm_ref(x, dy, ones, zeros, {"running_phi": ones, "ema_gz": zeros, "step": torch.tensor(0)},
                                          channel_dim=1, warmup_iters=0)
        return y, dx, {"weight": dw, "bias": db}
    params = {"weight": ones.clone().requires_grad_(), "bias": zeros.clone().requires_grad_()}
    if name == "RepBatchNorm":
        alpha = torch.ones(1, dtype=torch.float64, requires_grad=True)
        y = batch_norm_ref(x64, None, None, params["weight"], params["bias"])[0] + alpha * x64
        params["alpha"] = alpha
    else:
        params["v"] = ones.clone().requires_grad_()
        y, _ = evo_norm_b0_ref(x64, params, {"running_var": ones, "num_batches_tracked": torch.tensor(0)})
    y.backward(dy.double())
    return y.detach(), x64.grad, {k: v.grad for k, v in params.items()}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["EvoNormB0", "PowerNorm", "RepBatchNorm"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_literature_norms_half_precision_contract(world, name, dtype):
    x, dy, _ = _half_problem(dtype, seed=3)
    outs = simulate(world, _half_literature_rank, world, name, x, dy, dtype, timeout=60)
    y_ref, dx_ref, grads_ref = _literature_reference(name, x, dy)
    y, dx = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    assert y.dtype == dx.dtype == dtype and all(s == torch.float32 for o in outs for s in o[3])
    assert_close_to_reference(y, y_ref, baseline=y_ref.to(dtype), atol=1e-6, name=f"{name} y")
    assert_close_to_reference(dx, dx_ref, baseline=dx_ref.to(dtype), atol=1e-6, name=f"{name} dx")
    for pname, g_ref in grads_ref.items():
        assert all(o[2][pname].dtype == dtype for o in outs)
        total = sum(o[2][pname].double() for o in outs)  # each rank's share cast once: world roundings
        assert_close_to_reference(total, g_ref, baseline=g_ref.to(dtype), factor=2.0 * world, atol=1e-6,
                                  name=f"{name} d{pname}")
