"""benchmarks/bench_local.py runs end to end at tiny shapes (every case, both dtypes, the world-2 run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_local_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_local.py"), "--smoke", "--world2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "bench_local.json").read_text())
    cases = {(r["case"], r["dtype"]) for r in data["rows"]}
    assert cases == {(c, d) for c in ("layer_norm", "rms_norm", "add_rms_norm", "sharded_layer_norm",
                                      "sharded_rms_norm", "sync_batch_norm_nchw", "sync_batch_norm_btc")
                     for d in ("fp32", "bf16")}
    for r in data["rows"]:
        assert r["torch_ms"] > 0 and r["distnorm_ms"] > 0 and r["ratio"] > 0, r
        if "norm" in r["case"] and "batch" not in r["case"]:
            assert r["distnorm_saved_x"] < 0.05, r  # per-row statistics only
    assert {r["case"] for r in data["world2"]} == {"sharded_layer_norm", "sharded_rms_norm"}
    assert all(r["sharded_ms"] > 0 and r["allreduce_ms"] > 0 for r in data["world2"])
    assert (tmp_path / "bench_local.png").stat().st_size > 0
    assert "| layer_norm | fp32 | 64x256 |" in proc.stdout
