"""The trainer's ``--freeze-norms-at STEP``: replace the norms by calibrated fixed-scale ones and train on.

``launch/train.py`` calls :func:`check_freeze_config` with the run configuration (before any
collective), :func:`freeze_before_resume` before loading a checkpoint (a run resumed after the
freeze step needs the frozen modules for the checkpoint's keys) and :func:`freeze_for_training` at
the top of every step; at ``step == freeze_at``
the model's LayerNorm/RMSNorm modules become ``distnorm.FrozenScaleNorm`` (``distnorm.freeze_norms``)
calibrated on the next ``CALIBRATION_BATCHES`` training batches, pooled over ``group`` (every rank:
the demo's norms are sequence-parallel). The frozen norms keep the trained weight/bias Parameter
objects, so the optimizer (and its state) carries on unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from distnorm.comm import Group
from distnorm.freeze import FrozenScaleNorm, freeze_norms

__all__ = ["CALIBRATION_BATCHES", "FREEZABLE_NORMS", "check_freeze_config", "freeze_before_resume",
           "freeze_for_training"]

CALIBRATION_BATCHES = 4
FREEZABLE_NORMS = ("layernorm", "rmsnorm", "ssnorm")


def check_freeze_config(freeze_at: int, *, steps: int, norm: str, overlap: bool, zero_stage: int | None,
                        rank: int) -> None:
    """ValueError unless ``freeze_at`` is 0 (off) or a step inside the run, on a model it can freeze."""
    if freeze_at == 0:
        return
    if not 1 <= freeze_at < steps:
        raise ValueError(f"freeze_norms_at: must be 0 (off) or a step in [1, steps) = [1, {steps}), got {freeze_at} "
                         f"(rank {rank})")
    if norm not in FREEZABLE_NORMS:
        raise ValueError(f"freeze_norms_at: freezes the norms {FREEZABLE_NORMS}, got model.norm={norm!r} (rank {rank})")
    if overlap:
        raise ValueError(f"freeze_norms_at: the overlap path fuses the RMSNorm into the collective and cannot use "
                         f"a frozen norm; got overlap=true (rank {rank})")
    if zero_stage == 3:
        raise ValueError(f"freeze_norms_at: ZeRO stage 3 partitions the norm parameters inside their modules; "
                         f"expected a stage <= 2, got 3 (rank {rank})")


def freeze_for_training(model: nn.Module, step: int, freeze_at: int, batch: Callable[[int], Any], *,
                        group: Group, log: Callable[[str], None]) -> bool:
    """At ``step == freeze_at`` (0-based loop index: after ``freeze_at`` optimizer steps), freeze the
    norms of ``model`` on ``batch(step) ... batch(step + CALIBRATION_BATCHES - 1)``; True if it did.

    Collectives (at that step only): those of :func:`distnorm.freeze_norms` (1 all-reduce over
    ``group``) plus the calibration forwards' own.
    """
    if freeze_at == 0 or step != freeze_at:
        return False
    freeze_norms(model, (batch(s) for s in range(step, step + CALIBRATION_BATCHES)), group=group)
    rstd = [float(m.rstd) for m in model.modules() if isinstance(m, FrozenScaleNorm)]
    log(f"step {step:5d}  froze {len(rstd)} norms (rstd {min(rstd):.4g} .. {max(rstd):.4g}) on "
        f"{CALIBRATION_BATCHES} batches; training on")
    return True


def freeze_before_resume(model: nn.Module, start_step: int, freeze_at: int, batch: Callable[[int], Any], *,
                         group: Group, log: Callable[[str], None]) -> bool:
    """Before loading a checkpoint taken after ``start_step`` steps: if the run froze its norms before
    that (``0 < freeze_at < start_step``), freeze them now, on the same batches as the original run
    (the checkpoint's ``rstd`` then overwrites the identical values); True if it did.
    Collectives: as :func:`freeze_for_training`.
    """
    if not 0 < freeze_at < start_step:
        return False
    return freeze_for_training(model, freeze_at, freeze_at, batch, group=group, log=log)
