"""One real 4-process gloo run of the sequence-parallel and hidden-sharded norms (tokens 7, hidden 10: uneven)."""

import torch

from distnorm.testing import spawn
from tests.tensor_parallel import test_sequence_parallel as sp
from tests.tensor_parallel import test_sharded as sh
from tests.tensor_parallel.norm_cases import check_all, make_case


def _rank(rank, world, sp_cases, sh_cases):
    return ([o[:4] for o in sp._rank(rank, world, sp_cases, "backward")],
            [o[:4] for o in sh._rank(rank, world, sh_cases)])


def test_four_processes_gloo():
    sp_cases = [make_case("layer", 10).cast(torch.float32), make_case("rms", 64).cast(torch.bfloat16)]
    sh_cases = [make_case("layer", 10), make_case("layer", 64, offset=1e3, seed=1).cast(torch.float32),
                make_case("rms", 10).cast(torch.bfloat16)]
    outs = spawn(4, _rank, 4, sp_cases, sh_cases, timeout=120)
    for i, case in enumerate(sp_cases):
        y = torch.cat([o[0][i][0] for o in outs])
        dx = torch.cat([o[0][i][1] for o in outs])
        for o in outs:
            check_all((y, dx, o[0][i][2], o[0][i][3]), case)
    for i, case in enumerate(sh_cases):
        check_all(tuple(None if outs[0][1][i][j] is None else torch.cat([o[1][i][j] for o in outs], -1)
                        for j in range(4)), case)
