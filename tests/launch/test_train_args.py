"""launch/train.py's command line, config sources and run directories, in-process (the launches are in test_launchers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distnorm.testing import simulate
from distnorm.topology import init_distributed
from launch.train import TrainConfig, _check, _open_run_dir, load_train_config, parse_args


def _load(*argv: str) -> tuple[TrainConfig, dict[str, str]]:
    cfg, sources = load_train_config(parse_args(list(argv)))
    _check(cfg, sources)
    return cfg, sources


def test_no_abbreviations(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--step", "10"])  # not --steps
    assert exc.value.code == 2 and "unrecognized arguments: --step 10" in capsys.readouterr().err


def test_errors_name_the_source(tmp_path: Path) -> None:
    cfg = tmp_path / "mine.toml"
    cfg.write_text('steps = 0\n[model]\nnorm = "rmsnorm"\n')
    with pytest.raises(ValueError, match=r"^mine.toml: steps must be >= 1, got 0 \(rank 0\)$"):
        _load("--config", str(cfg))
    with pytest.raises(ValueError, match=r"^command line --grad-clip: grad_clip must be a finite float >= 0 .*got -1.0"):
        _load("--config", str(cfg), "--steps", "3", "--grad-clip", "-1")
    with pytest.raises(ValueError, match=r"^command line --run-id: run_id must be a plain directory name, got 'a/b'"):
        _load("--config", str(cfg), "--steps", "3", "--run-id", "a/b")
    with pytest.raises(ValueError, match=r"^command line --placement \(model.placement\): must be one of 'pre', .*got 'x'"):
        _load("--config", str(cfg), "--placement", "x")
    cfg.write_text('steps = 3\n[model]\nnorm = "groupnorm"\n')
    with pytest.raises(ValueError, match=r"^mine.toml.model.norm: must be one of .*got 'groupnorm'"):
        _load("--config", str(cfg), "--norm", "rmsnorm")  # the file is checked on its own
    cfg.write_text('steps = 3\nsave_every = 5\n[model]\nnorm = "rmsnorm"\n')
    loaded, sources = _load("--config", str(cfg), "--steps", "4", "--no-progress")
    assert (loaded.steps, loaded.save_every, loaded.model.norm, loaded.progress, loaded.grad_clip) == (4, 5, "rmsnorm", False, 1.0)
    assert sources == {"steps": "command line --steps", "save_every": "mine.toml", "model.norm": "mine.toml",
                       "progress": "command line --progress"}


def _run_dirs(rank: int, out: str) -> list[str]:
    topo = init_distributed(tp=1)
    cfg = TrainConfig(out_dir=out, name="n")
    made = [_open_run_dir(cfg, topo) for _ in range(2)]
    try:
        _open_run_dir(TrainConfig(out_dir=out, name="n", run_id=made[0].name), topo)
    except ValueError as exc:
        return [*map(str, made), str(exc)]
    return [*map(str, made), "no error"]


def test_each_run_gets_a_new_directory(tmp_path: Path) -> None:
    first, second, error = simulate(1, _run_dirs, str(tmp_path), timeout=60)[0]
    assert first != second and Path(first).parent == Path(second).parent == tmp_path / "n"
    assert Path(first).is_dir() and Path(second).is_dir()
    assert error == f"run_id: run directory '{first}' already exists; nothing is overwritten: choose another --run-id or leave it unset (rank 0)"
