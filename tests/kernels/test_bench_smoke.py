"""benchmarks/bench_norm_kernels.py runs end to end (CPU, torch providers, tiny shape)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

ROOT = Path(__file__).resolve().parents[2]


def test_bench_norm_kernels_cpu_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_norm_kernels.py"), "--device", "cpu", "--quick",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "bench_norm_kernels.json").read_text())
    rows = data["rows"]
    assert {(r["op"], r["mode"]) for r in rows} == {(o, m) for o in ("rms_norm", "layer_norm") for m in ("fwd", "fwd_bwd")}
    assert all(r.get("ms") is not None and r["ms"] > 0 and r["pct_copy"] > 0 for r in rows), rows
    assert data["meta"]["device"] == "cpu"
    assert (tmp_path / "bench_norm_kernels.png").stat().st_size > 0
    assert "| rms_norm | fwd | bf16 | 64x256 | eager |" in (tmp_path / "bench_norm_kernels.md").read_text()


def test_min_bytes_counts_the_issue_traffic():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_norm_kernels import min_bytes
    finally:
        sys.path.pop(0)
    t, h = 4096, 4096
    act, vec = t * h * 2, h * 2
    assert min_bytes("rms_norm", "fwd", t, h, torch.bfloat16) == 2 * act + vec
    assert min_bytes("rms_norm", "fwd_bwd", t, h, torch.bfloat16) == 5 * act + 3 * vec
    assert min_bytes("layer_norm", "fwd_bwd", t, h, torch.bfloat16) == 5 * act + 5 * vec


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not run Triton's compiler: compile two variants ahead of time for an H100."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton wheel without ptxas")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no spills" in proc.stdout, proc.stdout
