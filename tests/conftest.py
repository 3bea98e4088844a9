import os

import pytest
import torch


def pytest_configure(config):
    # Tests use tiny tensors, and simulated ranks are threads: OpenMP workers only spin against each
    # other (and against gloo's threads) on a 2-core CI machine.
    torch.set_num_threads(1)
    if os.environ.get("DISTNORM_TEST_CONSISTENCY_CHECKS") == "1":
        # the false-positive check of docs/troubleshooting.md: every simulated rank (a thread of this
        # process) runs with the cross-rank consistency checks on (eager only: they sync the host)
        from distnorm import debug

        debug.enable_consistency_checks(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
