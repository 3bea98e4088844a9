"""launch/train.py under every launcher, for real: same seed -> same losses; resume; bad input -> one error line, no hang.

Each run trains the tiny GPT (d_model 32, seq 32) for 30 steps with gradient clipping at 1.0 (the
default; active in most steps: the pre-clip norm is 1-2) and is compared with the one-process run:
step 1 within 1e-6, every step within 1e-5 relative, and the pre-clip gradient norms too. torchrun
and mpirun use 4 processes as TP=2 x DP=2, DeepSpeed ZeRO-1 4 processes, ZeRO-3 2 (TP=2).

Resume: the one-process run saves at step 20; resumed on one process it repeats steps 21-30 bit for
bit; the torchrun run (TP=2 x DP=2) resumed on one process (TP 2->1, DP 2->1) and the one-process
checkpoint resumed at TP=2 continue to round-off (1e-5); DeepSpeed ZeRO-3 resumed at its own shape
repeats its steps bit for bit.
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
STEPS = 30
SMALL = ["--steps", str(STEPS), "--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--seq-len", "32",
         "--batch-size", "8", "--corpus-bytes", "131072", "--no-progress", "--log-every", "1"]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}
RTOL = 1e-5

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


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(free_port())]


def _train(launcher: list[str], out: Path, name: str, *extra: str, timeout: float = 150) -> dict:
    """Run, check the run directory (``<out>/<name>/<name>``: the run id is the name) and return metrics.json."""
    proc = _run([*launcher, str(TRAIN), *SMALL, "--out-dir", str(out), "--name", name, "--run-id", name, *extra],
                timeout=timeout, env_extra=MPI_ENV if launcher[0] == "mpirun" else None)
    assert proc.returncode == 0, f"{launcher[0]} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run_dir = out / name / name
    assert proc.stdout.splitlines().count(f"run {name}: {run_dir}") == 2  # printed at the start and the end
    assert "\r" not in proc.stdout + proc.stderr  # not a terminal: log lines, no progress bar
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "loss.png").stat().st_size > 0
    return metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The plain one-process run (``python launch/train.py``), saving a checkpoint at step 20 (and 30)."""
    out = tmp_path_factory.mktemp("runs")
    m = _train([sys.executable], out, "single", "--save-every", "20")
    assert m["launcher"] == "single" and m["world_size"] == 1
    m["out"] = out
    return m


def _assert_matches(m: dict, ref: dict, steps: slice = slice(None)) -> None:
    losses, ref_losses = m["losses"][steps], ref["losses"][steps]
    assert len(losses) == len(ref_losses) >= 10
    assert all(map(lambda x: x == x and abs(x) < 1e3, losses)), losses  # finite
    if steps.start is None:
        assert losses[0] == pytest.approx(ref_losses[0], rel=1e-6)
    assert losses == pytest.approx(ref_losses, rel=RTOL)
    norms = [g for g in m["grad_norms"][steps] if g is not None]
    assert norms == pytest.approx([g for g, x in zip(ref["grad_norms"][steps], m["grad_norms"][steps], strict=True)
                                   if x is not None], rel=RTOL)


def test_single_process_learns_with_clipping_active(reference: dict) -> None:
    assert reference["tp"] == 1 and reference["dp"] == 1 and reference["grad_clip"] == 1.0
    assert reference["losses"][-1] < reference["losses"][0]
    assert sum(g > 1.0 for g in reference["grad_norms"]) >= STEPS // 2  # the clipping is active


def test_single_process_resume_is_bitwise(tmp_path: Path, reference: dict) -> None:
    # a run of 20 steps (of the 30-step schedule), resumed from its run directory for the other 10
    first = _train([sys.executable], tmp_path, "first20", "--stop-after", "20")
    assert len(first["losses"]) == 20 and first["losses"] == reference["losses"][:20]
    run_dir = tmp_path / "first20" / "first20"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000020"]
    m = _train([sys.executable], tmp_path, "resumed", "--resume", str(run_dir))
    assert (m["start_step"], m["resumed_from"]) == (20, str(run_dir / "checkpoints" / "step_000020"))
    assert m["losses"][20:] == reference["losses"][20:] and m["grad_norms"][20:] == reference["grad_norms"][20:]
    assert m["losses"][:20] == reference["losses"][:20]  # the history travels with the checkpoint


def test_torchrun_tp2_dp2_and_resume_on_one_process(tmp_path: Path, reference: dict) -> None:
    m = _train(_torchrun(4), tmp_path, "torchrun", "--tp", "2", "--save-every", "20")
    assert (m["launcher"], m["world_size"], m["tp"], m["dp"]) == ("torchrun", 4, 2, 2)
    _assert_matches(m, reference)
    # TP 2 -> 1 and DP 2 -> 1: the run directory's latest checkpoint is step 30, so name step 20
    r = _train([sys.executable], tmp_path, "from_tp2dp2", "--resume",
               str(tmp_path / "torchrun" / "torchrun" / "checkpoints" / "step_000020"))
    assert r["start_step"] == 20 and (r["tp"], r["dp"]) == (1, 1)
    _assert_matches(r, reference, slice(20, None))


def test_one_process_checkpoint_resumes_at_tp2(tmp_path: Path, reference: dict) -> None:
    ckpt = reference["out"] / "single" / "single" / "checkpoints" / "step_000020"
    m = _train(_torchrun(2), tmp_path, "to_tp2", "--tp", "2", "--resume", str(ckpt))
    assert (m["tp"], m["dp"], m["start_step"]) == (2, 1, 20)
    _assert_matches(m, reference, slice(20, None))


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed (make test installs it as root)")
def test_mpirun_tp2_dp2(tmp_path: Path, reference: dict) -> None:
    m = _train(["mpirun", "-np", "4", sys.executable], tmp_path, "mpirun", "--tp", "2")
    assert (m["launcher"], m["world_size"], m["tp"], m["dp"]) == ("mpirun", 4, 2, 2)
    _assert_matches(m, reference)


def _deepspeed(world: int) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port())]


@pytest.mark.parametrize("stage,world", [(1, 4), (3, 2)])
def test_deepspeed_launcher_zero(tmp_path: Path, reference: dict, stage: int, world: int) -> None:
    pytest.importorskip("deepspeed")
    config = str(ROOT / "configs" / f"deepspeed_zero{stage}.json")
    save = ["--save-every", "20"] if stage == 3 else []
    m = _train(_deepspeed(world), tmp_path, f"zero{stage}", "--deepspeed", config, "--tp", "2", *save, timeout=300)
    assert (m["launcher"], m["world_size"], m["tp"], m["dp"]) == ("deepspeed", world, 2, world // 2)
    assert m["deepspeed"]["zero_optimization"]["stage"] == stage
    assert m["deepspeed"]["train_micro_batch_size_per_gpu"] == 8 // (world // 2)
    assert m["deepspeed"]["gradient_clipping"] == 1.0
    assert all(g is not None for g in m["grad_norms"])  # DeepSpeed's own pre-clip norm, compared below
    _assert_matches(m, reference)
    if stage == 3:  # DeepSpeed's checkpoint + distnorm's state, resumed at the same shape: bit for bit
        ckpt = tmp_path / "zero3" / "zero3" / "checkpoints" / "step_000020"
        r = _train(_deepspeed(world), tmp_path, "zero3_resumed", "--deepspeed", config, "--tp", "2",
                   "--resume", str(ckpt), timeout=300)
        assert r["start_step"] == 20 and r["losses"] == m["losses"] and r["grad_norms"][20:] == m["grad_norms"][20:]


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


def test_bad_flag_value_names_the_command_line() -> None:
    # (the other sources and checks, in-process: tests/launch/test_train_args.py)
    proc = _run([sys.executable, str(TRAIN), "--norm", "groupnorm", *SMALL[:2]], timeout=60)
    (line,) = _error_lines(proc)
    assert "command line --norm (model.norm): must be one of" in line and "'groupnorm'" in line and "'rmsnorm'" in line
    assert "tiny_gpt.toml" not in line


def test_existing_run_directory_is_never_overwritten(reference: dict) -> None:
    run_dir = reference["out"] / "single" / "single"
    before = (run_dir / "metrics.json").read_bytes()
    proc = _run([sys.executable, str(TRAIN), *SMALL, "--out-dir", str(reference["out"]), "--name", "single",
                 "--run-id", "single"], timeout=60)
    (line,) = _error_lines(proc)
    assert f"run directory '{run_dir}' already exists; nothing is overwritten" in line
    assert (run_dir / "metrics.json").read_bytes() == before


def test_truncated_checkpoint_is_refused(tmp_path: Path, reference: dict) -> None:
    # (unfinished and mismatched checkpoints, in-process: tests/launch/test_checkpoint.py)
    bad = tmp_path / "truncated"
    shutil.copytree(reference["out"] / "single" / "single" / "checkpoints" / "step_000020", bad)
    data = bad / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    proc = _run([sys.executable, str(TRAIN), *SMALL, "--out-dir", str(tmp_path), "--resume", str(bad)], timeout=60)
    (line,) = _error_lines(proc)
    assert f"checkpoint file '{data}' is truncated or changed" in line and "it holds model." in line
    assert not (tmp_path / "tiny_gpt").exists()  # refused before the run directory is made


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

