"""Autograd functions over the dispatched kernels: local norms, no communication.

Inputs are ``[*, N]`` (flattened to ``[T, N]`` for the kernels; a copy only when the last dim is
not unit-stride). Each Function saves the input, the parameters and the float32 statistics, and
its backward is one kernel launch (plus the dW/dB partial-row sum). Gradients come back in the
dtype of the tensor they belong to.
"""

from __future__ import annotations

from typing import Any

import torch

from distnorm import kernels as K

__all__ = ["AddRMSNormFn", "LayerNormFn", "RMSNormFn", "add_rms_norm", "layer_norm", "rms_norm"]


def _as_2d(t: torch.Tensor, n: int) -> torch.Tensor:
    t2d = t.reshape(-1, n)
    return t2d if t2d.stride(-1) == 1 or n == 1 else t2d.contiguous()


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    if grad is None or like is None or not needed:
        return None
    return grad.to(like.dtype)


class LayerNormFn(torch.autograd.Function):
    """``y = ((x - mean) * rstd * w_eff + b) * output_scale`` over the last dim of ``x [*, N]``."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, eps, zero_centered_gamma, output_scale, backend):
        n = x.shape[-1]
        x2d = _as_2d(x, n)
        y, mean, rstd = K.layer_norm_fwd(x2d, weight, bias, eps, zero_centered_gamma=zero_centered_gamma,
                                         output_scale=output_scale, backend=backend)
        ctx.save_for_backward(x2d, weight, bias, mean, rstd)
        ctx.config = (zero_centered_gamma, output_scale, backend)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy):
        x2d, weight, bias, mean, rstd = ctx.saved_tensors
        zero_centered_gamma, output_scale, backend = ctx.config
        dx, dw, db = K.layer_norm_bwd(_as_2d(dy, x2d.shape[-1]), x2d, weight, mean, rstd,
                                      zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                                      has_bias=bias is not None and ctx.needs_input_grad[2], backend=backend)
        return (dx.view(dy.shape), _cast(dw, weight, ctx.needs_input_grad[1]), _cast(db, bias, ctx.needs_input_grad[2]),
                None, None, None, None)


class RMSNormFn(torch.autograd.Function):
    """``y = x * rstd * w_eff * output_scale`` over the last dim of ``x [*, N]``."""

    @staticmethod
    def forward(ctx: Any, x, weight, eps, zero_centered_gamma, output_scale, backend):
        x2d = _as_2d(x, x.shape[-1])
        y, rstd = K.rms_norm_fwd(x2d, weight, eps, zero_centered_gamma=zero_centered_gamma,
                                 output_scale=output_scale, backend=backend)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.config = (zero_centered_gamma, output_scale, backend)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy):
        x2d, weight, rstd = ctx.saved_tensors
        zero_centered_gamma, output_scale, backend = ctx.config
        dx, dw = K.rms_norm_bwd(_as_2d(dy, x2d.shape[-1]), x2d, weight, rstd,
                                zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, backend=backend)
        return dx.view(dy.shape), _cast(dw, weight, ctx.needs_input_grad[1]), None, None, None, None


class AddRMSNormFn(torch.autograd.Function):
    """``residual_out = x + residual``, ``y = rms_norm(residual_out)``; returns ``(y, residual_out)``.

    Saves ``residual_out`` (not x and residual): the backward reads residual_out, dy and
    dresidual_out once and writes one gradient, shared by x and residual.
    """

    @staticmethod
    def forward(ctx: Any, x, residual, weight, eps, zero_centered_gamma, output_scale, backend):
        n = x.shape[-1]
        y, residual_out, rstd = K.add_rms_norm_fwd(_as_2d(x, n), _as_2d(residual, n), weight, eps,
                                                   zero_centered_gamma=zero_centered_gamma,
                                                   output_scale=output_scale, backend=backend)
        ctx.save_for_backward(residual_out, weight, rstd)
        ctx.config = (zero_centered_gamma, output_scale, backend, x.dtype, residual.dtype)
        return y.view(x.shape), residual_out.view(residual.shape)

    @staticmethod
    def backward(ctx: Any, dy, dresidual_out):
        residual_out, weight, rstd = ctx.saved_tensors
        zero_centered_gamma, output_scale, backend, x_dtype, residual_dtype = ctx.config
        n = residual_out.shape[-1]
        dres2d = None if dresidual_out is None else _as_2d(dresidual_out, n)
        dx, dw = K.add_rms_norm_bwd(_as_2d(dy, n), dres2d, residual_out, weight, rstd,
                                    zero_centered_gamma=zero_centered_gamma, output_scale=output_scale,
                                    backend=backend)
        dx = dx.view(dy.shape)
        return (dx.to(x_dtype), dx.to(residual_dtype), _cast(dw, weight, ctx.needs_input_grad[2]),
                None, None, None, None)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    backend: K.Backend = "auto",
) -> torch.Tensor:
    """Local LayerNorm over the last dim: ``x [*, N] -> y [*, N]`` (x.dtype), stats float32.

    Collectives: none (this is the single-device op the distributed norms build on).
    """
    return LayerNormFn.apply(x, weight, bias, eps, zero_centered_gamma, output_scale, backend)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    backend: K.Backend = "auto",
) -> torch.Tensor:
    """Local RMSNorm over the last dim: ``x [*, N] -> y [*, N]`` (x.dtype). Collectives: none."""
    return RMSNormFn.apply(x, weight, eps, zero_centered_gamma, output_scale, backend)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
    backend: K.Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: ``(y [*, N] x.dtype, residual_out [*, N] residual.dtype)``.

    ``residual_out = x + residual`` (float32 sum, rounded to residual's dtype);
    ``y = rms_norm(residual_out)``. Collectives: none.
    """
    return AddRMSNormFn.apply(x, residual, weight, eps, zero_centered_gamma, output_scale, backend)
