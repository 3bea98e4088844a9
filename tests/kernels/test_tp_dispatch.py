"""One dispatcher: every norm resolves its backend once per call, and the old launcher names still route there.

The tensor-parallel modules, ``distnorm.functional.layer_norm`` and ``distnorm.kernels`` share the
autograd Functions of ``distnorm.kernels.autograd``, which resolve the backend in the forward and
reuse it in the backward. ``backend="triton"`` (the interpreter here) and ``"torch"`` agree piece
by piece.
"""

import pytest
import torch
import torch.distributed as dist

from distnorm import kernels
from distnorm.functional import layer_norm as F
from distnorm.tensor_parallel import (
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    ShardedLayerNorm,
    ShardedRMSNorm,
)
from distnorm.testing import simulate

T, H = 6, 37


def _inputs(kernel_device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(kernel_device)
    dy = torch.randn(T, H, generator=g).to(kernel_device)
    w = torch.randn(H, generator=g).to(kernel_device)
    b = torch.randn(H, generator=g).to(kernel_device)
    return x, dy, w, b


@pytest.mark.parametrize("rms", [False, True])
def test_forced_triton_equals_torch(kernel_device, rms):
    """The launchers under their ``distnorm.functional.layer_norm`` names, on both backends."""
    x, dy, w, b = _inputs(kernel_device)
    bias = None if rms else b
    kw = {"zero_centered_gamma": True, "output_scale": 0.5}
    outs = {}
    for backend in ("torch", "triton"):
        if rms:
            y, rstd = F.rms_norm_fwd(x, w, 1e-6, backend=backend, **kw)
            dx, dw = F.rms_norm_bwd(dy, x, w, rstd, backend=backend, **kw)
            db, mean = None, None
        else:
            y, mean, rstd = F.layer_norm_fwd(x, w, bias, 1e-5, backend=backend, **kw)
            dx, dw, db = F.layer_norm_bwd(dy, x, w, mean, rstd, backend=backend, **kw)
        stats = F.norm_partial_stats(x, rms=rms, backend=backend)
        y2 = F.norm_fwd_with_stats(x, mean, rstd, w, bias, backend=backend, **kw)
        sums, dw2, db2 = F.norm_bwd_partial(dy, x, w, mean, rstd, has_bias=not rms, backend=backend, **kw)
        dx2 = F.norm_bwd_finish(dy, x, w, mean, rstd, sums, H, backend=backend, **kw)
        outs[backend] = [t for t in (y, dx, dw, db, stats, y2, sums, dw2, db2, dx2) if t is not None]
    for a, c in zip(outs["torch"], outs["triton"]):
        assert a.dtype == c.dtype and a.shape == c.shape
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def _count_resolutions(monkeypatch):
    calls = []
    real = kernels.resolve_backend

    def spy(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("backend", "auto"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "resolve_backend", spy)
    return calls


@pytest.mark.parametrize("cls", [SequenceParallelLayerNorm, SequenceParallelRMSNorm, ShardedLayerNorm, ShardedRMSNorm])
def test_backend_resolved_once_per_call(cls, monkeypatch):
    calls = _count_resolutions(monkeypatch)
    x = torch.randn(4, 8, requires_grad=True)
    cls(8)(x).sum().backward()
    assert calls == ["auto"], calls  # forward resolves, backward reuses; nobody re-dispatches


def _sharded_rank(rank, world):
    x = torch.randn(4, 4, requires_grad=True)
    ShardedRMSNorm(8, group=dist.group.WORLD)(x).sum().backward()


def test_sharded_backend_resolved_once_per_call(monkeypatch):
    calls = _count_resolutions(monkeypatch)
    simulate(2, _sharded_rank, 2, timeout=60)
    assert calls == ["auto", "auto"], calls  # one per rank
