"""LayerNorm / RMSNorm as functions, hidden-sharded over ``group`` when it has more than one rank.

The math lives in :mod:`distnorm.kernels` (the one home of LayerNorm / RMSNorm / add+RMSNorm:
torch implementation, Triton kernels, dispatcher, autograd Functions). This module is the thin
functional API over it: :func:`layer_norm` and :func:`rms_norm` pick the local op (``group`` None
or of size 1) or the hidden-sharded one.

The local launchers (``layer_norm_fwd`` ... ``norm_bwd_finish``, ``stats_dtype``) are re-exported
from :mod:`distnorm.kernels` under their old names here; they take ``backend=`` and return ``dw``
/ ``db`` in the stats dtype (float32; float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from distnorm.comm import Group
from distnorm.kernels import (
    layer_norm_bwd,
    layer_norm_fwd,
    norm_bwd_finish,
    norm_bwd_partial,
    norm_fwd_with_stats,
    norm_partial_stats,
    rms_norm_bwd,
    rms_norm_fwd,
    sharded_norm,
    stats_dtype,
)

__all__ = [
    "layer_norm",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "norm_bwd_finish",
    "norm_bwd_partial",
    "norm_fwd_with_stats",
    "norm_partial_stats",
    "rms_norm",
    "rms_norm_bwd",
    "rms_norm_fwd",
    "stats_dtype",
]


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    group: Group = None,
    hidden: int | None = None,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """LayerNorm over the last dim, hidden-sharded over ``group`` when it has more than one rank.

    ``x [*, H_local] -> y [*, H_local]`` in ``x.dtype``; ``weight``/``bias [H_local]`` are this
    rank's shards, ``H_local = shard_sizes(hidden, P)[rank]``; ``hidden`` (the full size) is
    required when P > 1. A ``weight`` or ``bias`` of any other shape (a broadcastable ``[1]``
    included) is a ValueError naming it, as in ``torch.nn.functional.layer_norm`` (shape metadata
    only: no host sync, compile-friendly). Collectives (P > 1): fwd 1 all-reduce,
    16 B/token (float64 [n·mean, M2 + n·mean²]); bwd 1 all-reduce, 8 B/token (fp32 [Σg, Σg·x_hat];
    16 for float64 inputs). ``group`` None or P == 1: none (torch's native LayerNorm kernel).
    """
    return sharded_norm(x, weight, bias, eps, rms=False, group=group, hidden=hidden,
                        zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, fn="layer_norm")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    group: Group = None,
    hidden: int | None = None,
    zero_centered_gamma: bool = False,
    output_scale: float = 1.0,
) -> torch.Tensor:
    """RMSNorm over the last dim, hidden-sharded over ``group`` when it has more than one rank.

    ``x [*, H_local] -> y [*, H_local]`` in ``x.dtype``, ``H_local = shard_sizes(hidden, P)[rank]``
    (``hidden`` required when P > 1); ``weight [H_local]`` exactly (a ``[1]`` one is a ValueError,
    as in ``torch.nn.functional.rms_norm``). Collectives (P > 1): fwd 1 all-reduce,
    4 B/token (Σx², fp32; 8 for float64 inputs); bwd 1 all-reduce, 4 B/token (Σg·x_hat).
    ``group`` None or P == 1: none.
    """
    return sharded_norm(x, weight, None, eps, rms=True, group=group, hidden=hidden,
                        zero_centered_gamma=zero_centered_gamma, output_scale=output_scale, fn="rms_norm")
