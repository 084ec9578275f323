import pytest
import torch
from rfdetr_nb.backbone import fast_kernels

def pytest_configure(config):
    config.addinivalue_line('markers', "slow: minutes-long checks (all seven Seg variants), deselected in CI; run with -m slow")
    # the reference's own note when the oracle is built with random weights, which the parity tests do on purpose
    config.addinivalue_line('filterwarnings', "ignore:.*was instantiated with pretrain_weights=None")

@pytest.fixture(autouse=True)
def reference_kernels():
    "Compare with the reference on PyTorch's default kernels (bit-identical numerics); tests opt into the fast ones."
    with fast_kernels(False): yield

@pytest.fixture(scope='module')
def one_thread():
    "One thread, for the training tests: on a busy 2-core machine two OpenMP threads spin against each other and a step takes ~10× longer."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
