"""Rank-chunking and reference-comparison helpers for distributed parity tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distnorm.comm import shard_sizes

__all__ = ["assert_close_to_reference", "chunk_for_rank", "max_abs_error", "split_for_world"]


def split_for_world(x: torch.Tensor, world: int, dim: int = 0, sizes: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Split ``x`` along ``dim`` into ``world`` pieces (``shard_sizes`` unless ``sizes`` given)."""
    sizes = shard_sizes(x.shape[dim], world) if sizes is None else list(sizes)
    return [p.contiguous() for p in torch.split(x, sizes, dim=dim)]


def chunk_for_rank(x: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """Rank ``rank``'s piece of ``x`` along ``dim`` under :func:`distnorm.comm.shard_sizes`.

    Returns a detached contiguous copy that requires grad iff ``x`` does, ready to be fed to a
    distributed op whose input gradient is then compared with the matching slice of the
    reference's.
    """
    piece = split_for_world(x.detach(), world, dim)[rank].clone()
    return piece.requires_grad_(x.requires_grad)


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| in float64 (0.0 for empty tensors)."""
    if actual.shape != reference.shape:
        raise ValueError(f"max_abs_error: shapes differ: {tuple(actual.shape)} vs {tuple(reference.shape)}")
    if actual.numel() == 0:
        return 0.0
    return float((actual.double() - reference.double()).abs().max())


def assert_close_to_reference(
    actual: torch.Tensor,
    reference: torch.Tensor,
    *,
    baseline: torch.Tensor | None = None,
    factor: float = 2.0,
    atol: float = 0.0,
    rtol: float = 0.0,
    name: str = "output",
) -> None:
    """Assert ``actual`` is as close to the float64 ``reference`` as distnorm promises.

    With ``baseline`` (the same computation done by plain torch in ``actual``'s dtype):
    ``max|actual - ref| <= factor * max|baseline - ref| + atol`` — distnorm's tolerance rule
    (no worse than twice torch's own rounding error). Without it:
    ``max|actual - ref| <= atol + rtol * max|ref|``.
    """
    err = max_abs_error(actual, reference)
    scale = float(reference.double().abs().max()) if reference.numel() else 0.0
    if baseline is not None:
        base_err = max_abs_error(baseline, reference)
        bound = factor * base_err + atol + rtol * scale
        detail = f"{factor} x torch's error {base_err:.3e} + atol {atol:.1e}"
    else:
        bound = atol + rtol * scale
        detail = f"atol {atol:.1e} + rtol {rtol:.1e} x max|ref| {scale:.3e}"
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{name}: max abs error {err:.3e} vs float64 reference exceeds {bound:.3e} ({detail})")
