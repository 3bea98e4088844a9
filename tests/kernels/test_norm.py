"""LayerNorm / RMSNorm / add+RMSNorm kernels (Triton under the interpreter, and the torch fallbacks)
vs the float64 references: outputs and every gradient, within 2x plain torch's own error."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from distnorm import kernels as K
from distnorm.functional.reference import add_rms_norm_ref, layer_norm_ref, rms_norm_ref
from distnorm.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tokens, hidden): hidden 10 / 127 pack many rows per program, 4097 is one row per program (and a
# non-power-of-two block); tokens give several backward programs, so dW partial rows are reduced.
SHAPES = [(37, 10), (37, 127), (5, 4097)]
# (has_weight, has_bias, zero_centered_gamma, output_scale)
AFFINE = [(True, True, False, 1.0), (True, True, True, 0.5), (False, False, False, 1.0)]
BACKENDS = ["triton", "torch"]
EPS = 1e-5


def _inputs(tokens, hidden, dtype, device, has_weight, has_bias, zero_centered_gamma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g) * 2 + 0.5
    dy = torch.randn(tokens, hidden, generator=g)
    w = (torch.randn(hidden, generator=g) * 0.3 + (0.0 if zero_centered_gamma else 1.0)) if has_weight else None
    b = torch.randn(hidden, generator=g) * 0.1 if has_bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(dy), cast(w), cast(b)


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()


def _w_eff(w, zero_centered_gamma):
    return None if w is None else (w + 1 if zero_centered_gamma else w)


def _run(fn, dy, *tensors):
    """Output and grads of ``fn(*leaves)`` for the given upstream gradient."""
    leaves = [_leaf(t) for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _check(name, actual, reference, baseline, grads, grads_ref, grads_base):
    assert_close_to_reference(actual, reference, baseline=baseline, name=f"{name} y")
    for i, (a, r, b) in enumerate(zip(grads, grads_ref, grads_base)):
        if r is None:
            assert a is None, f"{name}: grad {i} should be None"
            continue
        assert a.dtype == b.dtype, f"{name}: grad {i} dtype {a.dtype} != {b.dtype}"
        assert_close_to_reference(a, r, baseline=b, name=f"{name} grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_layer_norm_matches_reference(tokens, hidden, dtype, affine, backend, kernel_device):
    has_w, has_b, zcg, scale = affine
    x, dy, w, b = _inputs(tokens, hidden, dtype, kernel_device, has_w, has_b, zcg)
    y, grads = _run(lambda x, w, b: K.layer_norm(x, w, b, EPS, zero_centered_gamma=zcg, output_scale=scale,
                                                 backend=backend), dy, x, w, b)
    y_ref, grads_ref = _run(lambda x, w, b: layer_norm_ref(x, w, b, EPS, zero_centered_gamma=zcg, output_scale=scale),
                            dy.double(), *(None if t is None else t.double() for t in (x, w, b)))
    y_base, grads_base = _run(lambda x, w, b: F.layer_norm(x, (hidden,), _w_eff(w, zcg), b, EPS) * scale, dy, x, w, b)
    assert y.dtype == dtype
    _check("layer_norm", y, y_ref, y_base, grads, grads_ref, grads_base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_rms_norm_matches_reference(tokens, hidden, dtype, affine, backend, kernel_device):
    has_w, _, zcg, scale = affine
    x, dy, w, _ = _inputs(tokens, hidden, dtype, kernel_device, has_w, False, zcg)
    y, grads = _run(lambda x, w: K.rms_norm(x, w, EPS, zero_centered_gamma=zcg, output_scale=scale, backend=backend),
                    dy, x, w)
    y_ref, grads_ref = _run(lambda x, w: rms_norm_ref(x, w, EPS, zero_centered_gamma=zcg, output_scale=scale),
                            dy.double(), x.double(), None if w is None else w.double())
    y_base, grads_base = _run(lambda x, w: F.rms_norm(x, (hidden,), _w_eff(w, zcg), EPS) * scale, dy, x, w)
    assert y.dtype == dtype
    _check("rms_norm", y, y_ref, y_base, grads, grads_ref, grads_base)


def _run_pair(fn, dy, dres, *tensors):
    leaves = [_leaf(t) for t in tensors]
    y, res = fn(*leaves)
    torch.autograd.backward([y, res], [dy, dres])
    return y.detach(), res.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_add_rms_norm_matches_reference(tokens, hidden, dtype, affine, backend, kernel_device):
    has_w, _, zcg, scale = affine
    x, dy, w, _ = _inputs(tokens, hidden, dtype, kernel_device, has_w, False, zcg)
    residual, dres, _, _ = _inputs(tokens, hidden, dtype, kernel_device, False, False, zcg, seed=1)
    y, res, grads = _run_pair(lambda x, r, w: K.add_rms_norm(x, r, w, EPS, zero_centered_gamma=zcg,
                                                             output_scale=scale, backend=backend), dy, dres, x, residual, w)
    y_ref, _, grads_ref = _run_pair(
        lambda x, r, w: add_rms_norm_ref(x, r, w, EPS, zero_centered_gamma=zcg, output_scale=scale),
        dy.double(), dres.double(), *(None if t is None else t.double() for t in (x, residual, w)))

    def baseline(x, r, w):
        s = x + r
        return F.rms_norm(s, (hidden,), _w_eff(w, zcg), EPS) * scale, s

    y_base, res_base, grads_base = _run_pair(baseline, dy, dres, x, residual, w)
    assert y.dtype == dtype and res.dtype == dtype
    assert torch.equal(res, res_base), "residual_out is x + residual rounded once"
    _check("add_rms_norm", y, y_ref, y_base, grads, grads_ref, grads_base)
    assert torch.equal(grads[0], grads[1]), "x and residual get the same gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_float32_residual_stream(backend, kernel_device):
    """bf16 activations with a float32 residual stream: residual_out and its gradient stay float32."""
    x, _, w, _ = _inputs(9, 127, torch.bfloat16, kernel_device, True, False, False)
    residual = torch.randn(9, 127, dtype=torch.float32, device=kernel_device)
    xl, rl, wl = _leaf(x), _leaf(residual), _leaf(w)
    y, res = K.add_rms_norm(xl, rl, wl, EPS, backend=backend)
    assert (y.dtype, res.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(res.detach(), x.float() + residual, rtol=0, atol=0)
    y_ref = rms_norm_ref(res.detach(), w, EPS)
    y_base = F.rms_norm(res.detach().bfloat16(), (127,), w, EPS)  # plain torch must round the residual first
    assert_close_to_reference(y.detach(), y_ref, baseline=y_base)
    (y.float().sum() + res.sum()).backward()
    assert (xl.grad.dtype, rl.grad.dtype, wl.grad.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_rms_norm"])
def test_backward_is_bitwise_reproducible(op, kernel_device):
    """dW/dB come from per-program partial rows and one sum: no atomics, same bits every run."""
    x, dy, w, b = _inputs(64, 127, torch.bfloat16, kernel_device, True, True, False)

    def grads():
        xl, wl, bl, rl = _leaf(x), _leaf(w), _leaf(b), _leaf(dy)
        if op == "layer_norm":
            K.layer_norm(xl, wl, bl, backend="triton").backward(dy)
            return xl.grad, wl.grad, bl.grad
        if op == "rms_norm":
            K.rms_norm(xl, wl, backend="triton").backward(dy)
            return xl.grad, wl.grad
        y, res = K.add_rms_norm(xl, rl, wl, backend="triton")
        torch.autograd.backward([y, res], [dy, x])
        return xl.grad, wl.grad, rl.grad

    first, second = grads(), grads()
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_leading_dims_and_non_contiguous_grad(kernel_device):
    """[B, S, H] inputs flatten inside; an expanded (stride-0) dy is handled."""
    x = torch.randn(2, 3, 127, device=kernel_device, requires_grad=True)
    w = torch.randn(127, device=kernel_device, requires_grad=True)
    K.rms_norm(x, w, backend="triton").sum().backward()
    x_ref = x.detach().double().requires_grad_()
    w_ref = w.detach().double().requires_grad_()
    rms_norm_ref(x_ref, w_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_kernels_return_float32_stats(backend, kernel_device):
    x = torch.randn(6, 10, dtype=torch.bfloat16, device=kernel_device)
    y, mean, rstd = K.layer_norm_fwd(x, None, None, EPS, backend=backend)
    assert (y.dtype, mean.dtype, rstd.dtype, mean.shape, rstd.shape) == (
        torch.bfloat16, torch.float32, torch.float32, (6,), (6,))
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(x64.var(-1, unbiased=False) + EPS), rtol=1e-6, atol=0)
    dx, dw, db = K.layer_norm_bwd(torch.ones_like(x), x, None, mean, rstd, has_bias=False, backend=backend)
    assert dw is None and db is None and dx.dtype == torch.bfloat16


def test_empty_batch(kernel_device):
    x = torch.empty(0, 127, device=kernel_device, requires_grad=True)
    w = torch.ones(127, device=kernel_device, requires_grad=True)
    y = K.rms_norm(x, w, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 127) and torch.equal(w.grad, torch.zeros(127))


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_strided_inputs_equal_contiguous(backend, kernel_device):
    """Launchers take any row stride (a column slice of a wider buffer) without copying."""
    wide = torch.randn(9, 200, device=kernel_device, dtype=torch.bfloat16)
    x, dy = wide[:, :127], wide[:, 50:177]
    w = torch.randn(127, device=kernel_device, dtype=torch.bfloat16)
    y, mean, rstd = K.layer_norm_fwd(x, w, None, EPS, backend=backend)
    y_c, mean_c, rstd_c = K.layer_norm_fwd(x.contiguous(), w, None, EPS, backend=backend)
    assert torch.equal(y, y_c) and torch.equal(mean, mean_c) and torch.equal(rstd, rstd_c)
    grads = K.layer_norm_bwd(dy, x, w, mean, rstd, has_bias=False, backend=backend)
    grads_c = K.layer_norm_bwd(dy.contiguous(), x.contiguous(), w, mean, rstd, has_bias=False, backend=backend)
    assert torch.equal(grads[0], grads_c[0]) and torch.equal(grads[1], grads_c[1]) and grads[2] is None
