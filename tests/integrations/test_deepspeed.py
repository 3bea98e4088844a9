"""The DeepSpeed "distnorm" section: parsing, conversion of a model, and errors (the real launches live in tests/launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from distnorm.config import DistNormConfig
from distnorm.integrations.deepspeed import convert_model, initialize, load_config
from distnorm.tensor_parallel import SequenceParallelLayerNorm, SequenceParallelRMSNorm, ShardedLayerNorm
from distnorm.testing import simulate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", [1, 3])
def test_shipped_configs_parse(stage: int) -> None:
    ds, cfg = load_config(ROOT / "configs" / f"deepspeed_zero{stage}.json")
    assert ds["zero_optimization"]["stage"] == stage and "distnorm" in ds
    assert cfg.convert.layer_norm == "sequence_parallel" and cfg.tp_size == 1


def test_bad_files_and_sections(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"deepspeed config: file '.*missing.json' does not exist"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken.json'.*invalid JSON"):
        load_config(tmp_path / "broken.json")
    (tmp_path / "ds.json").write_text(json.dumps({"distnorm": {"tp_size": 2, "overlapp": {}}}))
    with pytest.raises(ValueError, match=r"ds.json: distnorm.overlapp: unknown key"):
        load_config(tmp_path / "ds.json")
    with pytest.raises(ValueError, match=r"^distnorm.convert.rms_norm: must be one of .* got 1"):
        load_config({"distnorm": {"convert": {"rms_norm": 1}}})


def _convert(rank: int, section: dict) -> list[str]:
    from distnorm.topology import init_distributed

    topo = init_distributed(tp=section.get("tp_size", 1))
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.RMSNorm(8), nn.BatchNorm1d(8))
    model = convert_model(model, DistNormConfig.from_dict(section), topo)
    return [type(m).__name__ for m in model]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_convert_model_follows_the_section(world: int) -> None:
    section = {"tp_size": world, "convert": {"layer_norm": "sharded", "rms_norm": "sequence_parallel"}}
    for names in simulate(world, _convert, section, timeout=60):
        assert names == ["Linear", ShardedLayerNorm.__name__, SequenceParallelRMSNorm.__name__, "BatchNorm1d"]
    section = {"tp_size": 1, "convert": {"layer_norm": "sequence_parallel"}}
    assert simulate(1, _convert, section, timeout=60)[0][1] == SequenceParallelLayerNorm.__name__


def test_initialize_rejects_mpu_before_anything() -> None:
    with pytest.raises(ValueError, match="do not pass mpu"):
        initialize(model=nn.Linear(2, 2), config={}, mpu=object())


def _initialize_mismatch(rank: int) -> str:
    from distnorm.topology import init_distributed

    topo = init_distributed(tp=1)
    try:
        initialize(model=nn.Linear(2, 2), config={"distnorm": {"tp_size": 2}}, topology=topo,
                   optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_initialize_tp_mismatch_names_rank() -> None:
    for rank, msg in enumerate(simulate(2, _initialize_mismatch, timeout=60)):
        assert f"distnorm.tp_size=2 does not match the topology's tp_size=1 (rank {rank})" == msg


def _marks(rank: int, tp: int) -> dict[str, bool]:
    from distnorm.integrations.deepspeed import mark_tensor_parallel_parameters
    from distnorm.topology import init_distributed
    from tests.tensor_parallel.tp_model import Model

    topo = init_distributed(tp=tp)
    model = Model(topo.tp_group)
    model.blocks[0].norm1.weight.tensor_model_parallel = True  # a mark set by someone else stays
    count = mark_tensor_parallel_parameters(model)
    marks = {n: bool(getattr(p, "tensor_model_parallel", False)) for n, p in model.named_parameters()}
    assert count == sum(marks.values()) - 1  # minus the mark set by hand
    return marks


@pytest.mark.parametrize("tp", [1, 2])
def test_mark_tensor_parallel_parameters_marks_exactly_the_sharded_ones(tp: int) -> None:
    """What DeepSpeed's gradient norm reads (is_model_parallel_parameter): sharded on every TP rank, replicated once."""
    sharded = {f"blocks.{i}.{n}" for i in range(2)
               for n in ("fc1.weight", "fc1.bias", "norm2.weight", "norm2.bias", "fc2.weight")}
    for marks in simulate(tp, _marks, tp, timeout=60):
        want = {n for n in marks if n in sharded and tp > 1} | {"blocks.0.norm1.weight"}
        assert {n for n, marked in marks.items() if marked} == want
