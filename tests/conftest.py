import numpy as np
import pytest

import kvmemory

kvmemory.register_backend("test-segmented", "flat_segment:FlatSegmentedBackend")

SEGMENTED = {"faiss", "scann", "hnsw", "test-segmented"}


def installed_backends():
    """Every registered backend whose library is installed (test-segmented included)."""
    return [name for name, ok in kvmemory.available_backends().items() if ok]


def backend_options(backend, capacity):
    """Options that make a backend exercise its real index even at test sizes."""
    if backend in SEGMENTED:
        return {"exact_below": 0, "segment_size": max(1, capacity // 3), "num_threads": 2}
    if backend == "torch":
        return {"device": "cpu"}
    return {}


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny tensors: torch's threads only add contention on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
