"""Float64 ground truth for every distnorm norm.

These functions are deliberately plain: they upcast to float64, compute with the textbook
formulas (two-pass mean/variance), and return float64. They are differentiable (torch autograd in
float64), so the same call gives reference gradients. Every numerical test compares against them;
nothing in the library calls them on a hot path.
"""

from __future__ import annotations

import torch

__all__ = [
    "add_rms_norm_ref",
    "batch_norm_ref",
    "effective_weight_ref",
    "layer_norm_ref",
    "rms_norm_ref",
]


def effective_weight_ref(weight: torch.Tensor | None, zero_centered_gamma: bool) -> torch.Tensor | None:
    """The multiplier actually applied: ``weight + 1`` when stored zero-centred (Apex/TE), in float64."""
    if weight is None:
        return None
    w = weight.double()
    return w + 1.0 if zero_centered_gamma else w


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """LayerNorm over the last dim, in float64.

    ``x [*, H] -> y [*, H]``: ``y = ((x - mean) / sqrt(var + eps) * w + b) * output_scale`` with
    the biased variance ``var = mean((x - mean)^2)``, ``w = weight (+1 if zero_centered_gamma)``.
    """
    x = x.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    w = effective_weight_ref(weight, zero_centered_gamma)
    if w is not None:
        y = y * w
    if bias is not None:
        y = y + bias.double()
    return y * output_scale


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """RMSNorm over the last dim, in float64.

    ``x [*, H] -> y [*, H]``: ``y = x / sqrt(mean(x^2) + eps) * w * output_scale``.
    """
    x = x.double()
    y = x / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    w = effective_weight_ref(weight, zero_centered_gamma)
    if w is not None:
        y = y * w
    return y * output_scale


def add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm in float64: ``(rms_norm_ref(x + residual), x + residual)``.

    ``x, residual [*, H] -> (y [*, H], residual_out [*, H])``, both float64.
    """
    residual_out = x.double() + residual.double()
    return rms_norm_ref(residual_out, weight, eps, zero_centered_gamma=zero_centered_gamma,
                        output_scale=output_scale), residual_out


def _channels_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x.movedim(channel_dim, -1)


def batch_norm_ref(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: int = 0,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """BatchNorm in float64, returning ``(y, new_running_mean, new_running_var)``.

    ``x`` has channels on ``channel_dim`` (1 for ``[N, C, *]``, -1 for ``[B, T, C]``). ``mask``
    (bool, ``x``'s shape without the channel dim, True = real element) keeps padded elements out
    of the statistics; they are still normalised. Training: batch mean and biased variance
    normalise; running stats move by ``momentum`` towards the mean and the *unbiased* variance
    (``momentum=None``: cumulative average with factor ``1 / (num_batches_tracked + 1)``), as
    ``torch.nn.BatchNorm``. Eval (``training=False``): running stats normalise, nothing moves.
    Inputs are not modified.
    """
    xc = _channels_last(x.double(), channel_dim)
    c = xc.shape[-1]
    flat = xc.reshape(-1, c)
    if mask is not None:
        keep = mask.reshape(-1).to(torch.bool)
        rows = flat[keep]
    else:
        rows = flat
    new_rm = None if running_mean is None else running_mean.double().clone()
    new_rv = None if running_var is None else running_var.double().clone()
    if training:
        n = rows.shape[0]
        mean = rows.mean(dim=0)
        var = (rows - mean).square().mean(dim=0)
        if new_rm is not None and new_rv is not None:
            factor = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
            unbiased = var * n / max(n - 1, 1)
            new_rm = (1 - factor) * new_rm + factor * mean
            new_rv = (1 - factor) * new_rv + factor * unbiased
    else:
        if new_rm is None or new_rv is None:
            raise ValueError("batch_norm_ref: eval mode needs running_mean and running_var")
        mean, var = new_rm, new_rv
    y = (xc - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.movedim(-1, channel_dim), new_rm, new_rv
