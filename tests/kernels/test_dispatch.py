"""Backend selection, the forced-backend errors, and argument checks (type, message, rank)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from distnorm import kernels as K
from distnorm.kernels import torch_ops


def test_auto_uses_torch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_ops, "rms_norm_fwd", lambda *a, **k: calls.append("torch") or ("y", "rstd"))
    assert K.rms_norm_fwd(torch.randn(2, 8), None, 1e-6) == ("y", "rstd")
    assert calls == ["torch"]
    assert K.resolve_backend(torch.randn(2, 8)) == "torch"


def test_forced_backends_run_the_chosen_implementation(kernel_device):
    if kernel_device.type != "cpu":
        pytest.skip("CPU dispatch")
    x = torch.randn(3, 10)
    assert K.resolve_backend(x, "triton") == "triton"
    assert K.resolve_backend(x, "torch") == "torch"
    # the two implementations differ in rounding only: same values to float32 precision, not the same code
    y_triton, _ = K.rms_norm_fwd(x, None, 1e-6, backend="triton")
    y_torch, _ = K.rms_norm_fwd(x, None, 1e-6, backend="torch")
    torch.testing.assert_close(y_triton, y_torch)


def test_forced_triton_without_triton_is_a_runtime_error(monkeypatch):
    monkeypatch.setattr(K, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"rms_norm_fwd: backend='triton' cannot run: Triton is not installed.*rank 0"):
        K.rms_norm_fwd(torch.randn(2, 8), None, 1e-6, backend="triton")
    assert K.resolve_backend(torch.randn(2, 8), "auto") == "torch"


def test_forced_triton_on_cpu_without_interpreter_is_a_runtime_error(monkeypatch):
    from distnorm.kernels import norm

    monkeypatch.setattr(norm, "is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match=r"x2d is on cpu: the kernels run on CUDA tensors.*TRITON_INTERPRET=1"):
        K.layer_norm_fwd(torch.randn(2, 8), None, None, 1e-5, backend="triton")
    with pytest.raises(RuntimeError, match=r"layer_norm_fwd: the Triton kernels got a CPU tensor.*rank 0"):
        norm.layer_norm_fwd(torch.randn(2, 8), None, None, 1e-5)


def test_forced_triton_rejects_what_the_kernels_do_not_support():
    with pytest.raises(RuntimeError, match=r"x2d.dtype = torch.float64 is not one of"):
        K.rms_norm_fwd(torch.randn(2, 8, dtype=torch.float64), None, 1e-6, backend="triton")
    with pytest.raises(RuntimeError, match=r"a row of 16385 x 4 bytes exceeds"):
        K.rms_norm_fwd(torch.randn(1, 16385), None, 1e-6, backend="triton")
    # auto falls back to torch for both
    y, _ = K.rms_norm_fwd(torch.randn(2, 8, dtype=torch.float64), None, 1e-6)
    assert y.dtype == torch.float64


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"rms_norm_fwd: backend = 'cuda', expected 'auto', 'triton' or 'torch' \(rank 0\)"):
        K.rms_norm_fwd(torch.randn(2, 8), None, 1e-6, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_arguments_name_argument_value_and_rank(backend, kernel_device):
    x = torch.randn(4, 8, device=kernel_device)
    w = torch.ones(8, device=kernel_device)
    with pytest.raises(ValueError, match=r"rms_norm_fwd: x2d.shape = \(2, 2, 8\), expected a 2-D \[T, N\].*rank 0"):
        K.rms_norm_fwd(x.view(2, 2, 8), w, 1e-6, backend=backend)
    with pytest.raises(ValueError, match=r"layer_norm_fwd: weight.shape = \(7,\), expected \(8,\)"):
        K.layer_norm_fwd(x, w[:7], None, 1e-5, backend=backend)
    with pytest.raises(ValueError, match=r"x2d.stride\(\) = \(1, 4\), expected unit stride"):
        K.rms_norm_fwd(x.view(8, 4).t(), None, 1e-6, backend=backend)
    _, rstd = K.rms_norm_fwd(x, w, 1e-6, backend=backend)
    with pytest.raises(TypeError, match=r"rms_norm_bwd: rstd.dtype = torch.float16, expected torch.float32"):
        K.rms_norm_bwd(x, x, w, rstd.half(), backend=backend)
    with pytest.raises(ValueError, match=r"rms_norm_bwd: dy.shape = \(4, 7\), expected x2d's shape \(4, 8\)"):
        K.rms_norm_bwd(x[:, :7].contiguous(), x, w, rstd, backend=backend)
    with pytest.raises(ValueError, match=r"add_rms_norm_fwd: residual2d.shape = \(3, 8\), expected x2d's shape"):
        K.add_rms_norm_fwd(x, x[:3], w, 1e-6, backend=backend)
    sums = torch.zeros(4, 2, device=kernel_device)
    with pytest.raises(ValueError, match=r"norm_bwd_finish: n_total = 4, expected an int >= x2d.shape\[1\] = 8"):
        K.norm_bwd_finish(x, x, w, None, rstd, sums[:, :1].contiguous(), 4, backend=backend)
    with pytest.raises(ValueError, match=r"norm_bwd_finish: sums.shape = \(4, 2\), expected \(4, 1\)"):
        K.norm_bwd_finish(x, x, w, None, rstd, sums, 8, backend=backend)


def test_importing_kernels_does_not_import_triton():
    """``import distnorm.kernels`` stays cheap: Triton loads on the first call that selects it."""
    import subprocess
    import sys

    code = "import sys, distnorm.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": os.getcwd()})
