"""Shared test set-up: small thread count, plugin registered, no network."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

import perceive_ir_plugin  # noqa: E402,F401  (registers everything)

# Under pytest-xdist each worker gets one thread so two workers share the two cores.
_workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture
def seeded():
    """Seed torch and numpy for a deterministic test."""
    import numpy as np
    torch.manual_seed(0)
    np.random.seed(0)
    return 0


@pytest.fixture(scope='module')
def one_torch_thread():
    """One intra-op thread for a module of tiny-tensor tests (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
