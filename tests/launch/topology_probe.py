"""Run under a launcher: prints one JSON line per rank describing its Topology (used by tests)."""

import json
import os
import sys

import torch

import distnorm as dn


def main() -> None:
    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    topo = dn.init_distributed(tp=tp)
    assert dn.init_distributed(tp=tp) is topo  # idempotent
    tp_members = [0] * topo.tp_size
    dp_members = [0] * topo.dp_size
    # who is in my groups: all-gather global ranks over each group
    t = torch.tensor([topo.rank])
    tp_all = [torch.zeros_like(t) for _ in range(topo.tp_size)]
    dp_all = [torch.zeros_like(t) for _ in range(topo.dp_size)]
    torch.distributed.all_gather(tp_all, t, group=topo.tp_group)
    torch.distributed.all_gather(dp_all, t, group=topo.dp_group)
    tp_members = [int(x) for x in tp_all]
    dp_members = [int(x) for x in dp_all]
    line = json.dumps({
        "rank": topo.rank, "world": topo.world_size, "tp_rank": topo.tp_rank, "dp_rank": topo.dp_rank,
        "tp_size": topo.tp_size, "dp_size": topo.dp_size, "tp_members": tp_members, "dp_members": dp_members,
        "launcher": topo.launcher, "backend": topo.backend, "mesh": topo.mesh.mesh.tolist(),
        "mpu": [topo.get_model_parallel_world_size(), topo.get_data_parallel_world_size(),
                topo.get_model_parallel_rank(), topo.get_data_parallel_rank()],
    })
    out_dir = os.environ.get("DISTNORM_PROBE_DIR")
    if out_dir:  # concurrent ranks would interleave on a shared stdout pipe
        with open(os.path.join(out_dir, f"rank{topo.rank}.json"), "w") as f:
            f.write(line + "\n")
    else:
        print(line, flush=True)
    dn.topology.destroy()


if __name__ == "__main__":
    main()
