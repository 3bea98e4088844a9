"""Collectives and bytes per token of every tensor-parallel norm, forward and backward.

Measured, not computed: each norm runs forward and backward on a simulated world
(``distnorm.testing.simulate``) inside ``count_collectives()``; DTensor's default sharding
strategy is measured with a dispatch mode that records the functional collectives DTensor issues.
Compared with

* ``dtensor``: ``F.layer_norm`` / ``F.rms_norm`` on a ``Shard(-1)`` DTensor (torch's default
  strategy: redistribute the hidden dim to ``Replicate``, i.e. all-gather activations and params);
* ``two-allreduce``: LayerNorm with one all-reduce per statistic (Σx, then Σx²; backward Σg,
  then Σg·x), the scheme of Colossal-AI's 2D LayerNorm, written here on ``distnorm.comm``.

Bytes are what one rank hands to its collectives (distnorm's counting rule: all-reduce payload,
all-gather local shard), divided by the tokens this rank holds. Sequence-parallel norms move no
per-token bytes; their once-per-call parameter-gradient all-reduce is listed per call.

    python benchmarks/bench_collectives.py [--world 4 --tokens 256 --hidden 1024 --dtype bfloat16]

Prints a table, writes ``benchmarks/out/bench_collectives.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distnorm import comm
from distnorm.comm import count_collectives
from distnorm.tensor_parallel import (
    CRMSNorm,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    ShardedLayerNorm,
    ShardedRMSNorm,
    SingleScaleRMSNorm,
    sync_sequence_parallel_grads,
)
from distnorm.testing import simulate, split_for_world

OUT = Path(__file__).resolve().parent / "out"


_FUNCTIONAL_KINDS = {
    "all_gather_into_tensor": "all_gather",
    "all_reduce": "all_reduce",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
}


class _FunctionalCollectives(TorchDispatchMode):
    """Counts the functional collectives (``_c10d_functional.*``) DTensor issues, with their input bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = comm.CollectiveCounts()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar into local ops and collectives first
        name = str(func.name())
        op = name.split("::")[-1].split(".")[0]
        if "c10d_functional" in name and op in _FUNCTIONAL_KINDS:
            self.counts.add(_FUNCTIONAL_KINDS[op], args[0].numel() * args[0].element_size())
        return func(*args, **(kwargs or {}))


def _two_allreduce_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hidden: int,
                              group: comm.Group, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over a sharded hidden dim with one all-reduce per statistic (fwd and bwd)."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            mean = comm.all_reduce_(xf.sum(-1, keepdim=True), group) / hidden
            var = comm.all_reduce_(xf.square().sum(-1, keepdim=True), group) / hidden - mean.square()
            rstd = torch.rsqrt(var + eps)
            x_hat = (xf - mean) * rstd
            ctx.save_for_backward(x_hat, rstd, w)
            return (x_hat * w + b).to(x.dtype)

        @staticmethod
        def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x_hat, rstd, w = ctx.saved_tensors
            g = dy.float() * w
            sum_g = comm.all_reduce_(g.sum(-1, keepdim=True), group)
            sum_gx = comm.all_reduce_((g * x_hat).sum(-1, keepdim=True), group)
            dx = rstd * (g - sum_g / hidden - x_hat * sum_gx / hidden)
            return dx.to(dy.dtype), (dy.float() * x_hat).sum(0).to(w.dtype), dy.float().sum(0).to(w.dtype)

    return _Fn.apply(x, weight, bias)


SCHEMES = [
    # name, layout ("sequence" | "sharded"), builder(hidden, group, dtype)
    ("SequenceParallelLayerNorm", "sequence", lambda h, g, d: SequenceParallelLayerNorm(h, group=g, dtype=d)),
    ("SequenceParallelLayerNorm deferred", "sequence",
     lambda h, g, d: SequenceParallelLayerNorm(h, group=g, dtype=d, grad_sync="deferred")),
    ("SequenceParallelRMSNorm", "sequence", lambda h, g, d: SequenceParallelRMSNorm(h, group=g, dtype=d)),
    ("SequenceParallelRMSNorm deferred", "sequence",
     lambda h, g, d: SequenceParallelRMSNorm(h, group=g, dtype=d, grad_sync="deferred")),
    ("ShardedLayerNorm", "sharded", lambda h, g, d: ShardedLayerNorm(h, group=g, dtype=d)),
    ("ShardedRMSNorm", "sharded", lambda h, g, d: ShardedRMSNorm(h, group=g, dtype=d)),
    ("SingleScaleRMSNorm sharded", "sharded", lambda h, g, d: SingleScaleRMSNorm(h, parallel="sharded", group=g, dtype=d)),
    ("CRMSNorm sharded", "sharded", lambda h, g, d: CRMSNorm(h, parallel="sharded", group=g, dtype=d)),
    ("two-allreduce LayerNorm", "sharded", None),
    ("dtensor layer_norm", "dtensor", None),
    ("dtensor rms_norm", "dtensor", None),
]


def _measure(rank: int, world: int, tokens: int, hidden: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(tokens, hidden, generator=g).to(dtype)
    rows = []
    for name, layout, build in SCHEMES:
        sync_counts = comm.CollectiveCounts()
        if layout == "dtensor":
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = DeviceMesh.from_group(group, "cpu")
            x = distribute_tensor(x_full, mesh, [Shard(1)]).requires_grad_()
            w = distribute_tensor(torch.ones(hidden, dtype=dtype), mesh, [Shard(0)]).requires_grad_()
            b = distribute_tensor(torch.zeros(hidden, dtype=dtype), mesh, [Shard(0)]).requires_grad_()
            try:
                with _FunctionalCollectives() as fwd_mode:
                    y = F.layer_norm(x, (hidden,), w, b) if "layer" in name else F.rms_norm(x, (hidden,), w)
                with _FunctionalCollectives() as bwd_mode:
                    y.sum().backward()
            except RuntimeError as exc:  # e.g. rms_norm's in-place add on a Partial placement
                rows.append({"name": name, "layout": layout, "unsupported": str(exc).splitlines()[0][:120]})
                continue
            fwd, bwd, local_tokens = fwd_mode.counts, bwd_mode.counts, tokens
        else:
            dim = 0 if layout == "sequence" else -1
            x = split_for_world(x_full, world, dim)[rank].requires_grad_()
            local_tokens = x.shape[0]
            if build is None:  # two-allreduce
                h_local = x.shape[-1]
                w = torch.ones(h_local, dtype=dtype, requires_grad=True)
                b = torch.zeros(h_local, dtype=dtype, requires_grad=True)
                with count_collectives() as fwd:
                    y = _two_allreduce_layer_norm(x, w, b, hidden, group)
            else:
                norm = build(hidden, group, dtype)
                with count_collectives() as fwd:
                    y = norm(x)
            with count_collectives() as bwd:
                y.sum().backward()
            if build is not None:
                with count_collectives() as sync_counts:
                    sync_sequence_parallel_grads(norm)
        per_call = layout == "sequence"
        rows.append({
            "name": name,
            "layout": layout,
            "fwd_count": fwd.total,
            "fwd_bytes_per_token": fwd.total_bytes / local_tokens,
            "bwd_count": bwd.total,
            "bwd_bytes_per_token": 0.0 if per_call else bwd.total_bytes / local_tokens,
            "param_grad_bytes_per_call": (bwd.total_bytes + sync_counts.total_bytes) if per_call else 0,
            "deferred_sync_count": sync_counts.total,
            "fwd_kinds": fwd.as_dict(),
            "bwd_kinds": bwd.as_dict(),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = simulate(args.world, _measure, args.world, args.tokens, args.hidden, dtype, timeout=300)[0]

    header = f"{'scheme':36s} {'fwd #':>5s} {'fwd B/tok':>10s} {'bwd #':>5s} {'bwd B/tok':>10s} {'grad B/call':>11s}"
    print(f"world={args.world} tokens={args.tokens} hidden={args.hidden} dtype={args.dtype} (rank 0)")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "unsupported" in r:
            print(f"{r['name']:36s} fails: {r['unsupported'][:70]}")
            continue
        bwd_n = f"{r['bwd_count']}" + (f"+{r['deferred_sync_count']}s" if r["deferred_sync_count"] else "")
        print(f"{r['name']:36s} {r['fwd_count']:5d} {r['fwd_bytes_per_token']:10.1f} {bwd_n:>5s} "
              f"{r['bwd_bytes_per_token']:10.1f} {r['param_grad_bytes_per_call']:11d}")
    print("(+Ns: all-reduces issued later by sync_sequence_parallel_grads, one per model)")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"world": args.world, "tokens": args.tokens, "hidden": args.hidden, "dtype": args.dtype}
    (args.out / "bench_collectives.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    per_token = [r for r in rows if r["layout"] != "sequence" and "unsupported" not in r]
    names = [r["name"] for r in per_token]
    fig, ax = plt.subplots(figsize=(9, 4))
    pos = range(len(names))
    ax.barh([p - 0.2 for p in pos], [r["fwd_bytes_per_token"] for r in per_token], height=0.4, label="forward")
    ax.barh([p + 0.2 for p in pos], [r["bwd_bytes_per_token"] for r in per_token], height=0.4, label="backward")
    ax.set_yticks(list(pos), names)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(f"bytes per token per rank (hidden {args.hidden}, {args.dtype}, TP={args.world})")
    ax.set_title("Hidden-sharded norms: communication per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "bench_collectives.png", dpi=120)


if __name__ == "__main__":
    main()
