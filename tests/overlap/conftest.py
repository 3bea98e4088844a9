import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """These tests move tiny tensors; on a loaded 2-core machine OpenMP's spinning threads made
    them 30-60x slower. One intra-op thread is also what each simulated rank should use."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
