import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Tiny tensors: one thread avoids waiting on busy cores (restored afterwards). A test module
    takes it with ``pytestmark = pytest.mark.usefixtures('one_thread')``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
