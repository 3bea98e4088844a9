"""DeepSpeed parity of the demo trainer: ZeRO stage x TP x DP shape x clipping -> max relative loss difference.

Every cell trains the tiny GPT with ``deepspeed launch/train.py`` and compares its per-step losses
with the plain one-process run (``python launch/train.py``) of the same ``--grad-clip``: the
largest ``|loss_ds - loss_plain| / loss_plain`` over all steps, the same for the pre-clip gradient
norms (DeepSpeed's own norm — ``engine.get_global_grad_norm()``, or ``dn.grad_norm`` under ZeRO-0,
which reports none), and how many steps the clipping was active in (plain run's norm > max).

    python benchmarks/bench_trainer_parity.py [--steps 50 --stages 0 1 2 3 --shapes 1x1 2x1 2x2 --clip 1.0]

``--shapes TPxDP`` (world = TP * DP). Prints a table, writes ``benchmarks/out/bench_trainer_parity.{json,md}``.
About a minute per cell on 2 busy CPU cores (DeepSpeed's start-up dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
BIN = Path(sys.executable).parent
SMALL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--seq-len", "32", "--batch-size", "8",
         "--corpus-bytes", "131072", "--no-progress", "--log-every", "10"]


def _free_port() -> int:
    from distnorm.testing import free_port

    return free_port()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def _run(cmd: list[str], out: Path, run_id: str, steps: int, clip: float, *extra: str, timeout: float = 900) -> dict:
    args = [*cmd, str(TRAIN), *SMALL, "--steps", str(steps), "--grad-clip", str(clip), "--out-dir", str(out),
            "--name", "parity", "--run-id", run_id, *extra]
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:8])} ... failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "parity" / run_id / "metrics.json").read_text())


def _ds_config(stage: int, directory: Path) -> Path:
    base = json.loads((ROOT / "configs" / f"deepspeed_zero{3 if stage == 3 else 1}.json").read_text())
    base["zero_optimization"]["stage"] = stage
    path = directory / f"zero{stage}.json"
    path.write_text(json.dumps(base))
    return path


def _max_rel(a: list[float | None], b: list[float | None]) -> float | None:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return max(abs(x - y) / abs(y) for x, y in pairs) if pairs else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else "0 (bitwise)" if v == 0 else f"{v:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--shapes", nargs="+", default=["1x1", "2x1", "2x2"], help="TPxDP")
    p.add_argument("--clip", type=float, default=1.0, help="--grad-clip of the 'on' runs (DeepSpeed's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for clip in (args.clip, 0.0):
            ref = _run([sys.executable], tmp, f"plain-clip{clip}", args.steps, clip)
            clipped = sum(1 for g in ref["grad_norms"] if clip > 0 and g > clip)
            for stage in args.stages:
                for shape in args.shapes:
                    tp, dp = (int(v) for v in shape.split("x"))
                    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(tp * dp), "--master_port", str(_free_port())]
                    t0 = time.perf_counter()
                    m = _run(cmd, tmp, f"z{stage}-{shape}-clip{clip}", args.steps, clip,
                             "--deepspeed", str(_ds_config(stage, tmp)), "--tp", str(tp))
                    row = {"stage": stage, "tp": tp, "dp": dp, "grad_clip": clip, "steps": args.steps,
                           "clipped_steps": clipped, "max_rel_loss_diff": _max_rel(m["losses"], ref["losses"]),
                           "max_rel_grad_norm_diff": _max_rel(m["grad_norms"], ref["grad_norms"]),
                           "seconds": round(time.perf_counter() - t0, 1)}
                    rows.append(row)
                    print(row, flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "python": sys.version.split()[0]}
    try:
        import deepspeed
        import torch

        meta.update(torch=torch.__version__, deepspeed=deepspeed.__version__)
    except ImportError:
        pass
    (out / "bench_trainer_parity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| ZeRO stage | TP x DP | grad clip | steps (clipped) | max rel. loss diff | max rel. grad-norm diff |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        clip_s = "off" if r["grad_clip"] == 0 else f"{r['grad_clip']:g}"
        steps = f"{r['steps']} ({r['clipped_steps']})" if r["grad_clip"] else f"{r['steps']}"
        lines.append(f"| {r['stage']} | {r['tp']} x {r['dp']} | {clip_s} | {steps} | {_fmt(r['max_rel_loss_diff'])} | "
                     f"{_fmt(r['max_rel_grad_norm_diff'])} |")
    table = "\n".join(lines)
    (out / "bench_trainer_parity.md").write_text(f"{table}\n\n{meta}\n")
    print(table)


if __name__ == "__main__":
    main()
