"""launch/checkpoint.py: a TP=2 checkpoint of the demo GPT continues at TP=1, 2, 4 to round-off; bad ones are refused.

float64 model and AdamW, so "round-off" is 1e-12: the loss of the two steps after the save must
equal the saving run's own next two steps (which need the weights, the moments, the step counts
and the LR schedule restored, the fused q/k/v weights re-laid out for the new TP degree).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from distnorm.testing import simulate
from distnorm.topology import init_distributed
from launch import checkpoint
from launch.checkpoint import TrainState
from launch.model import GPT, ModelConfig

CFG = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, seq_len=8, norm="layernorm")
CONFIG = {"seed": 1, "batch_size": 3, "corpus_bytes": 4096, "model": dataclasses.asdict(CFG)}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, CFG.vocab_size, (3, CFG.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _setup(tp: int, cfg: ModelConfig = CFG) -> tuple:
    topo = init_distributed(tp=tp)
    model = GPT(cfg, tp_group=topo.tp_group, seed=7).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return topo, model, optimizer, scheduler


def _step(model: GPT, optimizer: torch.optim.Optimizer, scheduler: object, step: int) -> float:
    loss = model(*_batch(step))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()  # type: ignore[attr-defined]
    return loss.item()


def _save_rank(rank: int, path: str, tp: int) -> tuple[list[float], float]:
    topo, model, optimizer, scheduler = _setup(tp)
    losses = [_step(model, optimizer, scheduler, s) for s in range(2)]
    checkpoint.save(Path(path), model=model, optimizer=optimizer, scheduler=scheduler, engine=None, topo=topo,
                    state=TrainState(step=2, losses=losses, grad_norms=[None, None], tokens_per_s=[1.0, 1.0]),
                    info={"config": CONFIG})
    return [_step(model, optimizer, scheduler, s) for s in range(2, 4)], optimizer.param_groups[0]["lr"]


def _resume_rank(rank: int, path: str, tp: int) -> tuple[int, list[float], float, float]:
    topo, model, optimizer, scheduler = _setup(tp)
    meta = checkpoint.read_meta(Path(path))
    state = checkpoint.load(Path(path), meta, config=CONFIG, model=model, optimizer=optimizer, scheduler=scheduler,
                            engine=None, topo=topo)
    lr = optimizer.param_groups[0]["lr"]
    return state.step, [_step(model, optimizer, scheduler, s) for s in range(2, 4)], lr, optimizer.param_groups[0]["lr"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[list[float], float]]:
    path = tmp_path_factory.mktemp("ckpt") / "step_000002"
    after = simulate(2, _save_rank, str(path), 2, timeout=120)
    assert after[0] == after[1]
    return path, after[0]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_tp2_checkpoint_continues_at_any_tp(saved: tuple[Path, tuple[list[float], float]], world: int) -> None:
    path, (after, lr_after) = saved
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["format"], meta["step"], meta["tp"]) == ("dcp", 2, 2)
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    for step, losses, lr, lr_end in simulate(world, _resume_rank, str(path), world, timeout=120):
        assert step == 2 and lr == pytest.approx(1e-2 / 3, rel=1e-15)  # the optimizer's hyper-parameters
        assert lr_end == lr_after  # ... and the schedule's state
        assert losses == pytest.approx(after, rel=1e-12, abs=0)


def _refused(rank: int, path: str, cfg: ModelConfig, config: dict) -> str:
    topo, model, optimizer, scheduler = _setup(1, cfg)
    try:
        meta = checkpoint.read_meta(checkpoint.find_checkpoint(path))
        checkpoint.load(Path(path), meta, config=config, model=model, optimizer=optimizer, scheduler=scheduler,
                        engine=None, topo=topo)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _copy(saved: tuple[Path, tuple[list[float], float]], tmp_path: Path) -> Path:
    path = tmp_path / "step_000002"
    shutil.copytree(saved[0], path)
    return path


def test_truncated_file_names_file_and_keys(saved: tuple[Path, tuple[list[float], float]], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    f = path / "__1_0.distcp"
    f.write_bytes(f.read_bytes()[:100])
    (msg,) = simulate(1, _refused, str(path), CFG, CONFIG, timeout=60)
    assert msg.startswith(f"checkpoint file '{f}' is truncated or changed: 100 bytes, meta.json records ")
    assert "it holds model." in msg or "it holds optim." in msg
    f.unlink()
    (msg,) = simulate(1, _refused, str(path), CFG, CONFIG, timeout=60)
    assert msg.startswith(f"checkpoint file '{f}' is missing; it holds model.")


def test_unfinished_save_and_wrong_directory(saved: tuple[Path, tuple[list[float], float]], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    (path / "meta.json").unlink()
    (msg,) = simulate(1, _refused, str(path), CFG, CONFIG, timeout=60)
    assert f"{str(path / 'meta.json')!r} is missing: the save did not finish" in msg
    (msg,) = simulate(1, _refused, str(tmp_path / "nothing"), CFG, CONFIG, timeout=60)
    assert "not a checkpoint (no meta.json) nor a run directory with finished checkpoints" in msg


def test_other_model_or_data_names_the_key(saved: tuple[Path, tuple[list[float], float]], tmp_path: Path) -> None:
    path = saved[0]
    (msg,) = simulate(1, _refused, str(path), CFG, {**CONFIG, "seed": 2}, timeout=60)
    assert msg == (f"checkpoint '{path / 'meta.json'}': config.seed=1, but this run has 2; resume needs the same "
                   f"model and data (or start a new run)")
    # a checkpoint whose meta.json agrees but whose tensors do not: named by the DCP key and .metadata
    three = dataclasses.replace(CFG, n_layers=3)
    edited = _copy(saved, tmp_path)
    meta = json.loads((edited / "meta.json").read_text())
    meta["config"]["model"]["n_layers"] = 3
    (edited / "meta.json").write_text(json.dumps(meta))
    config = {**CONFIG, "model": dataclasses.asdict(three)}
    (msg,) = simulate(1, _refused, str(edited), three, config, timeout=60)
    assert msg.startswith(f"checkpoint '{edited / '.metadata'}' has no key 'model.blocks.2.")


def test_deepspeed_checkpoint_refused_without_deepspeed(saved: tuple[Path, tuple[list[float], float]], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format": "deepspeed"}))
    (msg,) = simulate(1, _refused, str(path), CFG, CONFIG, timeout=60)
    assert "format='deepspeed' was saved with --deepspeed; this run does not use DeepSpeed" in msg
