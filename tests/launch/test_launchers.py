"""launch/train.py under every launcher, for real: same seed -> same losses; bad input -> one error line, no hang.

Each run trains the tiny GPT for 5 steps (d_model 32, seq 32) with 4 processes as TP=2 x DP=2 (the
DeepSpeed ZeRO-3 run uses 2 processes to keep the suite short) and is compared with the
one-process run: step-1 loss equal, every loss within 1e-3 relative.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distnorm.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "launch" / "train.py"
BIN = Path(sys.executable).parent
SMALL = ["--steps", "5", "--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--seq-len", "32",
         "--batch-size", "8", "--corpus-bytes", "131072", "--no-progress", "--log-every", "1"]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("OMPI_", "PMI", "PMIX"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], timeout: float = 150, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = _env()
    env.update(env_extra or {})
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:  # a hang is a failure, with whatever the ranks said
        raise AssertionError(f"{cmd[:6]} hung for {timeout} s:\n{exc.stdout!s}\n{exc.stderr!s}") from None


def _train(launcher: list[str], out: Path, name: str, *extra: str, timeout: float = 150) -> dict:
    proc = _run([*launcher, str(TRAIN), *SMALL, "--out-dir", str(out), "--name", name, *extra], timeout=timeout,
                env_extra=MPI_ENV if launcher[0] == "mpirun" else None)
    assert proc.returncode == 0, f"{launcher[0]} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert (out / name / "loss.png").stat().st_size > 0
    return metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The plain one-process run (``python launch/train.py``)."""
    out = tmp_path_factory.mktemp("runs")
    m = _train([sys.executable], out, "single")
    assert m["launcher"] == "single" and m["world_size"] == 1
    return m


def _assert_matches(m: dict, ref: dict) -> None:
    losses, ref_losses = m["losses"], ref["losses"]
    assert len(losses) == len(ref_losses) == 5
    assert all(map(lambda x: x == x and abs(x) < 1e3, losses)), losses  # finite
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-6)
    assert losses == pytest.approx(ref_losses, rel=1e-3)
    assert losses[-1] < losses[0]


def test_single_process_learns(reference: dict) -> None:
    assert reference["tp"] == 1 and reference["dp"] == 1
    assert reference["losses"][-1] < reference["losses"][0]


def test_torchrun_tp2_dp2(tmp_path: Path, reference: dict) -> None:
    m = _train([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
                str(free_port())], tmp_path, "torchrun", "--tp", "2")
    assert (m["launcher"], m["world_size"], m["tp"], m["dp"]) == ("torchrun", 4, 2, 2)
    _assert_matches(m, reference)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed (make test installs it as root)")
def test_mpirun_tp2_dp2(tmp_path: Path, reference: dict) -> None:
    m = _train(["mpirun", "-np", "4", sys.executable], tmp_path, "mpirun", "--tp", "2")
    assert (m["launcher"], m["world_size"], m["tp"], m["dp"]) == ("mpirun", 4, 2, 2)
    _assert_matches(m, reference)


@pytest.mark.parametrize("stage,world", [(1, 4), (3, 2)])
def test_deepspeed_launcher_zero(tmp_path: Path, reference: dict, stage: int, world: int) -> None:
    pytest.importorskip("deepspeed")
    m = _train([str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port())], tmp_path,
               f"zero{stage}", "--deepspeed", str(ROOT / "configs" / f"deepspeed_zero{stage}.json"), "--tp", "2",
               timeout=200)
    assert (m["launcher"], m["world_size"], m["tp"], m["dp"]) == ("deepspeed", world, 2, world // 2)
    assert m["deepspeed"]["zero_optimization"]["stage"] == stage
    assert m["deepspeed"]["train_micro_batch_size_per_gpu"] == 8 // (world // 2)
    _assert_matches(m, reference)


# --- bad input: one error line naming key/value/rank, exit code != 0, no hang ------------------------


def _error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode != 0, proc.stdout[-2000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]


def test_missing_config_file(tmp_path: Path) -> None:
    proc = _run([sys.executable, str(TRAIN), "--config", str(tmp_path / "nope.toml")], timeout=60)
    (line,) = _error_lines(proc)
    assert "--config" in line and "nope.toml" in line and "does not exist" in line and "(rank 0)" in line


def test_unknown_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('steps = 2\n[model]\nd_model = 32\nnorm_type = "rmsnorm"\n')
    proc = _run([sys.executable, str(TRAIN), "--config", str(cfg)], timeout=60)
    (line,) = _error_lines(proc)
    assert "bad.toml.model.norm_type" in line and "unknown key" in line and "'rmsnorm'" in line


def test_bad_norm_choice() -> None:
    proc = _run([sys.executable, str(TRAIN), "--norm", "groupnorm", *SMALL[:2]], timeout=60)
    (line,) = _error_lines(proc)
    assert "model.norm" in line and "'groupnorm'" in line and "'rmsnorm'" in line


def test_tp_not_dividing_world_exits_on_every_rank(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
                 str(free_port()), str(TRAIN), *SMALL, "--out-dir", str(tmp_path), "--tp", "3"], timeout=120)
    lines = _error_lines(proc)
    assert lines and all("tp=3 must divide the world size 4" in line for line in lines), proc.stderr[-2000:]
    # each rank says it with its rank (torchrun may stop the others once the first exits)
    assert {line.rsplit("(rank ", 1)[1] for line in lines} <= {"0)", "1)", "2)", "3)"}


def test_deepspeed_section_wrong_type(tmp_path: Path) -> None:
    ds = json.loads((ROOT / "configs" / "deepspeed_zero1.json").read_text())
    ds["distnorm"]["tp_size"] = "2"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                 str(free_port()), str(TRAIN), *SMALL, "--deepspeed", str(path)], timeout=120)
    (line,) = _error_lines(proc)  # rank 0 speaks for the configuration; every rank exits
    assert "ds.json: distnorm.tp_size" in line and "must be int" in line and "'2'" in line and "(rank 0)" in line

