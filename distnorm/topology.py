"""Process-group bootstrap and the TP x DP topology.

``init_distributed(tp)`` works the same under ``torchrun``, the ``deepspeed`` launcher,
``mpirun`` (mpi4py agrees on rank, world size and a free port, then a gloo/NCCL group is built —
pip builds of torch have no MPI backend) and a plain single process (a world of 1). It returns a
:class:`Topology`: a ``DeviceMesh`` with axes ``("dp", "tp")`` (TP ranks contiguous, as Megatron
lays them out) and the two process groups taken from it.

Nothing here is read at import time, and no op reads a global topology: modules receive
``topo.tp_group`` / ``topo.dp_group`` explicitly. The only module state is a cache that makes
``init_distributed`` idempotent, cleared by :func:`destroy`.
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["Launcher", "Topology", "destroy", "detect_launcher", "init_distributed"]

Launcher = Literal["torchrun", "mpirun", "single", "existing"]

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
# Keyed by the default group object (per thread in a simulated world) and tp.
_CACHE: dict[tuple[object, int], Topology] = {}
_OWNED_GROUP = False  # whether init_distributed created the default group (destroy() undoes it)


@dataclass(frozen=True, eq=False)
class Topology:
    """Where this rank sits in a ``dp x tp`` grid, with its groups and mesh.

    Global rank ``r`` has ``tp_rank = r % tp_size`` and ``dp_rank = r // tp_size``. Also answers
    DeepSpeed's ``mpu`` protocol (``get_model_parallel_*``, ``get_data_parallel_*``), so
    ``deepspeed.initialize(..., mpu=topo)`` reduces ZeRO gradients over the DP group only.
    """

    world_size: int
    rank: int
    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    mesh: DeviceMesh | None
    backend: str
    device: torch.device
    launcher: str = "existing"
    local_rank: int = field(default=0)

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, *, launcher: str = "existing") -> Topology:
        """Wrap an existing ``DeviceMesh`` whose axes are named ``("dp", "tp")``, ``("tp",)`` or ``("dp",)``."""
        names = tuple(mesh.mesh_dim_names or ())
        if names not in (("dp", "tp"), ("tp",), ("dp",)):
            raise ValueError(
                f"Topology.from_mesh: mesh axes must be named ('dp', 'tp'), ('tp',) or ('dp',), "
                f"got mesh_dim_names={names} (rank {dist.get_rank()})"
            )
        tp_group = mesh.get_group("tp") if "tp" in names else None
        dp_group = mesh.get_group("dp") if "dp" in names else None
        tp_size = mesh.size(names.index("tp")) if "tp" in names else 1
        dp_size = mesh.size(names.index("dp")) if "dp" in names else 1
        coords = mesh.get_coordinate() or [0] * len(names)
        tp_rank = coords[names.index("tp")] if "tp" in names else 0
        dp_rank = coords[names.index("dp")] if "dp" in names else 0
        device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device(mesh.device_type)
        return cls(
            world_size=tp_size * dp_size, rank=dist.get_rank(), tp_size=tp_size, dp_size=dp_size,
            tp_rank=tp_rank, dp_rank=dp_rank, tp_group=tp_group, dp_group=dp_group, mesh=mesh,
            backend=str(dist.get_backend()), device=device, launcher=launcher,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )

    # DeepSpeed / Megatron mpu protocol -------------------------------------------------------
    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def __repr__(self) -> str:
        return (
            f"Topology(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
            f"dp={self.dp_rank}/{self.dp_size}, backend={self.backend!r}, device={self.device}, "
            f"launcher={self.launcher!r})"
        )


def detect_launcher(env: dict[str, str] | None = None) -> Launcher:
    """Which launcher started this process, from its environment.

    ``"torchrun"`` (also the deepspeed launcher: both export ``RANK``/``WORLD_SIZE``),
    ``"mpirun"`` (``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``, ``PMIX_RANK``), else ``"single"``.
    """
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if any(v in env for v in _MPI_RANK_VARS):
        return "mpirun"
    return "single"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _mpi_bootstrap() -> tuple[int, int, int]:
    """Agree on rank, world size, local rank and a rendezvous address over MPI; export them."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "init_distributed: launched by mpirun but mpi4py is not installed; "
            "pip install 'distnorm[mpi]'"
        ) from exc
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    addr_port = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or (socket.gethostname() if world > 1 else "127.0.0.1")
        addr_port = (addr, int(os.environ.get("MASTER_PORT") or _free_port()))
    addr, port = comm.bcast(addr_port, root=0)
    os.environ.update(MASTER_ADDR=str(addr), MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    return rank, world, local_rank


def _check_tp(tp: object, world: int, rank: int) -> int:
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"init_distributed: tp must be a positive int, got {tp!r} (rank {rank})")
    if world % tp:
        raise ValueError(
            f"init_distributed: tp={tp} must divide the world size {world} "
            f"(valid: {[d for d in range(1, world + 1) if world % d == 0]}) (rank {rank})"
        )
    return tp


def init_distributed(
    tp: int = 1,
    *,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> Topology:
    """Join (or create) the process group and return the ``dp x tp`` :class:`Topology`.

    Launchers: torchrun / deepspeed (env ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``), mpirun
    (mpi4py bootstrap), a single process (world of 1, in-memory store), or a process group that
    already exists (a simulated world, or the caller's). ``backend`` defaults to ``"nccl"`` when
    CUDA is available, else ``"gloo"``. ``timeout`` bounds every collective of the group (a dead
    peer gives an error, not a hang). Idempotent: a second call with the same ``tp`` returns the
    same Topology; a different ``tp`` builds new groups (every rank must call it alike).
    """
    global _OWNED_GROUP
    if not isinstance(timeout, timedelta):
        raise TypeError(f"init_distributed: timeout must be a datetime.timedelta, got {timeout!r}")
    launcher: str
    if dist.is_initialized():
        launcher = "existing"
    else:
        launcher = detect_launcher()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if launcher == "mpirun":
            _mpi_bootstrap()
        if launcher == "single":
            _check_tp(tp, 1, 0)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            _check_tp(tp, world, rank)  # fail before the rendezvous, on every rank alike
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        _OWNED_GROUP = True
    world, rank = dist.get_world_size(), dist.get_rank()
    key = (dist.group.WORLD, _check_tp(tp, world, rank))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    device_type = "cuda" if str(dist.get_backend()) == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    topo = Topology.from_mesh(mesh, launcher=launcher)
    _CACHE[key] = topo
    return topo


def destroy() -> None:
    """Forget cached topologies and destroy the default group if :func:`init_distributed` made it.

    Unreachable objects are collected first, while the groups are alive: a dropped
    ``DistributedDataParallel`` model sits in a reference cycle until the garbage collector runs,
    and if that happens after the group is destroyed its Reducer frees the last reference to a gloo
    group while holding the GIL, which can deadlock (torch 2.13; see docs/integration.md#ddp).
    """
    global _OWNED_GROUP
    _CACHE.clear()
    gc.collect()
    if _OWNED_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP = False
