"""Per-channel batch moments: local (optionally masked and shifted) sums and their one-all-reduce sync.

Data-parallel norms need the statistics of the *global* batch. Each rank reduces its elements to
per-channel sums ``[sum(x - shift), sum((x - shift)^2)]`` and a count, packs them into one
``2C + 1`` vector and all-reduces it once; a rank with no elements contributes zeros. The shift
(the running mean, say: identical on every rank) keeps ``E[(x-s)^2] - E[x-s]^2`` free of
catastrophic cancellation when ``|mean| >> std``.
"""

from __future__ import annotations

import torch

from distnorm import comm
from distnorm.comm import Group

__all__ = ["channel_sums", "channel_view", "moments_from_sums", "synced_moments", "to_rows"]


def to_rows(x: torch.Tensor, channel_dim: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` with channels on ``channel_dim`` -> ``([rows, C], row_mask [rows] or None)``.

    ``mask`` has ``x``'s shape without the channel dim (True = real element).
    """
    c_dim = channel_dim % x.dim()
    rows = x.movedim(c_dim, -1).reshape(-1, x.shape[c_dim])
    keep = None
    if mask is not None:
        expected = tuple(s for i, s in enumerate(x.shape) if i != c_dim)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"mask must have the input's shape without the channel dim {expected}, got "
                f"{tuple(mask.shape)} (rank {_rank()})"
            )
        keep = mask.reshape(-1)
    return rows, keep


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def channel_view(v: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """Per-channel vector ``v [C]`` viewed to broadcast against an ``ndim``-d input."""
    c_dim = channel_dim % ndim
    return v.reshape(v.shape[0], *([1] * (ndim - c_dim - 1)))


def channel_sums(
    x: torch.Tensor,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed local sums ``[sum(x - shift) (C), sum((x - shift)^2) (C), n (1)]`` in ``dtype``.

    Reduces over every dim but ``channel_dim`` in place (no channels-last copy of ``x``). No host
    sync: masking multiplies by the mask instead of indexing. An empty ``x`` gives zeros.
    """
    c_dim = channel_dim % x.dim()
    dims = [d for d in range(x.dim()) if d != c_dim]
    xs = x.to(dtype)
    if shift is not None:
        xs = xs - channel_view(shift.to(dtype), x.dim(), c_dim)
    if mask is None:
        n = torch.full((1,), x.numel() // max(x.shape[c_dim], 1), dtype=dtype, device=x.device)
        s1, s2 = xs.sum(dims), xs.square().sum(dims)
    else:
        expected = tuple(s for i, s in enumerate(x.shape) if i != c_dim)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"mask must have the input's shape without the channel dim {expected}, got "
                f"{tuple(mask.shape)} (rank {_rank()})"
            )
        w = mask.unsqueeze(c_dim).to(dtype)
        xw = xs * w
        n = w.sum().reshape(1)
        s1, s2 = xw.sum(dims), (xw * xs).sum(dims)
    return torch.cat([s1, s2, n])


def moments_from_sums(sums: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed ``[s1, s2, n]`` -> ``(mean [C], biased var [C], n [])``; n = 0 gives NaN moments."""
    c = (sums.numel() - 1) // 2
    s1, s2, n = sums[:c], sums[c:2 * c], sums[2 * c]
    d = s1 / n
    var = (s2 / n - d.square()).clamp_min(0)
    mean = d if shift is None else d + shift.to(d.dtype)
    return mean, var, n


def synced_moments(
    x: torch.Tensor,
    *,
    channel_dim: int = 1,
    mask: torch.Tensor | None = None,
    group: Group = None,
    shift: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count of the global batch over ``group``.

    Collectives (P > 1): 1 all-reduce of ``2C + 1`` numbers in ``dtype``.
    """
    sums = channel_sums(x, channel_dim, mask, shift, dtype)
    comm.all_reduce_(sums, group)
    return moments_from_sums(sums, shift)
