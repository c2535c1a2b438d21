"""Shared fixtures: every test starts from the same random state, so a failure replays exactly."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's global generator before each test; the seed is returned for tests that want it."""
    torch.manual_seed(0)
    return 0
