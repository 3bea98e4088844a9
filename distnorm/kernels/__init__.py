"""LayerNorm / RMSNorm / add+RMSNorm: the one home of the local and tensor-parallel norm math.

Per op, one path (Liger-Kernel's ``ops/`` layout; flash-attention's ``ops/triton/layer_norm.py``):

=================================  ===============================================================
``distnorm.functional.reference``  float64 references (``layer_norm_ref``, ``rms_norm_ref``,
                                   ``add_rms_norm_ref``): the ground truth of every test
``kernels/torch_ops.py``           the one torch implementation (torch's native LayerNorm kernels;
                                   allocation-lean composites for RMSNorm and the sharded pieces)
``kernels/norm.py``, ``sharded.py``  the Triton kernels and their launchers (imported on first use)
``kernels/__init__.py`` (here)     the one dispatcher: ``resolve_backend`` + ``launcher``
``kernels/autograd.py``            the autograd Functions of the local, sequence-parallel and
                                   hidden-sharded forms, and their functional entry points
``distnorm.tensor_parallel``       thin modules: parameters, checks, one-line ``forward``
=================================  ===============================================================

Every launcher below takes ``backend="auto" | "triton" | "torch"``:

- ``"auto"``: the Triton kernels when ``x2d`` is a CUDA tensor, Triton imports, and the kernels
  support the call (dtype float32/bfloat16/float16, a row of at most 64 KiB); else torch.
- ``"triton"``: the kernels, or a ``RuntimeError`` saying why they cannot run (Triton missing,
  a CPU tensor without ``TRITON_INTERPRET=1``, an unsupported dtype or row size).
- ``"torch"``: :mod:`distnorm.kernels.torch_ops`.

The autograd Functions resolve the backend once per call (in the forward) and reuse it in the
backward. Triton is imported on the first call that selects it, never at import time; nothing here
reads the environment or queries a device at import. The contract (``x2d [T, N]`` with unit stride
along ``N``; statistics float32 ``[T]``, float64 for float64 inputs; outputs in x's dtype;
``dw``/``db`` float32 (float64 for float64 inputs), cast to the parameter dtype by the Functions
after any cross-rank sum) is the same for both backends; see ``docs/kernels.md`` and
``docs/precision.md``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Any, Literal

import torch

from distnorm.kernels import torch_ops
from distnorm.kernels._checks import KERNEL_DTYPES, fail
from distnorm.kernels.torch_ops import stats_dtype

__all__ = [
    "AddRMSNormFn",
    "Backend",
    "CRMSNormFn",
    "LayerNormFn",
    "RMSNormFn",
    "ShardedNormFn",
    "add_rms_norm",
    "add_rms_norm_bwd",
    "add_rms_norm_fwd",
    "launcher",
    "layer_norm",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "norm_bwd_finish",
    "norm_bwd_partial",
    "norm_fwd_with_stats",
    "norm_partial_stats",
    "resolve_backend",
    "rms_norm",
    "rms_norm_bwd",
    "rms_norm_fwd",
    "sequence_parallel_norm",
    "sharded_norm",
    "stats_dtype",
    "triton_available",
]

Backend = Literal["auto", "triton", "torch"]
_MAX_ROW_BYTES = 65536  # distnorm.kernels.norm.MAX_ROW_BYTES, without importing triton


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (checked once, on first use)."""
    return importlib.util.find_spec("triton") is not None


def _triton_module(name: str) -> ModuleType:
    return importlib.import_module(f"distnorm.kernels.{name}")


def _unsupported_reason(x2d: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take ``x2d`` (None if they can)."""
    if not triton_available():
        return "Triton is not installed (pip install 'distnorm[triton]')"
    if not isinstance(x2d, torch.Tensor):
        return None  # the launcher's argument check reports it
    if x2d.dtype not in KERNEL_DTYPES:
        return f"x2d.dtype = {x2d.dtype} is not one of {KERNEL_DTYPES}"
    if x2d.dim() >= 1 and x2d.shape[-1] * x2d.element_size() > _MAX_ROW_BYTES:
        return f"a row of {x2d.shape[-1]} x {x2d.element_size()} bytes exceeds the kernels' {_MAX_ROW_BYTES}-byte limit"
    if x2d.device.type == "cuda":
        return None
    if x2d.device.type == "cpu" and _triton_module("norm").is_interpreted():
        return None
    return (f"x2d is on {x2d.device}: the kernels run on CUDA tensors, or on CPU tensors under Triton's "
            "interpreter (TRITON_INTERPRET=1 set before distnorm.kernels.norm is first imported)")


def resolve_backend(x2d: torch.Tensor, backend: str = "auto", *, where: str = "resolve_backend") -> str:
    """``"triton"`` or ``"torch"`` for ``x2d`` under the dispatch rule in the module docstring."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if isinstance(x2d, torch.Tensor) and x2d.is_cuda and _unsupported_reason(x2d) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        reason = _unsupported_reason(x2d)
        if reason is not None:
            from distnorm.comm import _global_rank

            raise RuntimeError(f"{where}: backend='triton' cannot run: {reason} (rank {_global_rank()})")
        return "triton"
    fail(ValueError, where, "backend", repr(backend), "'auto', 'triton' or 'torch'")


def launcher(name: str, resolved: str) -> Any:
    """The implementation of launcher ``name`` for an already resolved backend (``"torch"`` / ``"triton"``)."""
    if resolved == "torch":
        return getattr(torch_ops, name)
    return getattr(_triton_module("sharded" if name.startswith("norm_") else "norm"), name)


def _impl(name: str, x2d: torch.Tensor, backend: str) -> Any:
    return launcher(name, resolve_backend(x2d, backend, where=name))


# ----------------------------------------------------------------------------------------------
# dispatched contract


def layer_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0, backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward: ``x2d [T, N] -> (y [T, N] x.dtype, mean [T] fp32, rstd [T] fp32)``."""
    return _impl("layer_norm_fwd", x2d, backend)(
        x2d, weight, bias, eps, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)


def layer_norm_bwd(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0, has_bias: bool = True, backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm backward: ``(dx [T, N] dy.dtype, dw [N] | None, db [N] | None)``."""
    return _impl("layer_norm_bwd", x2d, backend)(
        dy, x2d, weight, mean, rstd, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
        has_bias=has_bias)


def rms_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0, backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm forward: ``x2d [T, N] -> (y [T, N] x.dtype, rstd [T] fp32)``."""
    return _impl("rms_norm_fwd", x2d, backend)(
        x2d, weight, eps, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)


def rms_norm_bwd(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0, backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm backward: ``(dx [T, N] dy.dtype, dw [N] | None)``."""
    return _impl("rms_norm_bwd", x2d, backend)(
        dy, x2d, weight, rstd, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)


def add_rms_norm_fwd(
    x2d: torch.Tensor, residual2d: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
    zero_centered_gamma: bool = False, output_scale: float = 1.0, backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual_out = x + residual``; ``y = rms_norm(residual_out)``: ``(y, residual_out, rstd [T] fp32)``."""
    return _impl("add_rms_norm_fwd", x2d, backend)(
        x2d, residual2d, weight, eps, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)


def add_rms_norm_bwd(
    dy: torch.Tensor, dresidual_out: torch.Tensor | None, residual_out: torch.Tensor, weight: torch.Tensor | None,
    rstd: torch.Tensor, *, zero_centered_gamma: bool = False, output_scale: float = 1.0, backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`add_rms_norm_fwd`: ``(dx (= dresidual) [T, N] dy.dtype, dw [N] | None)``."""
    return _impl("add_rms_norm_bwd", residual_out, backend)(
        dy, dresidual_out, residual_out, weight, rstd, zero_centered_gamma=zero_centered_gamma,
        output_scale=output_scale)


def norm_partial_stats(x2d: torch.Tensor, *, rms: bool, backend: Backend = "auto") -> torch.Tensor:
    """This shard's per-token stats, fp32: ``[T, 1]`` Σx² (rms) or ``[T, 2]`` (local mean, local M2)."""
    return _impl("norm_partial_stats", x2d, backend)(x2d, rms=rms)


def norm_fwd_with_stats(
    x2d: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, *, zero_centered_gamma: bool = False, output_scale: float = 1.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Normalise ``x2d [T, H_local]`` with reduced ``mean`` (None = RMSNorm) and ``rstd``: ``y`` x.dtype."""
    return _impl("norm_fwd_with_stats", x2d, backend)(
        x2d, mean, rstd, weight, bias, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale)


def norm_bwd_partial(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
    rstd: torch.Tensor, *, zero_centered_gamma: bool = False, output_scale: float = 1.0, has_bias: bool = True,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(sums fp32 [T, 2] (Σg, Σg·x̂) | [T, 1] (Σg·x̂), dw_shard | None, db_shard | None)``."""
    return _impl("norm_bwd_partial", x2d, backend)(
        dy, x2d, weight, mean, rstd, zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
        has_bias=has_bias)


def norm_bwd_finish(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
    rstd: torch.Tensor, sums: torch.Tensor, n_total: int, *, zero_centered_gamma: bool = False,
    output_scale: float = 1.0, backend: Backend = "auto",
) -> torch.Tensor:
    """``dx [T, H_local]`` (dy.dtype) from the all-reduced ``sums`` over the full hidden size ``n_total``."""
    return _impl("norm_bwd_finish", x2d, backend)(
        dy, x2d, weight, mean, rstd, sums, n_total, zero_centered_gamma=zero_centered_gamma,
        output_scale=output_scale)


from distnorm.kernels.autograd import (  # noqa: E402  (the Functions dispatch through the names above)
    AddRMSNormFn,
    CRMSNormFn,
    LayerNormFn,
    RMSNormFn,
    ShardedNormFn,
    add_rms_norm,
    layer_norm,
    rms_norm,
    sequence_parallel_norm,
    sharded_norm,
)
