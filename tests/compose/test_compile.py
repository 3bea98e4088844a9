"""torch.compile(fullgraph=True) of every public module and functional op equals eager.

For each case (tests/compose/cases.py) a fresh eager module and a fresh compiled one run 3
training steps (forward, backward, SGD update) and an eval step; outputs, input gradients,
parameter gradients and every buffer after every step must agree within ``ATOL`` (float32,
absolute for values of order 1, relative to the tensor's largest value above that: round-off; a
wrong gradient or a statistic advanced twice is off by 1e-3 or more), with zero graph breaks (``torch._dynamo`` counters; ``fullgraph=True`` also raises on one)
and at most one graph per mode (training, eval).

Cost on 2 cores is compile time, so: ``aot_eager`` (dynamo + AOTAutograd, the whole capture path
without code generation) for every case, inductor for a few; world 1 in this process, worlds 2
and 4 in real gloo processes, one spawn per world running all of its cases.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from distnorm.testing import spawn
from tests.compose.cases import BY_NAME, CASES, module_class_names, public_module_names
from tests.compose.harness import compile_case, compile_matrix

ATOL = 1e-5
ALL = [c.name for c in CASES]
# inductor (code generation) for one case per kind of state; the rest aot_eager
INDUCTOR = {
    1: {"ShardedLayerNorm", "SyncBatchNorm", "ProgressiveRepBN"},
    2: {"SyncBatchNorm[mask]"},
    4: set(),
}
# world 4 (uneven tokens, columns and batches; 4 processes on the CI's 2 cores): one case per
# collective pattern and per kind of running state. World 2 runs every case.
WORLD4 = ["SequenceParallelRMSNorm", "ShardedLayerNorm", "RowParallelLinear[sequence_parallel]",
          "fused_allreduce_rms_norm[reduce_scatter]", "TokenWeaver", "SyncBatchNorm[mask]", "PowerNorm[mask]",
          "UnifiedNorm", "ProgressiveRepBN"]
SPAWN_TIMEOUT = 280


def _backends(world: int) -> dict[str, str]:
    return {name: "inductor" if name in INDUCTOR[world] else "aot_eager" for name in ALL}


# compiled *around* non-reentrant checkpointing (torchtitan's per-block AC + compile: the partitioner
# recomputes the region, collectives included, in the backward), in the world-2 spawn: one case per
# collective pattern (the data-parallel norms' state under this: tests/data_parallel/test_compile_checkpoint.py)
CHECKPOINTED = ["SequenceParallelLayerNorm", "ShardedRMSNorm", "ColumnParallelLinear[sequence_parallel]",
                "RowParallelLinear", "fused_allreduce_rms_norm[reduce_scatter]", "SyncBatchNorm"]


@functools.cache
def _matrix(world: int) -> dict[str, dict[str, Any]]:
    names = ALL if world == 2 else WORLD4
    checkpointed = CHECKPOINTED if world == 2 else []
    per_rank = spawn(world, compile_matrix, names, _backends(world), checkpointed, timeout=SPAWN_TIMEOUT)
    merged = {}
    keys = names + [f"{n}+checkpoint" for n in checkpointed]
    for i, key in enumerate(keys):  # the worst rank of each case
        results = [r[i] for r in per_rank]
        failed = [r for r in results if "error" in r]
        merged[key] = failed[0] if failed else max(results, key=lambda r: max(r["errors"].values()))
    return merged


def check(result: dict[str, Any]) -> None:
    around = f", compiled around {result['checkpoint']} checkpointing" if result.get("checkpoint") else ""
    where = f"{result['name']} at world {result['world']} ({result['backend']}{around})"
    assert "error" not in result, f"{where} does not compile with fullgraph=True:\n{result.get('error')}"
    assert result["graph_breaks"] == 0, f"{where}: {result['graph_breaks']} graph breaks"
    assert result["graphs"] <= 2, f"{where}: {result['graphs']} graphs (recompiles) for one training and one eval mode"
    bad = {k: v for k, v in result["errors"].items() if not v <= ATOL}
    assert not bad, f"{where}: compiled != eager, max abs errors {bad} (tolerance {ATOL})"


def test_every_public_module_has_a_case():
    missing = public_module_names() - module_class_names()
    assert not missing, f"public modules without a compose case: {sorted(missing)}"


def _skewed(gm, example_inputs):
    """A broken compiler: the graph's outputs come back scaled by 1 + 1e-3."""

    def run(*args):
        return [o * (1 + 1e-3) if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in gm(*args)]

    return run


def test_the_check_sees_a_compiled_difference():
    result = compile_case(BY_NAME["SequenceParallelRMSNorm"], None, 0, 1, _skewed)
    assert result["graphs"] == 1 and result["errors"]["out"] > 1e-4
    with pytest.raises(AssertionError, match="compiled != eager"):
        check(result)


@pytest.mark.parametrize("name", ALL)
def test_compile_world1(name):
    check(compile_case(BY_NAME[name], None, 0, 1, "inductor" if name in INDUCTOR[1] else "aot_eager"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_compile_world2_gloo(name):
    check(_matrix(2)[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", WORLD4)
def test_compile_world4_gloo(name):
    check(_matrix(4)[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_compile_around_checkpoint_world2_gloo(name):
    check(_matrix(2)[f"{name}+checkpoint"])
