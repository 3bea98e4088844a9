import pytest
import torch


def pytest_configure(config):
    # Tests use tiny tensors, and simulated ranks are threads: OpenMP workers only spin against each
    # other (and against gloo's threads) on a 2-core CI machine.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
