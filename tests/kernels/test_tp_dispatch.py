"""The tensor-parallel local math (distnorm.functional.layer_norm) routes to the Triton kernels.

``backend="auto"`` picks Triton only for CUDA tensors; forcing ``backend="triton"`` runs the kernels
(here under the interpreter) and must agree with the torch math, piece by piece and composed.
"""

import pytest
import torch

from distnorm.functional import layer_norm as F

T, H = 6, 37


def _inputs(kernel_device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(kernel_device)
    dy = torch.randn(T, H, generator=g).to(kernel_device)
    w = torch.randn(H, generator=g).to(kernel_device)
    b = torch.randn(H, generator=g).to(kernel_device)
    return x, dy, w, b


@pytest.mark.parametrize("rms", [False, True])
def test_forced_triton_equals_torch(kernel_device, rms, monkeypatch):
    from distnorm import kernels

    chosen = []
    real_resolve = kernels.resolve_backend

    def spy(*args, **kwargs):
        chosen.append(real_resolve(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(kernels, "resolve_backend", spy)
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
    assert chosen.count("triton") >= 12  # the dispatch layer and the kernels package both chose Triton
    for a, c in zip(outs["torch"], outs["triton"]):
        assert a.dtype == c.dtype and a.shape == c.shape
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_auto_stays_on_torch_for_cpu(monkeypatch):
    from distnorm import kernels

    def boom(*args, **kwargs):
        raise AssertionError("the kernels were consulted for a CPU tensor")

    monkeypatch.setattr(kernels, "resolve_backend", boom)
    x = torch.randn(3, 8)
    F.rms_norm_fwd(x, None, 1e-6)  # auto on CPU: never asks the kernels
    with pytest.raises(AssertionError, match="consulted"):
        F.rms_norm_fwd(x, None, 1e-6, backend="triton")
