"""init_distributed / Topology: simulated worlds, a single process, torchrun and mpirun for real."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import distnorm as dn
from distnorm.testing import free_port, simulate
from distnorm.topology import detect_launcher

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "launch" / "topology_probe.py"


def _topo(rank, tp):
    topo = dn.init_distributed(tp=tp)
    again = dn.init_distributed(tp=tp)
    tp_ranks = dist.get_process_group_ranks(topo.tp_group)
    dp_ranks = dist.get_process_group_ranks(topo.dp_group)
    return (topo.rank, topo.tp_rank, topo.dp_rank, topo.tp_size, topo.dp_size, tp_ranks, dp_ranks,
            again is topo, topo.mesh.mesh_dim_names, topo.get_data_parallel_world_size())


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2), (4, 2), (4, 1), (3, 3), (4, 4)])
def test_groups_in_simulated_world(world, tp):
    out = simulate(world, _topo, tp, timeout=60)
    for r, (rank, tp_rank, dp_rank, tp_size, dp_size, tp_ranks, dp_ranks, same, names, mpu_dp) in enumerate(out):
        assert rank == r and tp_size == tp and dp_size == world // tp and mpu_dp == dp_size
        assert tp_rank == r % tp and dp_rank == r // tp
        assert tp_ranks == list(range(dp_rank * tp, dp_rank * tp + tp))  # TP ranks contiguous
        assert dp_ranks == list(range(tp_rank, world, tp))
        assert same and names == ("dp", "tp")


def _bad_tp(rank, tp):
    dn.init_distributed(tp=tp)


@pytest.mark.parametrize("tp,match", [
    (3, r"tp=3 must divide the world size 4 \(valid: \[1, 2, 4\]\) \(rank \d\)"),
    (0, r"tp must be a positive int, got 0 \(rank \d\)"),
    (-2, r"tp must be a positive int, got -2"),
])
def test_bad_tp(tp, match):
    with pytest.raises(ValueError, match=match):
        simulate(4, _bad_tp, tp, timeout=30)


def test_from_mesh_rejects_unnamed_axes():
    def fn(rank):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("x",))
        dn.Topology.from_mesh(mesh)

    with pytest.raises(ValueError, match=r"mesh axes must be named .* got mesh_dim_names=\('x',\) \(rank"):
        simulate(2, fn, timeout=30)


def test_from_mesh_1d():
    def fn(rank):
        from torch.distributed.device_mesh import init_device_mesh

        topo = dn.Topology.from_mesh(init_device_mesh("cpu", (2,), mesh_dim_names=("dp",)))
        return topo.dp_size, topo.tp_size, topo.dp_rank, topo.tp_group

    assert simulate(2, fn, timeout=30) == [(2, 1, 0, None), (2, 1, 1, None)]


def test_detect_launcher():
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert detect_launcher({"OMPI_COMM_WORLD_RANK": "0"}) == "mpirun"
    assert detect_launcher({"PMI_RANK": "1"}) == "mpirun"
    assert detect_launcher({}) == "single"


def _clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("OMPI_", "PMI", "PMIX"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _probe_lines(stdout):
    return sorted((json.loads(line) for line in stdout.splitlines() if line.startswith("{")), key=lambda d: d["rank"])


def _probe_files(directory):
    return sorted((json.loads(p.read_text()) for p in Path(directory).glob("rank*.json")), key=lambda d: d["rank"])


def test_single_process():
    out = subprocess.run([sys.executable, str(PROBE), "1"], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (info,) = _probe_lines(out.stdout)
    assert info["launcher"] == "single" and info["world"] == 1 and info["backend"] == "gloo"
    assert info["mesh"] == [[0]]


def test_single_process_bad_tp_fails_clearly():
    out = subprocess.run([sys.executable, str(PROBE), "2"], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "tp=2 must divide the world size 1" in out.stderr


@pytest.mark.slow
def test_torchrun_4_processes_tp2(tmp_path):
    env = _clean_env()
    env["DISTNORM_PROBE_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
           str(PROBE), "2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    infos = _probe_files(tmp_path)
    assert [i["rank"] for i in infos] == [0, 1, 2, 3]
    for i in infos:
        r = i["rank"]
        assert i["launcher"] == "torchrun" and i["world"] == 4
        assert (i["tp_rank"], i["dp_rank"], i["tp_size"], i["dp_size"]) == (r % 2, r // 2, 2, 2)
        assert i["tp_members"] == [r - r % 2, r - r % 2 + 1]
        assert i["dp_members"] == [r % 2, r % 2 + 2]
        assert i["mesh"] == [[0, 1], [2, 3]]
        assert i["mpu"] == [2, 2, r % 2, r // 2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed (make test installs it as root)")
def test_mpirun_2_processes(tmp_path):
    env = _clean_env()
    env["DISTNORM_PROBE_DIR"] = str(tmp_path)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    cmd = ["mpirun", "-np", "2", sys.executable, str(PROBE), "2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    infos = _probe_files(tmp_path)
    assert [(i["rank"], i["launcher"], i["world"], i["tp_rank"], i["tp_members"]) for i in infos] == [
        (0, "mpirun", 2, 0, [0, 1]), (1, "mpirun", 2, 1, [0, 1])]


def _dropped_ddp_is_freed_by_destroy(rank):
    import gc
    import weakref

    import torch

    topo = dn.init_distributed()
    gc.disable()  # as if the collector had not run yet
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3), process_group=topo.dp_group)
        ddp(torch.randn(2, 3)).sum().backward()
        reducer = weakref.ref(ddp.reducer)
        del ddp
        alive_after_del = reducer() is not None  # DDP sits in a reference cycle
        dn.topology.destroy()
        return alive_after_del, reducer() is None
    finally:
        gc.enable()


@pytest.mark.slow
def test_destroy_frees_a_dropped_ddp_model_before_the_group():
    """A dropped DDP model must not outlive the process group: its Reducer freeing the last reference
    to a gloo group can deadlock at exit (docs/integration.md#ddp). destroy() collects it first."""
    from distnorm.testing import spawn

    assert spawn(2, _dropped_ddp_is_freed_by_destroy, timeout=120) == [(True, True)] * 2
