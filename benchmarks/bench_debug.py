"""Cost of ``distnorm.debug.consistency_checks`` per collective, on real processes.

Each rank times ``comm.all_reduce_`` of a few payload sizes with the checks off and on (one extra
all-gather of 14 int64, a host sync and a stack walk per collective), alternating the two modes
twice and keeping the faster run of each. Real processes (``distnorm.testing.spawn``): gloo on
CPU, or NCCL when every rank has a GPU (``--backend nccl``).

    python benchmarks/bench_debug.py [--world 2 --iters 300 --backend gloo]

Prints a table, writes ``benchmarks/out/bench_debug.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distnorm import comm, debug
from distnorm.testing import spawn

SIZES = [256, 16384, 262144]  # float32 elements: 1 KiB, 64 KiB, 1 MiB


def _time_rank(rank: int, iters: int, backend: str) -> dict[int, dict[str, float]]:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    out: dict[int, dict[str, float]] = {}
    for size in SIZES:
        t = torch.ones(size, device=device)
        best = {"off": float("inf"), "on": float("inf")}
        for mode in ("off", "on", "off", "on"):
            with debug.consistency_checks() if mode == "on" else contextlib.nullcontext():
                for _ in range(10):
                    comm.all_reduce_(t, group)
                dist.barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    comm.all_reduce_(t, group)
                if backend == "nccl":
                    torch.cuda.synchronize()
                dist.barrier()
                best[mode] = min(best[mode], (time.perf_counter() - start) / iters)
        out[size * 4] = best
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = p.parse_args()
    result = spawn(args.world, _time_rank, args.iters, args.backend, backend=args.backend, timeout=300)[0]
    print(f"all_reduce_ over {args.world} ranks ({args.backend}), microseconds per call")
    print(f"{'bytes':>10} {'checks off':>12} {'checks on':>12} {'overhead':>10}")
    rows = []
    for nbytes, t in result.items():
        off, on = t["off"] * 1e6, t["on"] * 1e6
        rows.append({"bytes": nbytes, "off_us": off, "on_us": on})
        print(f"{nbytes:>10} {off:>12.1f} {on:>12.1f} {on - off:>10.1f}")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_debug.json").write_text(json.dumps({"world": args.world, "backend": args.backend, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
