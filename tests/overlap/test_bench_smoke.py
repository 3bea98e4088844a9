"""benchmarks/bench_overlap.py runs end to end (CPU, P = 2, both modes, tiny shapes, one round)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_overlap_cpu_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_overlap.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_overlap_cpu.json").read_text())["rows"]
    assert [(r["mode"], r["world"]) for r in rows] == [("allreduce", 2), ("reduce_scatter", 2)]
    for r in rows:
        for phase in ("fwd", "bwd"):
            q = r[phase]
            assert all(q[k] > 0 for k in ("compute_s", "compute_split_s", "unsplit_s", "woven_s")), q
            # the link's time was injected: more collectives (so more latency) when split
            assert 0 < q["comm_s"] < q["comm_split_s"], q
        assert sum(r["plan"]["chunks"]) == r["tokens"] and len(r["plan"]["chunks"]) >= 2
        assert r["plan"]["predicted_unsplit_s"] > 0 and r["plan"]["measured_split_s"] > 0
    assert "| reduce_scatter | 2 | bwd |" in proc.stdout
    assert (tmp_path / "bench_overlap_cpu.png").stat().st_size > 0
