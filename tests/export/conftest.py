import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The export tests run many tiny ops (decode steps); on a shared 2-core machine, thread hand-offs
    cost more than the work (measured: the greedy test takes 1.5 s with one thread, 22 s with two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
