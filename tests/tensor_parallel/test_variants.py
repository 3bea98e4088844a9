"""SingleScaleRMSNorm and CRMSNorm in both parallel forms vs float64 references, worlds 1-4."""

import math

import pytest
import torch
import torch.distributed as dist

from distnorm.comm import count_collectives
from distnorm.functional.reference import rms_norm_ref
from distnorm.tensor_parallel import (
    CRMSNorm,
    SequenceParallelRMSNorm,
    SingleScaleRMSNorm,
    layer_norm_scaling,
    sync_sequence_parallel_grads,
)
from distnorm.testing import assert_close_to_reference, simulate, split_for_world

TOKENS, HIDDEN = 7, 10


def _single_scale(x, alpha, eps, scale):
    return rms_norm_ref(x, None, eps) * alpha.double() * scale if x.dtype == torch.float64 else \
        torch.nn.functional.rms_norm(x, (x.shape[-1],), None, eps) * alpha * scale


def _crms(x, w, eps, scale):
    d = x.shape[-1] + 1
    ms = (x.square().sum(-1, keepdim=True) + x.sum(-1, keepdim=True).square()) / d
    return x * torch.rsqrt(ms + eps) * w * scale


def _run_ref(fn, x, w, dy, eps, scale):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, eps, scale)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def _rank(rank, world, kind, parallel, grad_sync, x, dy, w, scale):
    group = dist.group.WORLD if world > 1 else None
    dim = 0 if parallel == "sequence" else -1
    cls = SingleScaleRMSNorm if kind == "single" else CRMSNorm
    mod = cls(HIDDEN, parallel=parallel, grad_sync=grad_sync, group=group, output_scale=scale, dtype=x.dtype)
    with torch.no_grad():
        mod.weight.copy_(w if kind == "single" or parallel == "sequence" else split_for_world(w, world, -1)[rank])
    xs = split_for_world(x, world, dim)[rank].requires_grad_()
    with count_collectives() as c:
        y = mod(xs)
        y.backward(split_for_world(dy, world, dim)[rank])
    with count_collectives() as c_sync:
        sync_sequence_parallel_grads(mod)
    return y.detach(), xs.grad, mod.weight.grad, c, c_sync


@pytest.mark.parametrize("kind", ["single", "crms"])
@pytest.mark.parametrize("parallel,grad_sync", [("sequence", "backward"), ("sequence", "deferred"),
                                                ("sharded", "backward"), ("sharded", "deferred")])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_reference(world, parallel, grad_sync, kind):
    g = torch.Generator().manual_seed(world)
    scale = layer_norm_scaling(4)
    dim = 0 if parallel == "sequence" else -1
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = (torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        dy = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
        w = (torch.full((1,), 1.3, dtype=torch.float64) if kind == "single"
             else 1 + 0.3 * torch.randn(HIDDEN, generator=g, dtype=torch.float64)).to(dtype)
        ref_fn = _single_scale if kind == "single" else _crms
        ref = _run_ref(ref_fn, x.double(), w.double(), dy.double(), 1e-6, scale)
        base = _run_ref(ref_fn, x, w, dy, 1e-6, scale)
        outs = simulate(world, _rank, world, kind, parallel, grad_sync, x, dy, w, scale, timeout=60)
        y = torch.cat([o[0] for o in outs], dim)
        dx = torch.cat([o[1] for o in outs], dim)
        dws = [o[2] for o in outs] if kind == "single" or parallel == "sequence" else [torch.cat([o[2] for o in outs])]
        for name, a, r, b in [("y", y, ref[0], base[0]), ("dx", dx, ref[1], base[1])] + [
                ("dw", dw, ref[2], base[2]) for dw in dws]:
            assert a.dtype == dtype
            if dtype == torch.float64:
                assert_close_to_reference(a, r, atol=1e-10, name=name)
            else:
                ulp = torch.finfo(dtype).eps * float(r.abs().max())
                assert_close_to_reference(a, r, baseline=b, atol=ulp, name=f"{name} {dtype}")
        wide = 8 if dtype == torch.float64 else 4
        tokens = TOKENS if parallel == "sharded" else None
        for o in outs:
            c, c_sync = o[3], o[4]
            if world == 1:
                assert c.counts == {} and c_sync.counts == {}
                continue
            replicated_w = kind == "single" or parallel == "sequence"
            # replicated gains' gradients travel in float32 (float64 for float64), cast once after the sum
            w_bytes = (1 if kind == "single" else HIDDEN) * wide
            synced_w = replicated_w and grad_sync == "backward"
            n_stats = 2 if tokens else 0
            n_w = 1 if synced_w and not tokens else 0  # sharded: α's 1 number rides in the backward's stats all-reduce
            assert c.counts == ({"all_reduce": n_w + n_stats} if n_w + n_stats else {})
            if tokens:
                stats = TOKENS * wide * (1 if kind == "single" else 2) + TOKENS * wide
                assert c.bytes["all_reduce"] == stats + (w_bytes if synced_w else 0)
            else:
                assert c.bytes.get("all_reduce", 0) == n_w * w_bytes
            deferred = replicated_w and grad_sync == "deferred"
            assert c_sync.counts == ({"all_reduce": 1} if deferred else {})


def test_layer_norm_scaling_and_srmsnorm():
    assert layer_norm_scaling(1) == 1.0 and math.isclose(layer_norm_scaling(16), 0.25)
    with pytest.raises(ValueError, match=r"layer_index must be an int >= 1 \(1-based\), got 0"):
        layer_norm_scaling(0)
    srms = SequenceParallelRMSNorm(HIDDEN, elementwise_affine=False, output_scale=layer_norm_scaling(9))
    assert srms.weight is None and not list(srms.parameters())
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    assert_close_to_reference(srms(x), rms_norm_ref(x, None, 1e-6) / 3, atol=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"parallel must be one of \('sequence', 'sharded'\), got 'rows' \(rank 0 of 1\)"):
        CRMSNorm(4, parallel="rows")
    with pytest.raises(ValueError, match=r"x last dim must be the local hidden size = 4, got shape \(2, 5\)"):
        SingleScaleRMSNorm(4)(torch.randn(2, 5))
