"""Light helpers for the freeze tests that run in spawned processes (no transformers import)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import distnorm as dn
from distnorm.comm import shard_offsets, shard_sizes
from distnorm.freeze import freeze_norms

H = 6


def batches(shapes: list[tuple[int, ...]], seed: int = 3, last: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, last, generator=g, dtype=torch.float64) * 2 + 0.5 for s in shapes]



class _TwoNorms(nn.Module):
    """A local LayerNorm and a sequence-parallel RMSNorm over ``group`` (tokens split over ranks)."""

    def __init__(self, group: dist.ProcessGroup | None, grad_sync: str = "backward") -> None:
        super().__init__()
        self.fc = nn.Linear(4, H)
        self.ln = nn.LayerNorm(H)
        self.sp = dn.SequenceParallelRMSNorm(H, group=group, grad_sync=grad_sync)
        self.head = nn.Linear(H, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.fc(x))
        return self.head(self.sp(h + torch.tanh(h)))


def two_norms(group: dist.ProcessGroup | None = None, grad_sync: str = "backward") -> _TwoNorms:
    """Same weights everywhere: drawn from a seeded generator (simulated ranks share torch's global RNG)."""
    model = _TwoNorms(group, grad_sync).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model


def rows(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``x`` (``shard_sizes``: uneven, possibly none)."""
    return x.narrow(0, shard_offsets(x.shape[0], world)[rank], shard_sizes(x.shape[0], world)[rank])


def spawned_freeze(rank: int) -> list[float]:
    """Two real processes: calibrate on this rank's rows, pooled over the world."""
    calib = batches([(7,), (3,)])
    model = two_norms(dist.group.WORLD)
    freeze_norms(model, [rows(b, 2, rank) for b in calib], group=dist.group.WORLD)
    return [float(model.ln.rstd), float(model.sp.rstd)]
