"""Activation checkpointing around every distnorm module gives the uncheckpointed run exactly.

Non-reentrant, reentrant and selective (matmuls saved, the rest recomputed) checkpointing of
each case (tests/compose/cases.py) for 3 training steps and an eval step, from fresh modules:
outputs, input and parameter gradients and every buffer after every step equal the plain run's.
The buffers are what catches a recomputed forward that advances running statistics or a step
counter a second time (``torch.nn.BatchNorm`` does), or reads the already-advanced ones.
Worlds 1 and 3 (uneven tokens, columns and batches) in ``simulate``: the recompute re-issues the
forward's collectives inside backward, on every rank alike.
"""

from __future__ import annotations

import pytest

from distnorm.testing import simulate
from tests.compose.cases import CASES
from tests.compose.harness import CHECKPOINT_MODES, checkpoint_case

ATOL = 1e-6  # the same ops on the same data: only a different reduction order may differ


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_checkpointing_matches_plain(name, world):
    per_rank = simulate(world, checkpoint_case, name, timeout=120)
    for rank, result in enumerate(per_rank):
        for mode in CHECKPOINT_MODES:
            errors = result[mode]
            assert not isinstance(errors, str), f"{name}, {mode} checkpointing, rank {rank} of {world}: {errors}"
            bad = {k: v for k, v in errors.items() if not v <= ATOL}
            assert not bad, f"{name}, {mode} checkpointing, rank {rank} of {world}: max abs errors {bad} vs plain"
