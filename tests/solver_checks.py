"""Fixtures shared by the solver test modules (import the fixture into a module to apply it there)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: torch's intra-op threads only spin on the busy 2-core machine (3x the CPU time)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
