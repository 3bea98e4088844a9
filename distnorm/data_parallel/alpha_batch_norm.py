"""AlphaBatchNorm: test-time calibration that mixes running and test-batch statistics.

α-BN (You et al., "Test-time batch statistics calibration for covariate shift", 2021): at test
time under covariate shift, normalise with ``mu = alpha * mu_running + (1 - alpha) * mu_batch`` and
``var = alpha * var_running + (1 - alpha) * var_batch`` (biased batch variance). ``alpha = 1`` is
plain eval BatchNorm, ``alpha = 0`` is pure test-batch statistics. Training is
:class:`~distnorm.data_parallel.SyncBatchNorm`'s. The test-batch statistics span the global batch
of ``group`` (one all-reduce), so every rank normalises alike and N ranks equal one process on the
concatenated test batch; they are differentiable (TENT-style adaptation backpropagates through
them), with the conjugate all-reduce in the backward. Running statistics never move in eval.
"""

from __future__ import annotations

from typing import Any

import torch

from distnorm import comm
from distnorm.comm import Group
from distnorm.data_parallel.sync_batch_norm import SyncBatchNorm, check_input
from distnorm.functional.batch_norm import alpha_batch_norm

__all__ = ["AlphaBatchNorm", "alpha_batch_norm", "alpha_batch_norm_ref"]


def alpha_batch_norm_ref(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    alpha: float,
    eps: float = 1e-5,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """α-BN in float64 on one process: ``x`` of any shape with channels on ``channel_dim``."""
    xc = x.double().movedim(channel_dim, -1)
    rows = xc.reshape(-1, xc.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    mean_b = rows.mean(0)
    var_b = (rows - mean_b).square().mean(0)
    mean = alpha * running_mean.double() + (1 - alpha) * mean_b
    var = alpha * running_var.double() + (1 - alpha) * var_b
    y = (xc - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.movedim(-1, channel_dim)


class AlphaBatchNorm(SyncBatchNorm):
    """:class:`SyncBatchNorm` whose eval mode calibrates with the test batch (α-BN).

    Constructor: :class:`SyncBatchNorm`'s plus keyword-only ``alpha`` (default 0.9);
    ``track_running_stats`` must stay True. State dict as ``torch.nn.BatchNorm``. Training: exactly
    :class:`SyncBatchNorm`. Eval: :func:`alpha_batch_norm` (running stats untouched).
    Collectives: training as :class:`SyncBatchNorm`; eval with alpha < 1 and P > 1: fwd 1
    all-reduce of 2C + 1 float64, bwd 1 all-reduce of 2C float32 (float64 for float64 input) if
    ``x`` needs a gradient.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group: Group = None,
        device: Any = None,
        dtype: Any = None,
        *,
        alpha: float = 0.9,
        channel_dim: int = 1,
        allow_nonfinite_stats: bool = False,
    ) -> None:
        where = f"rank {comm.group_rank(group)} of {comm.group_size(group)}"
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"AlphaBatchNorm: alpha must be a float in [0, 1], got {alpha!r} ({where})")
        if not track_running_stats:
            raise ValueError(
                f"AlphaBatchNorm: track_running_stats must be True (alpha mixes the running statistics in), "
                f"got {track_running_stats!r} ({where})"
            )
        super().__init__(num_features, eps, momentum, affine, True, group, device, dtype, channel_dim=channel_dim,
                         allow_nonfinite_stats=allow_nonfinite_stats)
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            return super().forward(x, mask)
        check_input(x, self.num_features, self.channel_dim, mask, self.group, type(self).__name__)
        self._check_params(x)
        assert self.running_mean is not None and self.running_var is not None  # track_running_stats=True
        return alpha_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, alpha=self.alpha, eps=self.eps,
            group=self.group, channel_dim=self.channel_dim, mask=mask,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
