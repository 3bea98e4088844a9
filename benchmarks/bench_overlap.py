"""Token-split overlap: unsplit vs weaved TP block stacks, overlap efficiency, cost model check.

CPU (default): 2 and 4 gloo processes run a stack of ``ParallelMLPBlock``s (fp32) on T tokens;
per world it measures compute alone, the collectives alone, the unsplit step, the weaved step
(split chosen by ``plan_token_split`` with a profile calibrated from the same run, and a plain
half split), and the cost model's prediction.

GPU (``--device cuda``, one GPU): the stack is one rank's shard of a TP-8 MLP (bf16) and every
collective is replaced by a stand-in of known duration on a side stream — a sleep kernel sized
like an 8xH100 NVLink all-reduce of the same bytes (``DeviceProfile()`` defaults: 12 us + bytes /
250 GB/s, TokenWeave's setting). Reports overlap efficiency = hidden time / min(compute, comm),
split overhead = weaved compute / unsplit compute, the fused add+RMSNorm's bandwidth, predicted
vs measured step time, and whether the weaved step captures in a CUDA graph.

    python benchmarks/bench_overlap.py                      # CPU, worlds 2 and 4, < 3 min
    python benchmarks/bench_overlap.py --device cuda        # one GPU

Writes a table to stdout and ``benchmarks/out/bench_overlap_<device>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distnorm import comm
from distnorm.overlap import DeviceProfile, ParallelMLPBlock, TokenSplitPlan, TokenWeaver, plan_token_split
from distnorm.overlap.fused import add_rms_norm

OUT = Path(__file__).resolve().parent / "out"


def _median_s(fn: Callable[[], Any], *, iters: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# CPU: real gloo processes
# --------------------------------------------------------------------------------------------


def _cpu_rank(rank: int, cfg: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    group = dist.group.WORLD
    world = dist.get_world_size()
    tokens, hidden, layers, mode = cfg["tokens"], cfg["hidden"], cfg["layers"], cfg["mode"]
    gen = torch.Generator().manual_seed(0)
    blocks = [ParallelMLPBlock(hidden, 4 * hidden, group=group, generator=gen) for _ in range(layers)]
    x = torch.randn(tokens, hidden, generator=gen)
    residual = torch.randn(tokens, hidden, generator=gen)
    barrier_buf = torch.zeros(1)

    def sync() -> None:  # every rank starts each timed call together
        comm.all_reduce_(barrier_buf, group)

    def rounds(variants: dict[str, Callable[[], Any]], iters: int) -> dict[str, float]:
        """Interleaved: each round times every variant once (drift and neighbours' load hit all
        alike); the minimum over rounds is the least disturbed run."""
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(iters + 1):
            for name, fn in variants.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if i:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
        local = torch.tensor([min(v) for v in times.values()], dtype=torch.float64)
        # the slowest rank sets a step's time, and every rank must plan the same split (else their
        # collectives mismatch): all ranks agree on the per-variant maximum
        comm.all_reduce_(local, group, op="max")
        return dict(zip(variants, local.tolist(), strict=True))

    def compute(lo: int, hi: int) -> Callable[[], Any]:
        return lambda: [b.partial(x[lo:hi]) for b in blocks]

    def collectives(n: int, kind: str = "allreduce") -> Callable[[], Any]:
        """``layers`` times the block's collective(s) on ``n`` tokens (the profile is calibrated on
        all-reduces; ``kind="reduce_scatter"`` times the reduce-scatter + all-gather pair)."""
        buf = torch.randn(n, hidden)
        if kind == "allreduce":
            return lambda: [comm.all_reduce_(buf, group) for _ in range(layers)]
        return lambda: [comm.all_gather_uneven(comm.reduce_scatter_uneven(buf, group), group,
                                               sizes=comm.shard_sizes(n, world)) for _ in range(layers)]

    half = tokens // 2
    out: dict[str, Any] = {"world": world, "mode": mode, "tokens": tokens, "hidden": hidden, "layers": layers}
    with torch.no_grad():
        cal = rounds({"c_half": compute(0, half), "c_full": compute(0, tokens),
                      "m_half": collectives(half), "m_full": collectives(tokens)}, cfg["iters"])
        profile = DeviceProfile.calibrate(
            compute=[(half, cal["c_half"] / layers), (tokens, cal["c_full"] / layers)],
            comm=[(n * hidden * 4, cal[k] / layers) for n, k in ((half, "m_half"), (tokens, "m_full"))],
            flops_per_token=16 * hidden * hidden / world, tile_tokens=16)
        plan = plan_token_split(tokens, hidden, world, device_profile=profile, num_layers=layers,
                                dtype=torch.float32, mode=mode)
        unsplit = TokenWeaver(blocks, group, None, mode=mode)
        weaved_half = TokenWeaver(blocks, group, TokenSplitPlan(num_tokens=tokens, first=half), mode=mode)
        weaved_plan = TokenWeaver(blocks, group, plan, mode=mode)
        main = rounds({
            "compute_s": compute(0, tokens),
            "compute_split_s": lambda: (compute(0, half)(), compute(half, tokens)()),
            "comm_s": collectives(tokens, mode),
            "unsplit_s": lambda: unsplit(x, residual),
            "weaved_half_s": lambda: weaved_half(x, residual),
            "weaved_plan_s": lambda: weaved_plan(x, residual),
        }, cfg["iters"])
    out.update(main)
    out["plan"] = {"first": plan.first, "second": plan.second, "reason": plan.reason,
                   "predicted_unsplit_s": plan.predicted_unsplit_s, "predicted_split_s": plan.predicted_split_s}
    out["profile"] = {f: getattr(profile, f) for f in ("flops_per_s", "compute_latency_s", "comm_latency_s",
                                                       "comm_bytes_per_s")}
    return out


def _cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    from distnorm.testing import spawn

    rows = []
    for mode in args.modes:
        for world in args.worlds:
            cfg = {"tokens": args.tokens, "hidden": args.hidden, "layers": args.layers, "iters": args.iters,
                   "mode": mode}
            ranks = spawn(world, _cpu_rank, cfg, timeout=600)
            row = dict(ranks[0])  # every rank holds the same (max over ranks) numbers
            best = min(row["weaved_half_s"], row["weaved_plan_s"])
            row["hidden_s"] = row["unsplit_s"] - best
            row["overlap_efficiency"] = row["hidden_s"] / min(row["compute_s"], row["comm_s"])
            row["split_overhead"] = row["compute_split_s"] / row["compute_s"]
            rows.append(row)
            print(f"  done: {mode} world {world}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------
# GPU: one device, collectives replaced by a calibrated stand-in on a side stream
# --------------------------------------------------------------------------------------------


def _cuda_sleep_cycles_per_s() -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 50_000_000
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def _gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    tp = 8  # this GPU plays one rank of a TP-8 group
    hidden, layers = args.gpu_hidden, args.layers
    h100 = DeviceProfile()  # 8xH100 NVLink all-reduce: ~12 us + bytes / 250 GB/s
    cycles_per_s = _cuda_sleep_cycles_per_s()

    def stand_in(t: torch.Tensor) -> None:
        seconds = h100.comm_s(t.numel() * t.element_size())
        torch.cuda._sleep(max(1, int(seconds * cycles_per_s)))

    def cuda_time(fn: Callable[[], Any]) -> float:
        return _median_s(fn, iters=args.iters, warmup=3, sync=torch.cuda.synchronize)

    gen = torch.Generator().manual_seed(0)
    blocks = [ParallelMLPBlock(hidden, 4 * hidden // tp, group=None, generator=gen, dtype=dtype, device=device)
              for _ in range(layers)]
    return [_gpu_row(blocks, tokens, tp, h100, stand_in, cuda_time) for tokens in args.gpu_tokens]


def _gpu_row(blocks: list[ParallelMLPBlock], tokens: int, tp: int, h100: DeviceProfile,
             stand_in: Callable[[torch.Tensor], None], cuda_time: Callable[[Callable[[], Any]], float]) -> dict[str, Any]:
    w = blocks[0].norm_weight
    hidden, layers, dtype = w.shape[0], len(blocks), w.dtype
    x = torch.randn(tokens, hidden, device=w.device, dtype=dtype)
    residual = torch.randn_like(x)
    row: dict[str, Any] = {"tokens": tokens, "hidden": hidden, "tp_shard_of": tp, "layers": layers}

    def comm_alone() -> None:
        for _ in range(layers):
            stand_in(x)

    def compute_samples(n: int) -> Callable[[], Any]:
        return lambda: [b.partial(x[:n]) for b in blocks]

    with torch.no_grad():
        # compute alone (no collective), unsplit and split, and per-block samples for the model
        half = TokenSplitPlan(num_tokens=tokens, first=tokens // 2)
        local, local_split = TokenWeaver(blocks, None, None), TokenWeaver(blocks, None, half)
        row["compute_s"] = cuda_time(lambda: local(x, residual))
        row["compute_split_s"] = cuda_time(lambda: local_split(x, residual))
        samples = [(n, cuda_time(compute_samples(n)) / layers) for n in (tokens // 4, tokens // 2, tokens)]
        row["comm_s"] = layers * h100.comm_s(tokens * hidden * 2)
        row["comm_measured_s"] = cuda_time(comm_alone)
        profile = DeviceProfile.calibrate(compute=samples, comm=[(b, h100.comm_s(b)) for b in (1e6, 1e8)],
                                          flops_per_token=16 * hidden * hidden / tp)
        plan = plan_token_split(tokens, hidden, tp, device_profile=profile, num_layers=layers, dtype=dtype)
        plan = plan if plan.split else half
        unsplit = TokenWeaver(blocks, None, TokenSplitPlan.unsplit(tokens), stand_in=stand_in)
        weaved = TokenWeaver(blocks, None, plan, stand_in=stand_in)
        row["unsplit_s"] = cuda_time(lambda: unsplit(x, residual))
        row["weaved_s"] = cuda_time(lambda: weaved(x, residual))
        row["plan"] = {"first": plan.first, "second": plan.second, "reason": plan.reason,
                       "predicted_unsplit_s": plan.predicted_unsplit_s, "predicted_split_s": plan.predicted_split_s}
        row["hidden_s"] = row["unsplit_s"] - row["weaved_s"]
        row["overlap_efficiency"] = row["hidden_s"] / min(row["compute_s"], row["comm_measured_s"])
        row["split_overhead"] = row["compute_split_s"] / row["compute_s"]
        # fused add + RMSNorm bandwidth: read x, residual; write y, residual_out
        t_norm = cuda_time(lambda: add_rms_norm(x, residual, w, 1e-6))
        row["add_rms_norm_GBps"] = 4 * x.numel() * x.element_size() / t_norm / 1e9
        row["cuda_graph"] = _try_graph(weaved, x, residual, cuda_time)
    return row


def _try_graph(weaver: TokenWeaver, x: torch.Tensor, residual: torch.Tensor,
               cuda_time: Callable[[Callable[[], Any]], float]) -> dict[str, Any]:
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                weaver(x, residual)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            weaver(x, residual)
        return {"captured": True, "replay_s": cuda_time(graph.replay)}
    except (RuntimeError, ValueError, TypeError) as exc:  # report, do not hide: the table says why
        return {"captured": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:8.2f}"


def _print_cpu(rows: list[dict[str, Any]]) -> None:
    print("| mode | P | compute ms | comm ms | unsplit ms | weaved ½ ms | weaved plan ms (split) | hidden ms "
          "| overlap eff. | split overhead | model unsplit / split ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["plan"]
        print(f"| {r['mode']} | {r['world']} | {_ms(r['compute_s'])} | {_ms(r['comm_s'])} | {_ms(r['unsplit_s'])} "
              f"| {_ms(r['weaved_half_s'])} | {_ms(r['weaved_plan_s'])} ({p['first']}+{p['second']}) "
              f"| {_ms(r['hidden_s'])} | {r['overlap_efficiency']:.0%} | {r['split_overhead']:.3f} "
              f"| {_ms(p['predicted_unsplit_s'])} / {_ms(p['predicted_split_s'])} |")


def _print_gpu(rows: list[dict[str, Any]]) -> None:
    print("| tokens | compute ms | comm (stand-in) ms | unsplit ms | weaved ms (split) | overlap eff. | split overhead "
          "| add+RMSNorm GB/s | model unsplit / split ms | CUDA graph |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, g = r["plan"], r["cuda_graph"]
        graph = f"{_ms(g['replay_s'])} ms" if g["captured"] else "failed: " + g["error"][:60]
        print(f"| {r['tokens']} | {_ms(r['compute_s'])} | {_ms(r['comm_measured_s'])} | {_ms(r['unsplit_s'])} "
              f"| {_ms(r['weaved_s'])} ({p['first']}+{p['second']}) | {r['overlap_efficiency']:.0%} "
              f"| {r['split_overhead']:.3f} | {r['add_rms_norm_GBps']:.0f} "
              f"| {_ms(p['predicted_unsplit_s'])} / {_ms(p['predicted_split_s'])} | {graph} |")


def _plot(rows: list[dict[str, Any]], device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['mode']} P={r['world']}" if device == "cpu" else f"T={r['tokens']}" for r in rows]
    weaved_key = "weaved_plan_s" if device == "cpu" else "weaved_s"
    series = [("compute alone", "compute_s"), ("unsplit", "unsplit_s"), ("weaved", weaved_key)]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.2))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        ax.bar([j + i * width for j in range(len(rows))], [r[key] * 1e3 for r in rows], width, label=name)
        if i == 2:
            for j, r in enumerate(rows):
                ax.plot([j + i * width - width / 2, j + i * width + width / 2],
                        [r["plan"]["predicted_split_s"] * 1e3] * 2, "k--", lw=1)
    ax.set_xticks([j + width for j in range(len(rows))], labels)
    ax.set_ylabel("ms per step (dashes: model)")
    ax.set_title(f"TokenWeaver on {device}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--modes", nargs="+", default=["allreduce", "reduce_scatter"])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--gpu-tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--gpu-hidden", type=int, default=8192)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_overlap: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    t0 = time.time()
    rows = _cpu(args) if args.device == "cpu" else _gpu(args)
    (_print_cpu if args.device == "cpu" else _print_gpu)(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "argv": sys.argv, "wall_s": time.time() - t0,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    path = OUT / f"bench_overlap_{args.device}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    _plot(rows, args.device, OUT / f"bench_overlap_{args.device}.png")
    print(f"wrote {path} and .png ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
