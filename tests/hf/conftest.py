"""Fixtures of tests/hf (helpers: hf_helpers.py)."""
import pytest
import torch


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(5))
