"""Freezing the demo GPT's norms: the same calibrated model for every TP size, and the trainer's
``--freeze-norms-at`` (launch/freeze.py) run for real."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distnorm.convert as C
from distnorm.freeze import FrozenScaleNorm
from distnorm.testing import simulate
from launch import train
from launch.freeze import check_freeze_config, freeze_before_resume, freeze_for_training
from launch.model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, seq_len=8)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, CFG.vocab_size, (3, CFG.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _freeze_and_fold(rank: int, cfg: ModelConfig) -> tuple:
    """Freeze at step 2 on batches 2..5 (pooled over every rank), then fold; losses on batch 9."""
    group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    model = GPT(cfg, tp_group=group, stats_group=group, seed=7).double()
    log: list[str] = []
    assert not freeze_for_training(model, 1, 2, _batch, group=group, log=log.append)
    assert freeze_for_training(model, 2, 2, _batch, group=group, log=log.append)
    rstd = [float(m.rstd) for m in model.modules() if isinstance(m, FrozenScaleNorm)]
    model.eval()
    with torch.no_grad():
        frozen_loss = float(model(*_batch(9)))
        C.fold_norms(model, _batch(9))
        folded_loss = float(model(*_batch(9)))
    left = [n for n, m in model.named_modules() if isinstance(m, FrozenScaleNorm)]
    return rstd, frozen_loss, folded_loss, left, log


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_demo_model_freezes_alike_at_every_tp_size_and_folds(placement: str) -> None:
    """TP = 1 and TP = 2 (tokens and heads split): the same rstd, the same frozen loss; fold_norms then
    removes every frozen norm but the last (its output meets the LM head functionally): the pre/in
    norms fold into the column-parallel qkv/fc1, Peri-LN's output norms back into the row-parallel
    proj/fc2 (their centring included)."""
    cfg = dataclasses.replace(CFG, placement=placement)
    (ref_rstd, ref_loss, ref_folded, ref_left, log), = simulate(1, _freeze_and_fold, cfg, timeout=60)
    norms = 5 if placement == "pre" else 9
    assert len(ref_rstd) == norms and log[0].startswith(f"step     2  froze {norms} norms")
    assert ref_left == ["norm_f"]
    assert abs(ref_folded - ref_loss) <= 1e-10 * ref_loss
    for rstd, loss, folded, left, _ in simulate(2, _freeze_and_fold, cfg, timeout=120):
        assert rstd == pytest.approx(ref_rstd, rel=1e-12)
        assert abs(loss - ref_loss) <= 1e-10 * ref_loss and abs(folded - ref_loss) <= 1e-10 * ref_loss
        assert left == ["norm_f"]


def test_a_run_resumed_after_the_freeze_step_loads_the_frozen_state() -> None:
    """The checkpoint of a frozen model loads (strict) into a fresh one after freeze_before_resume, with
    identical outputs; before the freeze step nothing changes."""
    frozen = GPT(CFG, seed=7).double()
    freeze_for_training(frozen, 2, 2, _batch, group=None, log=lambda s: None)
    fresh = GPT(CFG, seed=3).double()
    assert not freeze_before_resume(fresh, 2, 2, _batch, group=None, log=lambda s: None)
    assert not any(isinstance(m, FrozenScaleNorm) for m in fresh.modules())
    assert freeze_before_resume(fresh, 5, 2, _batch, group=None, log=lambda s: None)
    fresh.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        assert float(fresh(*_batch(9))) == float(frozen(*_batch(9)))


def test_freeze_config_errors() -> None:
    check_freeze_config(0, steps=10, norm="crmsnorm", overlap=True, zero_stage=3, rank=0)  # off: anything goes
    cases = [
        ({"freeze_at": 10}, r"freeze_norms_at: must be 0 \(off\) or a step in \[1, steps\) = \[1, 10\), got 10"),
        ({"norm": "powernorm"}, r"freezes the norms \('layernorm', 'rmsnorm', 'ssnorm'\), got model.norm='powernorm'"),
        ({"overlap": True}, r"the overlap path fuses the RMSNorm into the collective"),
        ({"zero_stage": 3}, r"ZeRO stage 3 partitions the norm parameters"),
    ]
    for change, match in cases:
        args = {"freeze_at": 5, "steps": 10, "norm": "layernorm", "overlap": False, "zero_stage": None, "rank": 0}
        args.update(change)
        freeze_at = args.pop("freeze_at")
        with pytest.raises(ValueError, match=match + r".*\(rank 0\)"):
            check_freeze_config(freeze_at, **args)  # type: ignore[arg-type]


def test_trainer_rejects_a_freeze_step_outside_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--steps", "5", "--freeze-norms-at", "5"]) == 2
    assert "train.py: error: freeze_norms_at: must be 0 (off) or a step in [1, steps) = [1, 5), got 5" in \
        capsys.readouterr().err


def test_trainer_freezes_mid_run_and_trains_on(tmp_path: Path) -> None:
    cmd = [sys.executable, "launch/train.py", "--steps", "6", "--freeze-norms-at", "3", "--d-model", "16",
           "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4", "--corpus-bytes", "4096",
           "--log-every", "1", "--out-dir", str(tmp_path), "--name", "frozen", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    froze = [i for i, line in enumerate(lines) if "froze 3 norms" in line]
    assert froze and lines[froze[0] - 1].startswith("step     3  loss")  # after 3 steps, before the 4th
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert metrics["config"]["freeze_norms_at"] == 3
    assert len(metrics["losses"]) == 6 and all(math.isfinite(v) for v in metrics["losses"])
