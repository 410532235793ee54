"""Shared test set-up: small thread count, plugin registered, no network."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

import perceive_ir_plugin  # noqa: E402,F401  (registers everything)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seeded():
    """Seed torch and numpy for a deterministic test."""
    import numpy as np
    torch.manual_seed(0)
    np.random.seed(0)
    return 0
