import pytest
from rfdetr_nb.backbone import fast_kernels

@pytest.fixture(autouse=True)
def reference_kernels():
    "Compare with the reference on PyTorch's default kernels (bit-identical numerics); tests opt into the fast ones."
    with fast_kernels(False): yield
