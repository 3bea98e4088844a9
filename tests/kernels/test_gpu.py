"""The compiled kernels on a GPU at large shapes, every dtype, vs the float64 references.

Run on a CUDA machine with the interpreter off:
``TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_gpu.py``. Skipped without CUDA or
under the interpreter (which would run these shapes on the host for minutes).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from distnorm import kernels as K
from distnorm.functional.reference import layer_norm_ref, rms_norm_ref
from distnorm.testing import assert_close_to_reference

from .conftest import interpreted

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(interpreted(), reason="needs compiled kernels: run with TRITON_INTERPRET=0"),
]

SHAPES = [(4096, 4096), (2048, 8192), (1000, 5120), (257, 12345)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _grads(y, dy, leaves):
    y.backward(dy)
    return [None if t is None else t.grad for t in leaves]


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_large_shapes_match_reference(op, tokens, hidden, dtype):
    if dtype == torch.float32 and hidden * 4 > 65536:
        pytest.skip("row over the kernels' 64 KiB limit")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype) * 2 + 0.5
    dy = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    w = (torch.randn(hidden, device="cuda", generator=g) * 0.2 + 1).to(dtype)
    b = (torch.randn(hidden, device="cuda", generator=g) * 0.1).to(dtype) if op == "layer_norm" else None
    if op == "layer_norm":
        run = lambda x, w, b: K.layer_norm(x, w, b, 1e-5, backend="triton")  # noqa: E731
        ref = lambda x, w, b: layer_norm_ref(x, w, b, 1e-5)  # noqa: E731
        base = lambda x, w, b: F.layer_norm(x, (hidden,), w, b, 1e-5)  # noqa: E731
    else:
        run = lambda x, w, b: K.rms_norm(x, w, 1e-5, backend="triton")  # noqa: E731
        ref = lambda x, w, b: rms_norm_ref(x, w, 1e-5)  # noqa: E731
        base = lambda x, w, b: F.rms_norm(x, (hidden,), w, 1e-5)  # noqa: E731
    lk, lr, lb = _leaves(x, w, b), _leaves(x, w, b, dtype=torch.float64), _leaves(x, w, b)
    yk, yr, yb = run(*lk), ref(*lr), base(*lb)
    assert_close_to_reference(yk, yr, baseline=yb, name="y")
    for name, a, r, bl in zip(["dx", "dw", "db"], _grads(yk, dy, lk), _grads(yr, dy.double(), lr), _grads(yb, dy, lb)):
        if r is not None:
            assert_close_to_reference(a, r, baseline=bl, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_large(dtype):
    x = torch.randn(4096, 4096, device="cuda").to(dtype)
    residual = torch.randn(4096, 4096, device="cuda").to(dtype)
    w = (torch.randn(4096, device="cuda") * 0.2 + 1).to(dtype)
    y, res = K.add_rms_norm(x, residual, w, 1e-6, backend="triton")
    s = x + residual
    assert torch.equal(res, s)
    assert_close_to_reference(y, rms_norm_ref(s, w, 1e-6), baseline=F.rms_norm(s, (4096,), w, 1e-6))


def test_backward_bitwise_reproducible_large():
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    _, rstd = K.rms_norm_fwd(x, w, 1e-6, backend="triton")
    first = K.rms_norm_bwd(dy, x, w, rstd, backend="triton")
    second = K.rms_norm_bwd(dy, x, w, rstd, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_auto_picks_triton_on_cuda():
    assert K.resolve_backend(torch.randn(2, 8, device="cuda")) == "triton"
    assert K.resolve_backend(torch.randn(2, 8, device="cuda", dtype=torch.float64)) == "torch"
